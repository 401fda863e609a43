"""Owner modules: the record a rewritten owner keeps, building it, and swapping it in and out.

An *owner* is the module whose own forward computes a site (the ``nn.Linear``/``Conv1D`` itself,
or the module calling ``F.linear(x, self.w)``). A rewritten owner is a ``torch.fx.GraphModule``
that keeps every parameter, buffer and child of the module it replaces under the same names
(library code reads ``layer.weight`` directly), plus one adapter child per adapted parameter,
and the plain attributes (``in_features``, ``nf``, ...). Its ``meta["aurora_fx"]`` holds an
``OwnerState``: the replaced module (sharing its parameters, so ``unload`` and
``disable_adapters`` swap it back for the exact base computation) and the adapter bindings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from aurora_fx.conv_sites import conv_delta
from aurora_fx.expert_routing import ExpertRouting
from aurora_fx.mha_sites import RowRouting
from aurora_fx.quantized import dequantized_weight, frozen_base_forward
from aurora_fx.records import Layout, SiteKind, weight_out_in
from aurora_fx.tracing import get_submodule, trace_own_forward

__all__ = [
    "Binding",
    "OwnerState",
    "owner_state",
    "set_owner_state",
    "owner_graph",
    "build_owner",
    "swap_module",
    "restore_original",
    "iter_owners",
    "iter_bindings",
    "adapter_attr",
    "WrappedOwner",
    "build_wrapped_owner",
    "AdapterUnit",
    "iter_units",
    "base_weight",
]

_STATE_KEY = "aurora_fx"
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_PLAIN_TYPES = (int, float, str, bool, tuple, type(None))


@dataclass(frozen=True)
class Binding:
    """An adapter attached to one weight parameter of an owner.

    Attributes:
        site: The site path.
        param: The owner's weight parameter name.
        attr: Attribute name of the adapter module inside the owner GraphModule.
        kind: Site kind.
        layout: Weight storage (see ``Site.layout``).
        quantization: The base weight's quantization (``Site.quantization``), or None.
        rows: A slice site's output rows (``Site.rows``), or None.
        name: The adapter's name (``apply(..., name=...)``). In a model with several names every adapter lives in
            an ``AdapterSet`` at the slot, and ``attr`` is ``"<slot>.<name>"`` (``gm.get_submodule(attr)`` is the
            adapter either way).
    """

    site: str
    param: str
    attr: str
    kind: SiteKind
    layout: Layout
    quantization: str | None = None
    rows: tuple[int, int] | None = None
    name: str = "default"

    @property
    def slot(self) -> str:
        """The owner attribute the graph (or the wrapped forward) calls: the adapter, or the ``AdapterSet``."""
        return self.attr.partition(".")[0]


@dataclass(frozen=True)
class OwnerState:
    """What a rewritten owner remembers: the module it replaced and its adapter bindings."""

    original: nn.Module
    bindings: tuple[Binding, ...]

    def binding(self, param: str) -> Binding | None:
        """The binding on ``param``, or None."""
        return next((b for b in self.bindings if b.param == param), None)


def owner_state(module: nn.Module) -> OwnerState | None:
    """The ``OwnerState`` of a rewritten owner, or None for any other module."""
    if isinstance(module, (fx.GraphModule, WrappedOwner)):
        state = module.meta.get(_STATE_KEY)
        if isinstance(state, OwnerState):
            return state
    return None


def set_owner_state(gm: fx.GraphModule, state: OwnerState) -> None:
    """Attach ``state`` to ``gm`` (kept across ``copy.deepcopy``)."""
    gm.meta[_STATE_KEY] = state


def owner_graph(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s own forward: its current graph if already rewritten, else traced.

    Raises:
        TraceError: fx cannot trace it alone (see ``tracing.trace_own_forward``).
    """
    if isinstance(module, WrappedOwner):
        raise TypeError("an experts owner has no fx graph (its forward runs under aurora_fx.expert_routing)")
    return module.graph if owner_state(module) is not None else trace_own_forward(module)


