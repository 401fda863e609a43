"""Find linear-like sites by scoped tracing, and match them against a pattern.

Pattern → check → record: every linear-like node (``F.linear``, ``addmm``, ``matmul``/``@``)
whose weight is a parameter of the module being traced is a candidate. This pass records the
facts about each site (parameter or buffer, dtype, shape, whether a parent's forward bypasses
its owner); ``passes.check.check`` alone decides whether it can be adapted, and its answer for
any adapter is shown in ``Site.reason``. The pattern rule is in ``passes/pattern.py``.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import textwrap
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aurora_fx.conv_sites import CONV_TYPES, conv_site
from aurora_fx.expert_sites import expert_count, expert_sites
from aurora_fx.fastpaths import GUARDED_READS
from aurora_fx.mha_sites import mha_sites
from aurora_fx.owners import WrappedOwner, owner_graph, owner_state
from aurora_fx.passes.base import ADAPTER_TAG
from aurora_fx.passes.check import check
from aurora_fx.passes.pattern import Matcher, Pattern, compile_pattern
from aurora_fx.quantized import quantization
from aurora_fx.records import Layout, Site, SiteKind, SiteTable, Untraceable
from aurora_fx.slice_sites import Slices, is_fused_layer, slice_sites
from aurora_fx.tracing import TraceError, hf_conv1d, iter_param_owners, join_path, param_dtype_ok

__all__ = ["LinearCall", "linear_calls", "find_sites"]

_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_MATMUL_FNS = {operator.matmul, torch.matmul, torch.mm}
_TRANSPOSE_DIMS = {(0, 1), (1, 0), (-1, -2), (-2, -1)}


@dataclass(frozen=True)
class LinearCall:
    """A linear-like node of an owner graph: ``node = x·W (+ b)`` with W a ``get_attr``."""

    node: fx.Node
    x: fx.Node
    attr: str
    layout: Layout
    op: str


def _weight_source(node: object) -> tuple[str, bool] | None:
    """``(attr, transposed)`` if ``node`` is a get_attr, or a 2-D transpose of one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target, False
    inner = node.args[0] if node.args else None
    if not (isinstance(inner, fx.Node) and inner.op == "get_attr"):
        return None
    rest = tuple(node.args[1:])
    is_t = (
        (node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)))
        or (node.op == "call_method" and node.target == "t" and not rest)
        or (node.op == "call_function" and node.target is torch.t)
        or (node.op in ("call_method", "call_function") and node.target in ("transpose", torch.transpose)
            and rest in _TRANSPOSE_DIMS)
        or (node.op == "call_method" and node.target == "permute" and rest in ((1, 0), ((1, 0),)))
    )
    return (inner.target, True) if is_t else None


def _fused_linear_targets() -> set:
    from aurora_fx.ops.fused import aurora_linear, lora_linear

    return {aurora_linear, lora_linear}


def _as_linear_call(node: fx.Node) -> LinearCall | None:
    """Recognise ``F.linear(x, W)``, ``addmm(b, x, W)`` and ``x @ W`` (W possibly transposed).

    The fused ops that took a base linear over (``aurora_linear(x, W, b, ...)``) count as its linear.
    """
    if node.op == "call_function" and node.target in _fused_linear_targets():
        weight = node.args[1]
        return LinearCall(node=node, x=node.args[0], attr=weight.target, layout="out_in", op="linear")
    if node.meta.get(ADAPTER_TAG) is not None:
        return None
    args = list(node.args)
    if node.op == "call_function" and node.target in _LINEAR_FNS:
        x, w, op, base = node.kwargs.get("input", args[0] if args else None), \
            node.kwargs.get("weight", args[1] if len(args) > 1 else None), "linear", "out_in"
    elif (node.op == "call_function" and node.target is torch.addmm) or (
        node.op == "call_method" and node.target == "addmm"
    ):
        x, w, op, base = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else None), "addmm", "in_out"
    elif (node.op == "call_function" and node.target in _MATMUL_FNS) or (
        node.op == "call_method" and node.target in ("matmul", "mm")
    ):
        x, w, op, base = (args[0] if args else None), (args[1] if len(args) > 1 else None), "matmul", "in_out"
    else:
        return None
    source = _weight_source(w)
    if source is None or not isinstance(x, fx.Node) or x.op == "get_attr":
        return None
    attr, transposed = source
    layout = base if not transposed else ("in_out" if base == "out_in" else "out_in")
    return LinearCall(node=node, x=x, attr=attr, layout=layout, op=op)


def linear_calls(graph: fx.Graph) -> list[LinearCall]:
    """All linear-like calls on ``get_attr`` weights in ``graph``, in graph order."""
    return [call for node in graph.nodes if (call := _as_linear_call(node)) is not None]


