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
from dataclasses import dataclass, replace

import torch
from torch import nn

import aurora_fx.methods  # noqa: F401, I001  (the built-in methods register themselves)
from aurora_fx.adapter_record import install_record_hooks
from aurora_fx.adapter_set import AdapterSet
from aurora_fx.fastpaths import guard_fast_paths
from aurora_fx.methods.experts import ExpertAdapters
from aurora_fx.model_state import model_state, update_model_state
from aurora_fx.named import DEFAULT, adapter_names, check_name, set_trainable, sync_sets
from aurora_fx.owners import (
    Binding,
    WrappedOwner,
    adapter_attr,
    build_owner,
    build_wrapped_owner,
    iter_owners,
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

    The requests' adapter name (one per call) joins the model's names; with more than one name every adapted
    slot of the model holds an ``AdapterSet`` (``aurora_fx.named``), and the new name becomes the active one.

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
    name = _request_name(requests)
    names = tuple(dict.fromkeys((*adapter_names(model), name)))
    plans = plan_owners(model, requests, fuse, dtype, names)
    if fill is not None:
        for plan in plans:
            for b in plan.new_bindings:
                fill(b.site, plan.module.get_submodule(b.attr))
    current = model_state(model)
    kept = current.trainable_modules if current is not None else ()
    _commit(model, plans, kept if trainable is None else trainable, names, name)
    return model


def _request_name(requests: list[SiteRequest]) -> str:
    names = {r.name for r in requests}
    if len(names) != 1:
        raise ValueError(f"one attach adds one adapter name; got {sorted(names)}")
    return check_name(names.pop())


def plan_owners(model: nn.Module, requests: list[SiteRequest], fuse: bool,
                dtype: torch.dtype | None = None, names: tuple[str, ...] = (DEFAULT,)) -> list[OwnerPlan]:
    """Build every rewritten owner for ``requests`` (the model is untouched).

    With several adapter ``names``, owners whose slots still hold a single adapter are rebuilt too (their
    adapters move into ``AdapterSet``s).
    """
    groups: dict[str, list[SiteRequest]] = {}
    for request in requests:
        groups.setdefault(request.site.owner, []).append(request)
    if len(names) > 1:
        for path, owner in iter_owners(model):
            if path not in groups and not all(isinstance(owner._modules[b.slot], AdapterSet)
                                              for b in owner_state(owner).bindings):
                groups[path] = []
    return [_plan_owner(model, path, group, fuse, dtype, names) for path, group in groups.items()]


def _plan_owner(model: nn.Module, path: str, requests: list[SiteRequest], fuse: bool,
                dtype: torch.dtype | None, names: tuple[str, ...]) -> OwnerPlan:
    current = get_submodule(model, path)
    _one_device(current, path)
    adapters, bindings = _new_adapters(current, requests, dtype)
    state = owner_state(current)
    old = state.bindings if state is not None else ()
    if len(names) > 1:
        return _plan_sets(current, path, adapters, old, bindings, names)
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


def _plan_sets(current: nn.Module, path: str, adapters: dict[str, nn.Module], old: tuple[Binding, ...],
               new: tuple[Binding, ...], names: tuple[str, ...]) -> OwnerPlan:
    """The owner with every slot an ``AdapterSet`` holding its named adapters (old ones shared, not copied)."""
    members: dict[str, dict[str, nn.Module]] = {}
    for b in old:
        members.setdefault(b.slot, {})[b.name] = current.get_submodule(b.attr)
    for b in new:
        members.setdefault(b.attr, {})[b.name] = adapters[b.attr]
    _refuse_set_kinds(path, current, old + new, [a for group in members.values() for a in group.values()])
    sets = {slot: AdapterSet(group, names) for slot, group in members.items()}
    old = tuple(replace(b, attr=f"{b.slot}.{b.name}") for b in old)
    new = tuple(replace(b, attr=f"{b.attr}.{b.name}") for b in new)
    if isinstance(current, WrappedOwner) or any(b.quantization is not None or b.rows is not None for b in new):
        return OwnerPlan(path, build_wrapped_owner(current, sets, old + new), new)
    original = owner_state(current).original if owner_state(current) is not None else current
    gm = build_owner(current, owner_graph(original), sets, old + new)
    gm = insert_adapters(gm, old + new).graph_module  # (no fuse pass: a set never fuses)
    return OwnerPlan(path=path, module=gm, new_bindings=new)


def _refuse_set_kinds(path: str, current: nn.Module, bindings: tuple[Binding, ...], adapters: list[nn.Module]
                      ) -> None:
    """Named adapters (several names) run on linear, functional, slice and quantized sites only, so far."""
    bad = next((b for b in bindings if b.kind in ("expert", "conv")), None)
    if bad is None and (isinstance(current, nn.MultiheadAttention)
                        or any(getattr(a, "reads_base_weight", False) for a in adapters)):
        bad = bindings[0]
    if bad is not None:
        site = bad.site
        raise ValueError(f"several adapter names cannot share the model while {site} ({path or '<root>'}) holds an "
                         f"adapter: named adapters run on linear, functional, fused-projection slice and quantized "
                         f"sites, not yet on expert, convolution or nn.MultiheadAttention sites (or methods that "
                         f"read the base weight). Keep one name on this model, or leave these sites out of the "
                         f"pattern")


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
        bindings.append(Binding(site.path, site.param, attr, site.kind, site.layout, site.quantization, site.rows,
                                request.name))
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


def _commit(model: nn.Module, plans: list[OwnerPlan], trainable: tuple[str, ...], names: tuple[str, ...],
            name: str) -> None:
    """Swap the planned owners into ``model``, guard fast paths, freeze all but what trains."""
    update_model_state(model)  # snapshots requires_grad before the first change
    for plan in plans:
        swap_module(model, plan.path, plan.module)
    update_model_state(model, names=names, active=(name,))
    sync_sets(model)
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
    set_trainable(model)
    update_model_state(model, trainable_modules=trainable)
