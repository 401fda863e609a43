"""The one attach step: plan every owner, fill the adapter weights, commit.

``apply``, ``load_adapters``, ``load_peft_lora`` and ``from_pretrained`` are each
find → check → attach (README, *How it works*). ``attach`` builds every rewritten owner aside
(trace, build the adapters, insert, fuse), lets ``fill`` write weights into the new adapters,
and only then swaps the owners into the model, guards library fast paths and sets which
parameters train. A failure before the commit leaves the model exactly as it was.

Example:
    >>> table = aurora_fx.sites(model, "query|value")
    >>> requests = [SiteRequest(s, AuroraConfig()) for s in table.matched]
    >>> attach(model, requests, trainable=("classifier",))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import aurora_fx.methods  # noqa: F401, I001  (the built-in methods register themselves)
from aurora_fx.adapter_record import install_record_hooks
from aurora_fx.fastpaths import guard_fast_paths
from aurora_fx.methods.experts import ExpertAdapters
from aurora_fx.model_state import model_state, update_model_state
from aurora_fx.owners import (
    Binding,
    WrappedOwner,
    adapter_attr,
    build_owner,
    build_wrapped_owner,
    iter_bindings,
    owner_graph,
    owner_state,
    swap_module,
)
from aurora_fx.passes.check import require
from aurora_fx.passes.fuse import fuse_adapters, is_fused
from aurora_fx.passes.insert_adapters import copy_graph, insert_adapters
from aurora_fx.passes.pattern import Pattern, compile_pattern
from aurora_fx.records import SiteRequest
from aurora_fx.registry import build_adapter
from aurora_fx.tracing import get_submodule

__all__ = ["attach", "adapter_dtype", "OwnerPlan", "plan_owners", "resolve_trainable", "rebuild_owner", "Fill"]

Fill = Callable[[str, nn.Module], None]
"""``fill(site_path, adapter)`` writes weights into a freshly built adapter (may raise)."""


@dataclass(frozen=True)
class OwnerPlan:
    """A rewritten owner, built but not yet in the model."""

    path: str
    module: nn.Module  # a GraphModule, or a WrappedOwner (expert sites, quantized linears)
    new_bindings: tuple[Binding, ...]


def adapter_dtype(weight_dtype: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype adapters get: ``requested``, else float32 on a bf16/fp16 base, else the base's.

    Float32 keeps AdamW's updates on the tiny factors stable (like PEFT's ``autocast_adapter_dtype``).
    """
    if requested is not None:
        return requested
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def attach(model: nn.Module, requests: list[SiteRequest], fill: Fill | None = None,
           trainable: tuple[str, ...] | None = None, *, fuse: bool = True,
           dtype: torch.dtype | None = None) -> nn.Module:
    """Put the adapters of ``requests`` into ``model``: plan → fill → commit.

    Args:
        model: The model; changed only once every owner is planned and filled.
        requests: Checked site requests (``passes.check``); they are checked again here.
        fill: Writes weights into each new adapter (checkpoint loads); None keeps the init.
        trainable: Module paths that train besides the adapters (``resolve_trainable``); None
            keeps the model's current ones.
        fuse: Replace fusable adapter subgraphs by their fused ops.
        dtype: Adapter dtype (default: ``adapter_dtype`` of each base weight).

    Returns:
        ``model``.
    """
    require(requests)
    plans = plan_owners(model, requests, fuse, dtype)
    if fill is not None:
        for plan in plans:
            for b in plan.new_bindings:
                fill(b.site, plan.module.get_submodule(b.attr))
    current = model_state(model)
    kept = current.trainable_modules if current is not None else ()
    _commit(model, plans, kept if trainable is None else trainable)
    return model


def plan_owners(model: nn.Module, requests: list[SiteRequest], fuse: bool,
                dtype: torch.dtype | None = None) -> list[OwnerPlan]:
    """Build every rewritten owner for ``requests`` (the model is untouched)."""
    groups: dict[str, list[SiteRequest]] = {}
    for request in requests:
        groups.setdefault(request.site.owner, []).append(request)
    return [_plan_owner(model, path, group, fuse, dtype) for path, group in groups.items()]


def _plan_owner(model: nn.Module, path: str, requests: list[SiteRequest], fuse: bool,
                dtype: torch.dtype | None) -> OwnerPlan:
    current = get_submodule(model, path)
    _one_device(current, path)
    adapters, bindings = _new_adapters(current, requests, dtype)
    state = owner_state(current)
    old = state.bindings if state is not None else ()
    site = requests[0].site
    wrapped = site.kind in ("expert", "conv") or site.quantization is not None or site.rows is not None
    if wrapped or isinstance(current, nn.MultiheadAttention):
        return OwnerPlan(path, build_wrapped_owner(current, adapters, old + bindings), bindings)
    graph = copy_graph(current.graph) if state is not None else owner_graph(current)
    gm = build_owner(current, graph, adapters, old + bindings)
    gm = insert_adapters(gm, bindings).graph_module
    if fuse:
        gm = fuse_adapters(gm, [b.attr for b in bindings]).graph_module
    return OwnerPlan(path=path, module=gm, new_bindings=bindings)