def _site_kind(owner: nn.Module, attr: str) -> SiteKind:
    conv1d = hf_conv1d()
    if attr == "weight" and isinstance(owner, nn.Linear):
        return "linear"
    if attr == "weight" and conv1d is not None and isinstance(owner, conv1d):
        return "conv1d"
    return "functional"


def _site_path(owner_path: str, attr: str) -> str:
    return owner_path if attr == "weight" else join_path(owner_path, attr)


def _owner_sites(owner_path: str, owner: nn.Module, graph: fx.Graph) -> tuple[list[Site], set[str]]:
    """Sites of one owner's graph, and the child parameters it reads directly (bypasses)."""
    state = owner_state(owner)
    grouped: dict[str, list[LinearCall]] = {}
    bypassed: set[str] = set()
    for call in linear_calls(graph):
        if "." in call.attr:
            bypassed.add(join_path(owner_path, call.attr.rsplit(".", 1)[0]))
        else:
            grouped.setdefault(call.attr, []).append(call)
    sites = []
    for attr, calls in grouped.items():
        param = owner._parameters.get(attr)
        if param is None:
            continue
        shape = tuple(param.shape) if param.dim() == 2 else (0, 0)
        d_out, d_in = shape if calls[0].layout == "out_in" else shape[::-1]
        binding = state.binding(attr) if state is not None else None
        sites.append(Site(
            path=_site_path(owner_path, attr), owner=owner_path, param=attr,
            kind=_site_kind(state.original if state is not None else owner, attr),
            op=calls[0].op, layout=calls[0].layout, in_features=d_in, out_features=d_out,
            dtype=str(param.dtype), calls=len(calls), adapted=_adapted_method(owner, binding),
            owner_type=type(state.original if state is not None else owner).__name__,
            is_parameter=isinstance(param, nn.Parameter), floating=param_dtype_ok(param), ndim=param.dim(),
        ))
    return sites, bypassed


def _original_type(owner: nn.Module) -> str:
    state = owner_state(owner)
    return type(state.original if state is not None else owner).__name__


def _quantized_site(path: str, owner: nn.Linear) -> Site:
    return Site(path=path, owner=path, param="weight", kind="linear", op="linear", layout="out_in",
                in_features=owner.in_features, out_features=owner.out_features, dtype=str(owner.weight.dtype),
                adapted=_adapted_params(owner).get("weight"), owner_type=_original_type(owner),
                quantization=quantization(owner))


def _adapted_sites(owner: nn.Module) -> dict[str, str]:
    state = owner_state(owner)
    return {} if state is None else {b.site: owner.get_submodule(b.attr).method for b in state.bindings}


def _adapted_slices(owner: nn.Module) -> dict[str, str]:
    state = owner_state(owner)
    return {} if state is None else {b.site: owner.get_submodule(b.attr).method for b in state.bindings if b.rows}


def _adapted_params(owner: nn.Module) -> dict[str, str]:
    state = owner_state(owner)
    return {} if state is None else {b.param: owner.get_submodule(b.attr).method for b in state.bindings}


def _adapted_method(owner: nn.Module, binding: object) -> str | None:
    return None if binding is None else owner.get_submodule(binding.attr).method


_CHILD_WEIGHT_READ = re.compile(r"self\.(\w+)\.(?:weight|bias)\b")


@functools.lru_cache(maxsize=512)
def _children_read_in_forward(cls: type) -> frozenset[str]:
    """Children whose weight/bias ``cls.forward`` reads directly (a scan of its source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):  # built-in or generated code: nothing to scan
        return frozenset()
    guarded = set().union(*(names for base, names in GUARDED_READS.items() if issubclass(cls, base)))
    return frozenset(set(_CHILD_WEIGHT_READ.findall(source)) - guarded)


def _bypass_reason(parent_path: str, parent: nn.Module, child: str) -> str:
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return (f"nn.MultiheadAttention at {parent_path or '<root>'} computes out_proj from out_proj.weight "
                f"directly and never calls out_proj, so an adapter there would be silently bypassed")
    return (f"{type(parent).__name__}.forward at {parent_path or '<root>'} reads {child}.weight directly, so an "
            f"adapter on {child} could be silently bypassed")


def _known_bypasses(model: nn.Module) -> dict[str, str]:
    """Children whose weights their parent's forward reads directly (it may never call them)."""
    out = {}
    for path, module in model.named_modules():
        if owner_state(module) is not None or isinstance(module, nn.MultiheadAttention):  # (MHA: mha_sites.py)
            continue
        for child in _children_read_in_forward(type(module)):
            if isinstance(module._modules.get(child), nn.Module):
                out[join_path(path, child)] = _bypass_reason(path, module, child)
    return out


