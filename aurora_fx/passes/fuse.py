"""Fuse pass: each inlined adapter subgraph plus its ``add`` becomes one fused op call.

Pattern → check → rewrite:

* pattern: the ``add`` node tagged ``Role.SUM`` for an adapter attribute, and every node
  tagged with that attribute (the inlined ``adapter.forward``);
* check: the adapter's ``fusion()`` returns a ``Fusion`` (op, operands); a reason string means
  it stays unfused (AuroRA fuses cubic splines only; methods without a fused op never fuse);
* rewrite: ``add = base + Δ(x)`` → ``fusion.op(base, x, *params, *constants)``, e.g.
  ``aurora_fx.ops.aurora_delta(base, x, A, B, H, Ws, s, lo, h)`` (which picks the CPU op, the
  in-place no-grad variant or Triton at each call). The adapter's dropout node, if any, stays and
  feeds the op. Where ``base`` is a plain ``linear(x, W, b)`` on the adapter's input, the op takes
  the base linear over: ``fusion.linear_op(x, W, b, *params, *constants)``, with
  ``dropout=self.<attr>.dropout`` when the adapter has dropout (while it is active the base sees x
  and the adapter the dropped copy; in eval the dropout is the identity).

After (compare the unfused graph in ``insert_adapters``)::

    linear = torch._C._nn.linear(input, weight, bias)
    adapter_a = self.adapter.A
    ...
    aurora_delta = aurora_fx_ops_fused_aurora_delta(linear, input, adapter_a, adapter_b, adapter_h,
                                                    adapter_ws, 2.0, -1.0, 0.4)
    return aurora_delta
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import aurora_fx.ops  # noqa: F401  (registers torch.ops.aurora_fx)
from aurora_fx.methods.base import Fusion
from aurora_fx.passes.base import ADAPTER_TAG, ROLE, PassResult, Role, finish_graph, tag

__all__ = ["fuse_adapters", "can_fuse", "FUSED_OP", "FUSED_LORA_OP", "is_fused"]

FUSED_OP = torch.ops.aurora_fx.aurora_delta_add.default


def can_fuse(adapter: object) -> str | None:
    """None if ``adapter`` can use a fused op, else the reason why not."""
    fusion = adapter.fusion() if hasattr(adapter, "fusion") else f"{type(adapter).__name__} is not an adapter"
    return None if isinstance(fusion, Fusion) else fusion


def is_fused(gm: nn.Module, attr: str) -> bool:
    """Whether the adapter at ``attr`` runs as a fused op call in ``gm`` (never for an experts owner: no graph)."""
    if not isinstance(gm, fx.GraphModule):
        return False
    return any(n.meta.get(ADAPTER_TAG) == attr and n.meta.get(ROLE) == Role.FUSED for n in gm.graph.nodes)


FUSED_LORA_OP = torch.ops.aurora_fx.lora_delta_add.default


def _adapter_input(nodes: list[fx.Node], attr: str, param: str) -> fx.Node:
    """The x fed to the op: first argument of the linear whose weight is ``<attr>.<param>``."""
    for node in nodes:
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target == f"{attr}.{param}":
            return node.args[0]
    raise AssertionError(f"no {param} projection found for adapter {attr}")


def _plain_linear(base: fx.Node, x: fx.Node, attr: str) -> tuple | None:
    """``(input, weight, bias, dropout)`` of a base ``linear(input, W, b)`` the op can take over, else None.

    That needs get_attr W (and b), and the adapter's input ``x`` being that input up to a dtype cast
    and the adapter's own dropout (``dropout``: the ``<attr>.dropout`` module path, or None), which
    the op then applies to the adapter's input only.
    """
    if not (base.op == "call_function" and base.target in (F.linear, torch._C._nn.linear)) or base.kwargs:
        return None
    args = list(base.args) + [None] * (3 - len(base.args))
    inp, weight, bias = args[:3]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    dropout = None
    if x.op == "call_module" and x.target == f"{attr}.dropout":
        dropout, x = x.target, x.args[0]
    same = x is inp or (x.op == "call_method" and x.target == "to" and x.args[0] is inp)
    return (inp, weight, bias, dropout) if same else None


def _fuse_one(gm: fx.GraphModule, total: fx.Node, attr: str, fusion: Fusion) -> None:
    graph = gm.graph
    tagged = [n for n in graph.nodes if n.meta.get(ADAPTER_TAG) == attr and n is not total]
    x = _adapter_input(tagged, attr, fusion.input_param)
    base = total.args[0]
    linear = _plain_linear(base, x, attr) if fusion.linear_op is not None else None
    with graph.inserting_before(total):
        params = [graph.get_attr(f"{attr}.{name}") for name in fusion.params]
        if linear is not None:  # the base linear joins the op: one output, ∂L/∂x accumulated in place
            *operands, dropout = linear
            kwargs = {"dropout": graph.get_attr(dropout)} if dropout is not None else {}
            out = graph.call_function(fusion.linear_op, (*operands, *params, *fusion.constants), kwargs)
        else:
            out = graph.call_function(fusion.op, (base, x, *params, *fusion.constants))
    for node in out.all_input_nodes:
        if node.op == "get_attr" and str(node.target).startswith(f"{attr}."):  # the adapter's operands
            tag(node, attr, Role.FUSED)
    tag(out, attr, Role.SUM)
    total.replace_all_uses_with(out)
    graph.erase_node(total)
    # the inlined adapter's dead nodes (and, when the op took it over, the base linear): erased
    # from the last to the first, twice over, since erasing a user can free its inputs
    dead = [*tagged, base] if linear is not None else [n for n in tagged if n is not x]
    for _ in range(2):
        for node in reversed(dead):
            if node.graph is graph and not node.users and node in graph.nodes:
                graph.erase_node(node)


def fuse_adapters(gm: fx.GraphModule, attrs: Iterable[str] | None = None) -> PassResult:
    """Replace the unfused adapter subgraphs of ``attrs`` (default: all) by their fused ops.

    Returns:
        ``PassResult(gm, modified)``; adapters that fail ``can_fuse`` stay unfused.
    """
    wanted = None if attrs is None else set(attrs)
    sums = [n for n in gm.graph.nodes if n.meta.get(ROLE) == Role.SUM and n.op == "call_function"
            and n.target is operator.add]
    modified = False
    for total in sums:
        attr = total.meta[ADAPTER_TAG]
        fusion = gm.get_submodule(attr).fusion()
        if (wanted is None or attr in wanted) and isinstance(fusion, Fusion):
            _fuse_one(gm, total, attr, fusion)
            modified = True
    return PassResult(finish_graph(gm) if modified else gm, modified)
