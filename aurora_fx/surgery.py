"""The surgery verbs: ``apply``, ``unload``, ``merge`` and ``disable_adapters``.

``apply`` reads as its steps: config → find sites → select → plan each owner (trace, build,
insert, fuse) → commit → freeze. Nothing in the user's model changes until every owner has
been planned, so a failure leaves the model exactly as it was; the commit only swaps modules.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from aurora_fx.config import AdapterConfig, make_config
from aurora_fx.modules import build_adapter
from aurora_fx.owners import (
    adapter_attr,
    build_owner,
    guard_fast_paths,
    iter_owners,
    release_fast_paths,
    restore_original,
    swap_module,
)
from aurora_fx.passes.fuse import fuse_adapters
from aurora_fx.passes.insert_adapters import copy_graph, insert_adapters
from aurora_fx.passes.match import Pattern, compile_pattern, find_sites, owner_graph
from aurora_fx.records import Site, SiteTable
from aurora_fx.tracing import Binding, get_submodule, owner_state

__all__ = [
    "apply",
    "unload",
    "merge",
    "disable_adapters",
    "SiteRequest",
    "OwnerPlan",
    "plan_owners",
    "select_sites",
    "commit",
    "resolve_trainable",
]

_REQUIRES_GRAD = "_aurora_fx_requires_grad"
_TRAINABLE = "_aurora_fx_trainable_modules"


@dataclass(frozen=True)
class SiteRequest:
    """Put an adapter of ``config`` on ``site``."""

    site: Site
    config: AdapterConfig


@dataclass(frozen=True)
class OwnerPlan:
    """A rewritten owner, built but not yet in the model."""

    path: str
    module: fx.GraphModule
    new_bindings: tuple[Binding, ...]


def apply(
    model: nn.Module,
    pattern: Pattern,
    method: str = "aurora",
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    *,
    config: AdapterConfig | None = None,
    trainable_modules: Pattern = None,
    fuse: bool = True,
) -> nn.Module:
    """Put adapters on every linear-like site whose path matches ``pattern``.

    Each matched site's owner (the ``nn.Linear``/``Conv1D`` itself, or the module whose own
    forward calls ``F.linear``/``@`` on its parameter) becomes a GraphModule computing
    ``base(x) + adapter(x)``. The model keeps its class and methods (``generate``, ``config``,
    ``save_pretrained``, timm's ``default_cfg``). All base parameters are frozen; adapter
    parameters, and those of ``trainable_modules``, train.

    Args:
        model: Any ``nn.Module``; modified in place and returned.
        pattern: Regex **searched** (``re.search``) in site paths, a list of regexes, or a
            callable ``(path, owner_module) -> bool``. Dry-run with ``aurora_fx.sites``.
        method: ``"aurora"`` (default), ``"lora"`` or ``"aroma"``.
        rank: r̃ / r. Default: 2 (AuroRA), 8 (LoRA), 1 (AROMA).
        alpha: α; scale α/rank. Default: 4 (AuroRA), 16 (LoRA), 4 (AROMA).
        dropout: Adapter-input dropout. Default: 0.0 (AuroRA, LoRA), 0.1 (AROMA).
        config: A ready ``AuroraConfig``/``LoraConfig``/``AromaConfig`` instead of the above.
        trainable_modules: Pattern over module paths whose parameters also train (e.g. a new
            classification head: ``"classifier"``).
        fuse: Replace each AuroRA subgraph by the fused ``aurora_fx::aurora_delta`` op.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: Nothing matched (the message lists the candidates), a matched site cannot
            be adapted or already is, or a value is invalid.

    Example:
        >>> model = aurora_fx.apply(bert, pattern="query|value")   # AuroRA r̃=2, α=4
        >>> print(model.encoder.layer[0].attention.self.query.code)  # doctest: +SKIP
        def forward(self, input):
            ...
            linear = torch._C._nn.linear(input, weight, bias)
            aurora_delta = torch.ops.aurora_fx.aurora_delta.default(input, adapter_a, ...)
            add_1 = linear + aurora_delta
            return add_1
    """
    config = make_config(method, rank, alpha, dropout, config)
    table = find_sites(model, pattern)
    chosen = select_sites(table, pattern, config, model)
    trainable = resolve_trainable(model, trainable_modules)
    plans = plan_owners(model, [SiteRequest(site, config) for site in chosen], fuse)
    commit(model, plans, trainable)
    return model


def select_sites(table: SiteTable, pattern: Pattern, config: AdapterConfig,
                 model: nn.Module | None = None) -> list[Site]:
    """The matched sites, or a ValueError that says what went wrong and what to do."""
    matched = table.matched
    if model is not None:
        _check_matched_modules(model, table, pattern, bool(matched))
    if not matched:
        raise ValueError(_nothing_matched(table, pattern))
    problems = [f"{s.path}: {s.reason}" for s in matched if s.reason]
    problems += [f"{s.path}: already has an adapter ({s.adapted}); call aurora_fx.unload(model) first"
                 for s in matched if s.adapted and not s.reason]
    problems += [f"{s.path}: rank {config.rank} > min(in_features={s.in_features}, out_features={s.out_features})"
                 for s in matched if s.adaptable and config.rank > min(s.in_features, s.out_features)]
    if problems:
        raise ValueError(
            f"pattern {_describe(pattern)} matched {len(problems)} site(s) that cannot take this adapter:\n  "
            + "\n  ".join(problems) + "\nNarrow the pattern (aurora_fx.sites(model, pattern) shows every match)."
        )
    return list(matched)


def _is_quantized(module: nn.Module) -> bool:
    name = f"{type(module).__module__}.{type(module).__name__}".lower()
    return ".quantized" in name or "bitsandbytes" in name or "linear8bit" in name or "linear4bit" in name


def _check_matched_modules(model: nn.Module, table: SiteTable, pattern: Pattern, any_site: bool) -> None:
    """Refuse, with the reason, patterns that reach quantized or untraceable modules."""
    predicate = compile_pattern(pattern)
    quantized = [path for path, m in model.named_modules() if path and _is_quantized(m) and predicate(path, m)]
    if quantized:
        raise ValueError(f"pattern {_describe(pattern)} matches quantized module(s) {quantized[:5]}: integer or "
                         f"quantized bases are not supported; dequantize them (or load the float model) first")
    for u in table.untraceable:
        owner = get_submodule(model, u.path)
        names = [u.path] + [f"{u.path}.{p}" if u.path else p for p in u.params]
        if any(predicate(n, owner) for n in names):
            msg = (f"pattern {_describe(pattern)} reaches {u.path or '<root>'} ({u.module_type}), whose own forward "
                   f"torch.fx cannot trace alone ({u.error}); a linear map on its parameters ({', '.join(u.params)}) "
                   f"cannot be rewritten. Make that forward traceable, or target the nn.Linear children instead")
            if not any_site:
                raise ValueError(msg)
            warnings.warn(msg + " (the other matched sites are adapted)", stacklevel=4)


def _describe(pattern: Pattern) -> str:
    return repr(pattern) if not callable(pattern) else f"callable {getattr(pattern, '__name__', pattern)!r}"


def _nothing_matched(table: SiteTable, pattern: Pattern) -> str:
    paths = [s.path for s in table if s.adaptable]
    near = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.3) if isinstance(pattern, str) else []
    shown = ", ".join(paths[:40]) + (f", ... ({len(paths)} in all)" if len(paths) > 40 else "")
    msg = (f"pattern {_describe(pattern)} matched no site (a regex is searched in each site path with re.search). "
           f"Sites that could match: {shown or 'none'}.")
    if near:
        msg += f" Nearest names: {', '.join(near)}."
    if table.untraceable:
        names = ", ".join(f"{u.path} ({u.module_type})" for u in table.untraceable)
        msg += f" Not searched because torch.fx cannot trace them alone: {names}."
    return msg + " See aurora_fx.sites(model) for the full table."


def plan_owners(model: nn.Module, requests: list[SiteRequest], fuse: bool) -> list[OwnerPlan]:
    """Build every rewritten owner for ``requests`` (the model is untouched)."""
    groups: dict[str, list[SiteRequest]] = {}
    for request in requests:
        groups.setdefault(request.site.owner, []).append(request)
    return [_plan_owner(model, path, group, fuse) for path, group in groups.items()]


def _plan_owner(model: nn.Module, path: str, requests: list[SiteRequest], fuse: bool) -> OwnerPlan:
    current = get_submodule(model, path)
    state = owner_state(current)
    graph = copy_graph(current.graph) if state is not None else owner_graph(current)
    adapters, bindings = {}, []
    devices = {p.device for p in current.parameters(recurse=False)}
    if len(devices) > 1:
        names = ", ".join(sorted(map(str, devices)))
        raise ValueError(f"{path or '<root>'} has parameters on several devices ({names}); "
                         f"move the module to one device before aurora_fx.apply")
    for request in requests:
        site = request.site
        weight = current._parameters[site.param]
        attr = adapter_attr(current, site.param)
        adapters[attr] = build_adapter(request.config, site.in_features, site.out_features,
                                       device=weight.device, dtype=weight.dtype)
        bindings.append(Binding(site.path, site.param, attr, site.kind, site.layout))
    old = state.bindings if state is not None else ()
    gm = build_owner(current, graph, adapters, old + tuple(bindings))
    gm = insert_adapters(gm, bindings).graph_module
    if fuse:
        gm = fuse_adapters(gm, [b.attr for b in bindings]).graph_module
    return OwnerPlan(path=path, module=gm, new_bindings=tuple(bindings))


def commit(model: nn.Module, plans: list[OwnerPlan], trainable: tuple[str, ...]) -> None:
    """Swap the planned owners into ``model``, guard fast paths, freeze all but the adapters."""
    if not hasattr(model, _REQUIRES_GRAD):
        setattr(model, _REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
    for plan in plans:
        swap_module(model, plan.path, plan.module)
    guard_fast_paths(model, [p.path for p in plans])
    _freeze_base(model, trainable)


def resolve_trainable(model: nn.Module, trainable_modules: Pattern) -> tuple[str, ...]:
    """Module paths that train besides the adapters: earlier ones plus ``trainable_modules``."""
    paths = tuple(getattr(model, _TRAINABLE, ()))
    if trainable_modules is None:
        return paths
    predicate = compile_pattern(trainable_modules)
    found = tuple(path for path, m in model.named_modules() if path and predicate(path, m))
    if not found:
        names = ", ".join(p for p, _ in model.named_children())
        raise ValueError(f"trainable_modules {_describe(trainable_modules)} matched no module "
                         f"(regex searched in module paths); top-level modules: {names}")
    return tuple(dict.fromkeys(paths + found))


def _freeze_base(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """Everything frozen but adapter parameters and ``trainable`` modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for path in trainable:
        for p in get_submodule(model, path).parameters():
            p.requires_grad_(True)
    for _, gm in iter_owners(model):
        for binding in owner_state(gm).bindings:
            adapter = gm.get_submodule(binding.attr)
            for name in adapter.adapter_params():
                getattr(adapter, name).requires_grad_(_adapter_param_trains(adapter, name))
    setattr(model, _TRAINABLE, trainable)


def _adapter_param_trains(adapter: nn.Module, name: str) -> bool:
    return not getattr(adapter, "frozen", False)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter: the exact original modules come back (adapter weights are dropped).

    Parameters regain the ``requires_grad`` flags they had before the first ``apply``.
    """
    for path, gm in iter_owners(model):
        swap_module(model, path, restore_original(gm))
    release_fast_paths(model)
    flags = getattr(model, _REQUIRES_GRAD, None)
    if flags is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        delattr(model, _REQUIRES_GRAD)
    if hasattr(model, _TRAINABLE):
        delattr(model, _TRAINABLE)
    return model


@torch.no_grad()
def merge(model: nn.Module, lossy: bool = False) -> nn.Module:
    """Fold every adapter into its base weight, then ``unload``.

    Exact for LoRA and AROMA (``W ← W + ΔW``, computed in float32 or wider). AuroRA is
    nonlinear in x and refuses unless ``lossy=True``, which applies the paper's static merge
    ``W ← W + s·B·σ(Aᵀ)ᵀ`` (drops ``B·σ(0)``; outputs change). All adapters are checked before
    any weight changes.
    """
    updates = []
    for _, gm in iter_owners(model):
        for binding in owner_state(gm).bindings:
            delta = gm.get_submodule(binding.attr).delta_weight(lossy=lossy)  # raises for AuroRA
            weight = gm._parameters[binding.param]
            updates.append((weight, delta if binding.layout == "out_in" else delta.t()))
    for weight, delta in updates:
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
    return unload(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model for the duration of the block (the original modules are swapped in).

    Example:
        >>> with aurora_fx.disable_adapters(model):
        ...     base_logits = model(**batch).logits
    """
    owners = iter_owners(model)
    for path, gm in owners:
        swap_module(model, path, restore_original(gm))
    release_fast_paths(model)
    try:
        yield model
    finally:
        for path, gm in owners:
            swap_module(model, path, gm)
        guard_fast_paths(model, [p for p, _ in owners])