def find_sites(model: nn.Module, pattern: Pattern | Matcher = None, *, include_all: bool = False,
               slices: Slices | None = None) -> SiteTable:
    """Dry run: every linear-like site of ``model``, whether ``pattern`` matches it, and why not.

    Args:
        model: Any ``nn.Module`` (HF, timm, plain PyTorch). Nothing is modified.
        pattern: Regex searched in site paths, list of regexes, callable, a compiled ``Matcher``,
            or None.
        include_all: Also print the untraceable owners that hold no linear-like (2-D floating)
            weight, such as norms (they are always in ``.untraceable``).
        slices: Output-row blocks of fused projections as their own sites (``aurora_fx.slice_sites``), beside the
            known layouts (``qkv``, ``c_attn``, ``qkv_proj``).

    Returns:
        A ``SiteTable``: ``Site`` records in module order, plus the parameter-owning modules
        that torch.fx could not trace alone (``.untraceable``).

    Example:
        >>> table = find_sites(bert, "query|value")
        >>> [s.path for s in table.matched][:2]
        ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
    matcher = compile_pattern(pattern)
    sites: list[Site] = []
    untraceable: list[Untraceable] = []
    bypassed = _known_bypasses(model)
    claimed: set[str] = set()
    for path, owner in iter_param_owners(model):
        if path in claimed:  # an MHA's out_proj: a site of the MHA itself
            continue
        if isinstance(owner, nn.MultiheadAttention):  # q/k/v/out computed inside F.multi_head_attention_forward
            sites.extend(mha_sites(path, owner, _adapted_sites(owner), _original_type(owner)))
            claimed.add(join_path(path, "out_proj"))
            continue
        if expert_count(owner) is not None:  # a data-dependent forward: read from what it declares
            sites.extend(expert_sites(path, owner, _adapted_params(owner)))
            continue
        if quantization(owner) is not None:  # the quantizer's own forward stays the base
            sites.append(_quantized_site(path, owner))
            continue
        if isinstance(owner, CONV_TYPES):  # a linear map on input patches, around the module's own forward
            sites.append(conv_site(path, owner, _adapted_params(owner).get("weight"), _original_type(owner)))
            continue
        try:
            graph = owner_graph(owner_state(owner).original if isinstance(owner, WrappedOwner) else owner)
        except TraceError as exc:
            untraceable.append(_untraceable(path, owner, exc))
            continue
        owner_sites, reads = _owner_sites(path, owner, graph)
        sites.extend(owner_sites)
        if is_fused_layer(owner):
            sites.extend(s for site in owner_sites for s in slice_sites(site, slices, _adapted_slices(owner)))
        for child in reads:
            bypassed.setdefault(child, f"its parent {path or '<root>'} reads {child}'s weight directly and never "
                                       f"calls it, so an adapter there would be silently bypassed")
    wholes = {s.path for s in sites if s.rows is None}
    sites = [_finish(s, bypassed, matcher, model, wholes) for s in sites]
    return SiteTable(tuple(sites), tuple(untraceable), matcher.text, include_all)


def _untraceable(path: str, owner: nn.Module, exc: TraceError) -> Untraceable:
    own = {n: p for n, p in owner._parameters.items() if p is not None}
    linear_like = any(p.dim() == 2 and param_dtype_ok(p) for p in own.values())
    return Untraceable(path, type(owner).__name__, tuple(own), str(exc), linear_like)


def _finish(site: Site, bypassed: dict[str, str], matcher: Matcher, model: nn.Module, wholes: set[str]) -> Site:
    owner = model.get_submodule(site.owner) if site.owner else model
    whole = site.path.partition("[")[0]
    whole_matched = site.rows is not None and whole in wholes and matcher(whole, owner)  # (slice_sites.py)
    matched = matcher(site.path, owner) and not whole_matched
    named = _adapted_names(owner, site.path)
    site = replace(site, bypass=bypassed.get(whole), matched=matched, adapted_names=tuple(named))
    if len(named) > 1:  # several named adapters here: each method with its name
        site = replace(site, adapted=", ".join(f"{method}:{name}" for name, method in named.items()))
    return replace(site, reason=check(site))


def _adapted_names(owner: nn.Module, path: str) -> dict[str, str]:
    """Name → method of the adapters at ``path``, in the order they were added."""
    state = owner_state(owner)
    return {} if state is None else {b.name: owner.get_submodule(b.attr).method for b in state.bindings
                                     if b.site == path}
