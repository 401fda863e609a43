"""Find linear-like sites by scoped tracing, and match them against a pattern.

Pattern → check → record: every linear-like node (``F.linear``, ``addmm``, ``matmul``/``@``)
whose weight is a parameter of the module being traced is a candidate; checks attach a reason
when the site cannot be adapted (integer weight, a parent that bypasses the child's forward,
a forward that branches on ``self.training``, ...).

Pattern rule (documented loudly, unlike PEFT's full match): a string is a Python regex
**searched** in the site path with ``re.search``; ``"attn.*proj"`` matches
``blocks.0.attn.proj`` but not timm's fused ``blocks.0.attn.qkv``. Anchor with ``^…$`` for an
exact match. A list of regexes matches if any does; a callable ``(path, module) -> bool``
decides itself (``module`` is the owner).
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aurora_fx.records import Site, SiteTable, Untraceable
from aurora_fx.tracing import (
    TraceError,
    iter_param_owners,
    join_path,
    owner_state,
    param_dtype_ok,
    trace_owner,
)

__all__ = ["Pattern", "LinearCall", "compile_pattern", "linear_calls", "find_sites", "owner_graph"]

Pattern = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
ADAPTER_TAG = "aurora_fx_adapter"  # node.meta key on nodes inserted for an adapter

_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_MATMUL_FNS = {operator.matmul, torch.matmul, torch.mm}
_TRANSPOSE_DIMS = {(0, 1), (1, 0), (-1, -2), (-2, -1)}


@dataclass(frozen=True)
class LinearCall:
    """A linear-like node of an owner graph: ``node = x·W (+ b)`` with W a ``get_attr``."""

    node: fx.Node
    x: fx.Node
    attr: str
    layout: str
    op: str


def compile_pattern(pattern: Pattern) -> Callable[[str, nn.Module], bool]:
    """Turn a pattern into a predicate ``(path, owner) -> bool`` (see the module docstring).

    Raises:
        ValueError: An invalid regex (the message names it and the regex error).
        TypeError: Not a str, list of str, callable or None.
    """
    if pattern is None:
        return lambda path, module: False
    if callable(pattern):
        return lambda path, module: bool(pattern(path, module))
    regexes = [pattern] if isinstance(pattern, str) else list(pattern) if isinstance(pattern, (list, tuple)) else None
    if not regexes or not all(isinstance(p, str) for p in regexes):
        raise TypeError(
            f"pattern must be a regex string, a list of regex strings or a callable (path, module) -> bool, "
            f"got {pattern!r}"
        )
    compiled = []
    for p in regexes:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(
                f"invalid regex {p!r} in pattern: {exc}; patterns are Python regexes searched in module paths "
                f"(re.search), e.g. 'attn.*proj' or 'query|value'; use re.escape() for literal names"
            ) from None
    return lambda path, module: any(c.search(path) for c in compiled)


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


def _as_linear_call(node: fx.Node) -> LinearCall | None:
    """Recognise ``F.linear(x, W)``, ``addmm(b, x, W)`` and ``x @ W`` (W possibly transposed)."""
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


def owner_graph(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s own forward: its current graph if already rewritten, else traced.

    Stock forwards (Linear, Conv1D, LayerNorm, Embedding) come from a per-class cache. Other
    modules are traced in train and eval mode; a difference raises ``TraceError`` because one
    static graph would be wrong in the other mode.
    """
    if owner_state(module) is not None:
        return module.graph
    if type(module).forward in _MODE_FREE_FORWARDS():
        return copy.deepcopy(_stock_graph(module))
    graph = trace_owner(module)
    module.training = not module.training  # a custom forward must not depend on the mode
    try:
        other = trace_owner(module)
    finally:
        module.training = not module.training
    if other.python_code("self").src != graph.python_code("self").src:
        raise TraceError("its forward branches on self.training, so one traced graph cannot serve both modes")
    return graph


_STOCK_GRAPHS: dict[tuple, fx.Graph] = {}


def _stock_graph(module: nn.Module) -> fx.Graph:
    """Traced graph of a stock forward (Linear, Conv1D, ...), cached per class and baked-in values.

    The key holds which parameters exist (``bias=None`` changes the graph) and the plain
    attributes the trace may bake in as constants (Conv1D's ``nf``).
    """
    plain = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))))
    key = (type(module), tuple(n for n, p in module._parameters.items() if p is not None), plain)
    graph = _STOCK_GRAPHS.get(key)
    if graph is None:
        graph = _STOCK_GRAPHS[key] = trace_owner(module)
    return graph


