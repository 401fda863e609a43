"""Fuse pass: each inlined AuroRA subgraph plus its ``add`` becomes one fused op call.

Pattern → check → rewrite:

* pattern: the ``add`` node tagged ``aurora_fx_role == "sum"`` for an adapter attribute, and
  every node tagged with that attribute (the inlined ``adapter.forward``);
* check: the adapter is an ``AuroraAdapter`` with a cubic spline (the kernel's only order);
  anything else stays unfused;
* rewrite: ``add = base + Δ(x)`` → ``aurora_delta_add(base, x, A, B, H, Ws, s, lo, h)[0]``.
  The adapter's dropout node, if any, stays and feeds the op.

After (compare the unfused graph in ``insert_adapters``)::

    linear = torch._C._nn.linear(input, weight, bias)
    adapter_a = self.adapter.A
    ...
    aurora_delta_add = torch.ops.aurora_fx.aurora_delta_add.default(linear, input, adapter_a,
                                                                     adapter_b, adapter_h,
                                                                     adapter_ws, 2.0, -1.0, 0.4)
    getitem = aurora_delta_add[0]
    return getitem
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

import aurora_fx.ops  # noqa: F401  (registers torch.ops.aurora_fx)
from aurora_fx.modules import AuroraAdapter
from aurora_fx.ops.aurora_delta import ORDER
from aurora_fx.passes.base import PassResult, finish_graph
from aurora_fx.passes.match import ADAPTER_TAG

__all__ = ["fuse_adapters", "can_fuse", "FUSED_OP"]

FUSED_OP = torch.ops.aurora_fx.aurora_delta_add.default
_ROLE = "aurora_fx_role"


def can_fuse(adapter: object) -> str | None:
    """None if ``adapter`` can use the fused op, else the reason why not."""
    if not isinstance(adapter, AuroraAdapter):
        return f"{type(adapter).__name__} has no fused op (only AuroRA is fused)"
    if adapter.order != ORDER:
        return f"spline_order {adapter.order}: the fused kernel implements cubic splines only"
    return None


def _adapter_input(nodes: list[fx.Node], attr: str) -> fx.Node:
    """The x fed to A: first argument of the linear whose weight is ``<attr>.A``."""
    for node in nodes:
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target == f"{attr}.A":
            return node.args[0]
    raise AssertionError(f"no A projection found for adapter {attr}")


def _fuse_one(gm: fx.GraphModule, total: fx.Node, attr: str, adapter: AuroraAdapter) -> None:
    graph = gm.graph
    tagged = [n for n in graph.nodes if n.meta.get(ADAPTER_TAG) == attr and n is not total]
    x = _adapter_input(tagged, attr)
    base = total.args[0]
    lo, _ = adapter.config.grid_range
    with graph.inserting_before(total):
        params = [graph.get_attr(f"{attr}.{name}") for name in ("A", "B", "H", "Ws")]
        fused = graph.call_function(FUSED_OP, (base, x, *params, adapter.scale, lo, adapter.config.grid_step))
        out = graph.call_function(operator.getitem, (fused, 0))
    for node in (*params, fused):
        node.meta = {ADAPTER_TAG: attr, _ROLE: "fused"}
    out.meta = {ADAPTER_TAG: attr, _ROLE: "sum"}
    total.replace_all_uses_with(out)
    graph.erase_node(total)
    for node in reversed(tagged):
        if node is not x and not node.users:
            graph.erase_node(node)


def fuse_adapters(gm: fx.GraphModule, attrs: Iterable[str] | None = None) -> PassResult:
    """Replace the unfused AuroRA subgraphs of ``attrs`` (default: all) by the fused op.

    Returns:
        ``PassResult(gm, modified)``; adapters that fail ``can_fuse`` stay unfused.
    """
    wanted = None if attrs is None else set(attrs)
    sums = [n for n in gm.graph.nodes if n.meta.get(_ROLE) == "sum" and n.op == "call_function"
            and n.target is operator.add]
    modified = False
    for total in sums:
        attr = total.meta[ADAPTER_TAG]
        adapter = gm.get_submodule(attr)
        if (wanted is None or attr in wanted) and can_fuse(adapter) is None:
            _fuse_one(gm, total, attr, adapter)
            modified = True
    return PassResult(finish_graph(gm) if modified else gm, modified)