def adapter_attr(owner: nn.Module, param: str) -> str:
    """Attribute name for the adapter on ``param``: ``adapter`` or ``adapter_<param>``, unique."""
    base = "adapter" if param == "weight" else f"adapter_{param}"
    name, i = base, 1
    while hasattr(owner, name) and not _is_our_adapter_slot(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _is_our_adapter_slot(owner: nn.Module, name: str) -> bool:
    state = owner_state(owner)
    return state is not None and any(b.slot == name for b in state.bindings)


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
    adapter_attrs = {b.slot for b in state.bindings}
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
    """Put ``new`` at ``path`` in ``model``.

    Raises:
        ValueError: ``path`` is ``""``: the root has no parent to hold a replacement, so a rewritten
            root would never run (``passes.check`` refuses root sites for this reason).
    """
    if not path:
        raise ValueError("cannot swap the root module: it has no parent to hold the rewritten owner; wrap the "
                         "model in a parent module (e.g. torch.nn.Sequential(model)) first")
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(model, parent_path), name, new)


class WrappedOwner:
    """Base of owners rewritten without a graph: the original class's own forward, with the adapters added.

    Two kinds of owner keep their forward because torch.fx cannot (or should not) trace it:

    * an experts module (``aurora_fx.expert_sites``, a data-dependent forward): it runs inside the routing mode
      (``aurora_fx.expert_routing``), which adds each expert's adapter where the expert weights compute;
    * a quantized ``nn.Linear`` (``aurora_fx.quantized``): the quantizer's forward is the base, and the adapter's
      output on the same input is added to it (``AdapterBase.add_to``);
    * a convolution (``aurora_fx.conv_sites``): the convolution is the base, and the adapter runs on its input
      patches (``conv_sites.conv_delta``);
    * slices of a fused projection (``aurora_fx.slice_sites``): the layer is the base, and each slice's adapter adds
      to its own output rows;
    * an ``nn.MultiheadAttention`` (``aurora_fx.mha_sites``): its forward runs inside ``RowRouting``, which adds the
      q/k/v and ``out_proj`` adapters where ``F.multi_head_attention_forward`` computes them.

    ``build_wrapped_owner`` makes an instance of a subclass of the module's own class (``AdaptedQwen3MoeExperts``,
    ``AdaptedLinear4bit``) holding the same members plus the adapters, so ``isinstance``, the class's methods and
    its state-dict hooks (bitsandbytes' quantization state) all still work.
    """

    meta: dict

    def forward(self, *args, **kwargs):
        """The original forward, with the adapters' outputs added (see the class docstring)."""
        bindings = tuple({b.slot: b for b in self.meta[_STATE_KEY].bindings}.values())  # one call per slot
        if bindings[0].kind == "expert":
            weights = [(self._parameters[b.param], self._modules[b.slot], b.site, b.layout == "in_out")
                       for b in bindings]
            with ExpertRouting(weights):
                return super().forward(*args, **kwargs)
        if isinstance(self, nn.MultiheadAttention):  # q/k/v rows of in_proj_weight and out_proj, where they compute
            targets = [(self.get_parameter(b.param), b.rows, self._modules[b.slot]) for b in bindings]
            with RowRouting(targets):
                return super().forward(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if bindings[0].rows is not None:  # slices of a fused projection: each adds to its own output rows
            out = super().forward(*args, **kwargs)
            for b in bindings:
                delta = self._modules[b.slot](x).to(out.dtype)
                out = out + F.pad(delta, (b.rows[0], out.shape[-1] - b.rows[1]))
            return out
        adapter = self._modules[bindings[0].slot]
        if bindings[0].kind == "conv":  # (the convolution keeps only its input for backward: add in place)
            return super().forward(*args, **kwargs).add_(conv_delta(adapter, x, self))
        base = frozen_base_forward(self, super().forward, x)  # (no float copy of the weight kept for backward)
        return adapter.add_to(base, x)


_WRAPPED_CLASSES: dict[type, type] = {}


def _wrapped_owner_class(cls: type) -> type:
    if cls not in _WRAPPED_CLASSES:
        _WRAPPED_CLASSES[cls] = type(f"Adapted{cls.__name__}", (WrappedOwner, cls), {"__module__": __name__})
    return _WRAPPED_CLASSES[cls]


def build_wrapped_owner(current: nn.Module, adapters: dict[str, nn.Module], bindings: tuple[Binding, ...]) -> nn.Module:
    """The ``WrappedOwner`` for ``current`` (an experts module or a quantized linear, or an earlier rewritten one).

    Same members under the same names (so ``state_dict`` keys stay the original's), plus ``adapters``;
    the original class's attributes and methods (``num_experts``, ``_apply_gate``, ...) all still work.
    """
    state = owner_state(current)
    original = state.original if state is not None else current
    cls = _wrapped_owner_class(type(original))
    owner = cls.__new__(cls)
    owner.__dict__.update(current.__dict__)
    owner._parameters = dict(current._parameters)
    owner._buffers = dict(current._buffers)
    owner._non_persistent_buffers_set = set(current._non_persistent_buffers_set)
    owner._modules = {**current._modules, **adapters}
    _copy_hooks(current, owner)
    owner.__dict__["meta"] = {_STATE_KEY: OwnerState(original=original, bindings=bindings)}
    owner.train(current.training)  # the new adapters follow the layer's mode (their dropout is off in eval)
    return owner


def iter_owners(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """All rewritten owners in ``model`` as ``(path, module)``."""
    return [(path, m) for path, m in model.named_modules() if owner_state(m) is not None]


def iter_bindings(model: nn.Module, name: str | None = None) -> list[tuple[str, fx.GraphModule, Binding]]:
    """Every ``(owner path, owner, binding)`` in ``model`` (of the adapter ``name``, if given), in module order."""
    return [(path, gm, b) for path, gm in iter_owners(model) for b in owner_state(gm).bindings
            if name is None or b.name == name]


@dataclass(frozen=True)
class AdapterUnit:
    """One adapter and the base weight it updates: a site's adapter, or one expert's in an expert site.

    Attributes:
        site: The site path, plus ``.<e>`` for expert e of an expert site.
        owner: Module path of the owner.
        adapter: The adapter module (never an expert family: its experts one by one).
        weight: The base weight as ``(d_out, d_in)`` (a view of the owner's parameter; packed for a quantized one).
        quantized: The quantized linear owning the weight, or None (``base_weight()`` dequantizes it then).
    """

    site: str
    owner: str
    adapter: nn.Module
    weight: Tensor
    quantized: nn.Module | None = None

    def base_weight(self) -> Tensor:
        """The base weight as a float ``(d_out, d_in)``: the view itself, or a transient dequantized copy."""
        if self.quantized is None:
            return self.weight
        return dequantized_weight(self.quantized)


def base_weight(gm: nn.Module, b: Binding) -> Tensor:
    """The base weight a binding adapts, as float ``(d_out, d_in)`` (experts: ``(E, d_out, d_in)``).

    A quantized base is dequantized into a transient copy.
    """
    if b.quantization is None:
        weight = weight_out_in(gm.get_parameter(b.param), b.layout)
        return weight if b.rows is None else weight[b.rows[0]:b.rows[1]]
    return dequantized_weight(gm)


def iter_units(model: nn.Module, name: str | None = None) -> list[AdapterUnit]:
    """Every adapter of ``model`` (named ``name``, if given) one by one, expert sites expanded, in module order."""
    units = []
    for path, gm, b in iter_bindings(model, name):
        weight = weight_out_in(gm.get_parameter(b.param), b.layout)
        weight = weight if b.rows is None else weight[b.rows[0]:b.rows[1]]
        quantized = gm if b.quantization is not None else None
        for e, (suffix, adapter) in enumerate(gm.get_submodule(b.attr).units()):
            units.append(AdapterUnit(b.site + suffix, path, adapter, weight[e] if suffix else weight, quantized))
    return units