def _MODE_FREE_FORWARDS() -> set:  # noqa: N802 - constant-like, built lazily (transformers import)
    forwards = {nn.Linear.forward, nn.LayerNorm.forward, nn.Embedding.forward}
    conv1d = _hf_conv1d()
    if conv1d is not None:
        forwards.add(conv1d.forward)
    return forwards


def _hf_conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional at this level
        return None
    return Conv1D


def _site_kind(owner: nn.Module, attr: str) -> str:
    conv1d = _hf_conv1d()
    if attr == "weight" and isinstance(owner, nn.Linear):
        return "linear"
    if attr == "weight" and conv1d is not None and isinstance(owner, conv1d):
        return "conv1d"
    return "functional"


def _site_path(owner_path: str, attr: str) -> str:
    return owner_path if attr == "weight" else join_path(owner_path, attr)


def _site_reason(param: object) -> str | None:
    if not isinstance(param, nn.Parameter):
        return "the weight is a buffer, not an nn.Parameter"
    if not param_dtype_ok(param):
        return (f"weight dtype {param.dtype} is not floating point; integer or quantized bases are not "
                f"supported, dequantize the layer first")
    if param.dim() != 2:
        return f"the weight is {param.dim()}-D; only 2-D weights are linear sites"
    return None


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
            path=_site_path(owner_path, attr), owner=owner_path, param=attr, kind=_site_kind(owner, attr),
            op=calls[0].op, layout=calls[0].layout, in_features=d_in, out_features=d_out,
            dtype=str(param.dtype), calls=len(calls), reason=_site_reason(param),
            adapted=_adapted_method(owner, binding),
        ))
    return sites, bypassed


def _adapted_method(owner: nn.Module, binding: object) -> str | None:
    if binding is None:
        return None
    return getattr(owner, binding.attr).config.method


_CHILD_WEIGHT_READ = re.compile(r"self\.(\w+)\.(?:weight|bias)\b")
# Parents whose direct weight reads sit on a fast path that apply() switches off (owners.py).
_GUARDED_READS = {nn.TransformerEncoderLayer: {"linear1", "linear2"}}


@functools.lru_cache(maxsize=512)
def _children_read_in_forward(cls: type) -> frozenset[str]:
    """Children whose weight/bias ``cls.forward`` reads directly (a scan of its source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):  # built-in or generated code: nothing to scan
        return frozenset()
    guarded = set().union(*(names for base, names in _GUARDED_READS.items() if issubclass(cls, base)))
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
        if owner_state(module) is not None:
            continue
        for child in _children_read_in_forward(type(module)):
            if isinstance(module._modules.get(child), nn.Module):
                out[join_path(path, child)] = _bypass_reason(path, module, child)
    return out


def find_sites(model: nn.Module, pattern: Pattern = None) -> SiteTable:
    """Dry run: every linear-like site of ``model``, whether ``pattern`` matches it, and why not.

    Args:
        model: Any ``nn.Module`` (HF, timm, plain PyTorch). Nothing is modified.
        pattern: Regex searched in site paths, list of regexes, callable, or None.

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
    predicate = compile_pattern(pattern)
    sites: list[Site] = []
    untraceable: list[Untraceable] = []
    bypassed = _known_bypasses(model)
    for path, owner in iter_param_owners(model):
        try:
            graph = owner_graph(owner)
        except TraceError as exc:
            own = tuple(n for n, p in owner._parameters.items() if p is not None)
            untraceable.append(Untraceable(path, type(owner).__name__, own, str(exc)))
            continue
        owner_sites, reads = _owner_sites(path, owner, graph)
        sites.extend(owner_sites)
        for child in reads:
            bypassed.setdefault(child, f"its parent {path or '<root>'} reads {child}'s weight directly and never "
                                       f"calls it, so an adapter there would be silently bypassed")
    sites = [_finish(s, bypassed, predicate, model) for s in sites]
    return SiteTable(tuple(sites), tuple(untraceable), pattern if isinstance(pattern, str) else None)


def _finish(site: Site, bypassed: dict[str, str], predicate, model: nn.Module) -> Site:
    owner = model.get_submodule(site.owner) if site.owner else model
    reason = site.reason or bypassed.get(site.path)
    return replace(site, reason=reason, matched=predicate(site.path, owner))
