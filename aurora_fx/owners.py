"""Owner modules: build the rewritten GraphModule for an owner, swap it in and out of the model.

A rewritten owner keeps every parameter, buffer and child of the module it replaces under the
same names (library code reads ``layer.weight`` directly), plus one adapter child per adapted
parameter, and the plain attributes (``in_features``, ``nf``, ...). The replaced module is kept
in ``OwnerState.original`` and shares its parameters, so ``unload`` and ``disable_adapters``
swap it back for the exact base computation.

Library fast paths that skip sub-layers (``nn.TransformerEncoderLayer`` calls a fused kernel
with ``linear1.weight`` in eval mode under ``no_grad``) are switched off while an adapter lives
under them, so an adapter is never silently bypassed.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from aurora_fx.tracing import Binding, OwnerState, get_submodule, owner_state, set_owner_state

__all__ = [
    "build_owner",
    "swap_module",
    "restore_original",
    "iter_owners",
    "guard_fast_paths",
    "release_fast_paths",
    "adapter_attr",
]

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_PLAIN_TYPES = (int, float, str, bool, tuple, type(None))
_FASTPATH_SAVED = "_aurora_fx_saved_activation_relu_or_gelu"


def adapter_attr(owner: nn.Module, param: str) -> str:
    """Attribute name for the adapter on ``param``: ``adapter`` or ``adapter_<param>``, unique."""
    base = "adapter" if param == "weight" else f"adapter_{param}"
    name, i = base, 1
    while hasattr(owner, name) and not _is_our_adapter_slot(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _is_our_adapter_slot(owner: nn.Module, name: str) -> bool:
    state = owner_state(owner)
    return state is not None and any(b.attr == name for b in state.bindings)


def build_owner(
    current: nn.Module,
    graph: fx.Graph,
    adapters: dict[str, nn.Module],
    bindings: tuple[Binding, ...],
) -> fx.GraphModule:
    """A GraphModule running ``graph`` over ``current``'s members plus the new ``adapters``.

    Args:
        current: The module now in the model (original, or an earlier rewritten owner).
        graph: The owner graph (not yet holding the new adapters' nodes).
        adapters: New adapter modules by attribute name.
        bindings: All bindings of the owner after this step (old and new).
    """
    state = owner_state(current)
    original = state.original if state is not None else current
    holder = nn.Module()
    holder._parameters = dict(current._parameters)
    holder._buffers = dict(current._buffers)
    holder._modules = {**current._modules, **adapters}
    gm = fx.GraphModule(holder, graph, class_name=f"Adapted{type(original).__name__}")
    # GraphModule copies only what the graph references (and creates bare parents for dotted
    # targets): restore every member, in order, so state_dict keys stay those of the original.
    gm._parameters = dict(holder._parameters)
    gm._buffers = dict(holder._buffers)
    gm._non_persistent_buffers_set = set(current._non_persistent_buffers_set)
    gm._modules = dict(holder._modules)
    _copy_plain_attributes(original, gm)
    _copy_hooks(current, gm)
    gm.train(current.training)
    set_owner_state(gm, OwnerState(original=original, bindings=bindings))
    return gm


def _copy_plain_attributes(src: nn.Module, dst: nn.Module) -> None:
    for key, value in vars(src).items():
        plain = not key.startswith("_") and key != "training" and isinstance(value, _PLAIN_TYPES)
        if plain and not hasattr(dst, key):
            dst.__dict__[key] = value


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    for name in _HOOK_DICTS:
        if hasattr(src, name):
            setattr(dst, name, type(getattr(src, name))(getattr(src, name)))


def restore_original(gm: fx.GraphModule) -> nn.Module:
    """The replaced module, re-pointed at ``gm``'s current members (after ``.to()``, loads ...)."""
    state = owner_state(gm)
    assert state is not None, "not a rewritten owner"
    original = state.original
    adapter_attrs = {b.attr for b in state.bindings}
    for name in list(original._parameters):
        original._parameters[name] = gm._parameters.get(name)
    for name in list(original._buffers):
        original._buffers[name] = gm._buffers.get(name)
    for name in list(original._modules):
        if name not in adapter_attrs:
            original._modules[name] = gm._modules.get(name)
    original.train(gm.training)
    return original


def swap_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``model`` (not the root)."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(model, parent_path), name, new)


def iter_owners(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """All rewritten owners in ``model`` as ``(path, module)``."""
    return [(path, m) for path, m in model.named_modules() if owner_state(m) is not None]


def _fast_path_layers(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    layers = []
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts)):
            module = get_submodule(model, ".".join(parts[:i]))
            if isinstance(module, nn.TransformerEncoderLayer) and module not in layers:
                layers.append(module)
    return layers


def guard_fast_paths(model: nn.Module, paths: list[str]) -> None:
    """Switch off the eval/no_grad fused kernel of TransformerEncoderLayers above ``paths``.

    The fused kernel reads ``linear1.weight`` etc. and would skip the adapters; with
    ``activation_relu_or_gelu`` falsy the layer takes its regular path, which calls its
    sub-layers (the activation function itself is unchanged).
    """
    for layer in _fast_path_layers(model, paths):
        if not hasattr(layer, _FASTPATH_SAVED):
            setattr(layer, _FASTPATH_SAVED, layer.activation_relu_or_gelu)
            layer.activation_relu_or_gelu = 0


def release_fast_paths(model: nn.Module) -> None:
    """Restore fast paths of layers that no longer hold any adapter."""
    for _path, layer in model.named_modules():
        guarded = isinstance(layer, nn.TransformerEncoderLayer) and hasattr(layer, _FASTPATH_SAVED)
        if guarded and not any(owner_state(m) is not None for m in layer.modules()):
            layer.activation_relu_or_gelu = getattr(layer, _FASTPATH_SAVED)
            delattr(layer, _FASTPATH_SAVED)