def _one_device(current: nn.Module, path: str) -> None:
    devices = {p.device for p in current.parameters(recurse=False)}
    if len(devices) > 1:
        names = ", ".join(sorted(map(str, devices)))
        raise ValueError(f"{path or '<root>'} has parameters on several devices ({names}); "
                         f"move the module to one device before aurora_fx.apply")


def _new_adapters(current: nn.Module, requests: list[SiteRequest], dtype: torch.dtype | None
                  ) -> tuple[dict[str, nn.Module], tuple[Binding, ...]]:
    """A fresh adapter per request (an ``ExpertAdapters`` family for an expert site), and its binding."""
    adapters, bindings = {}, []
    for request in requests:
        site = request.site
        weight = current.get_parameter(site.param)
        slot = site.param if site.rows is None else site.path.rpartition("[")[2].rstrip("]")
        attr = adapter_attr(current, slot.replace(".weight", "").replace(".", "_"))
        stored = torch.float32 if site.quantization is not None else weight.dtype  # (a quantized base: float32)
        adapters[attr] = _build(request, weight, adapter_dtype(stored, dtype))
        bindings.append(Binding(site.path, site.param, attr, site.kind, site.layout, site.quantization, site.rows))
    return adapters, tuple(bindings)


def _build(request: SiteRequest, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    site, config = request.site, request.config
    one = lambda: build_adapter(config, site.in_features, site.out_features, device=weight.device,  # noqa: E731
                                dtype=dtype)
    if site.kind != "expert":
        return one()
    return ExpertAdapters([one() for _ in range(site.experts)], config)


def rebuild_owner(model: nn.Module, path: str) -> nn.Module:
    """Regenerate the owner at ``path``'s graph from its original forward and its adapters' graphs.

    An adapter whose ``trace_key()`` changed (an AROMA site that stopped computes its frozen factors
    only) gets its new graph. The owner stays the same module object, with the same parameters,
    buffers, adapters and hooks (wrappers such as FSDP2 hold on to it); only its code changes.
    """
    current = get_submodule(model, path)
    if isinstance(current, WrappedOwner):  # no graph: the routing calls the adapters as they are now
        return current
    state = owner_state(current)
    fused = [b.attr for b in state.bindings if is_fused(current, b.attr)]
    scratch = build_owner(current, owner_graph(state.original), {}, state.bindings)
    scratch = insert_adapters(scratch, state.bindings).graph_module
    if fused:
        scratch = fuse_adapters(scratch, fused).graph_module
    current.graph = scratch.graph  # the setter recompiles forward
    current.recompile()
    return current


def _commit(model: nn.Module, plans: list[OwnerPlan], trainable: tuple[str, ...]) -> None:
    """Swap the planned owners into ``model``, guard fast paths, freeze all but what trains."""
    update_model_state(model)  # snapshots requires_grad before the first change
    for plan in plans:
        swap_module(model, plan.path, plan.module)
    guard_fast_paths(model, [p.path for p in plans])
    _freeze_base(model, trainable)
    install_record_hooks(model)


def resolve_trainable(model: nn.Module, trainable_modules: Pattern) -> tuple[str, ...]:
    """Module paths that train besides the adapters: earlier ones plus ``trainable_modules``."""
    state = model_state(model)
    paths = state.trainable_modules if state is not None else ()
    if trainable_modules is None:
        return paths
    matcher = compile_pattern(trainable_modules)
    found = tuple(path for path, m in model.named_modules() if path and matcher(path, m))
    found = tuple(p for p in found if not any(p.startswith(q + ".") for q in found))  # the outermost only
    if not found:
        names = ", ".join(p for p, _ in model.named_children())
        raise ValueError(f"trainable_modules {matcher.describe()} matched no module "
                         f"(regex searched in module paths); top-level modules: {names}")
    return tuple(dict.fromkeys(paths + found))


def _freeze_base(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """Everything frozen but adapter parameters (of adapters that train) and ``trainable`` modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for path in trainable:
        for p in get_submodule(model, path).parameters():
            p.requires_grad_(True)
    for _, gm, binding in iter_bindings(model):
        for _, adapter in gm.get_submodule(binding.attr).units():
            for name in adapter.adapter_params():
                adapter.get_parameter(name).requires_grad_(adapter.trains)
    update_model_state(model, trainable_modules=trainable)
