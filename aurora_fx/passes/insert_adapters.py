"""Rewrite pass: every bound linear node ``y = W·x`` becomes ``y + adapter(x)``.

The adapter's own ``forward`` is traced once per config and its graph inlined after the base
node, so the owner's graph shows the whole adapter subgraph (A, the ANL branches, B, scale),
each inlined node tagged with ``node.meta["aurora_fx_adapter"] = <adapter attribute>``.

Before (an ``nn.Linear`` traced alone)::

    def forward(self, input):
        weight = self.weight
        bias = self.bias
        linear = torch._C._nn.linear(input, weight, bias)
        return linear

After (AuroRA, dropout 0)::

    def forward(self, input):
        weight = self.weight
        bias = self.bias
        linear = torch._C._nn.linear(input, weight, bias)
        adapter_a = self.adapter.A
        linear_1 = torch._C._nn.linear(input, adapter_a)
        tanh = torch.tanh(linear_1)
        ...
        mul = linear_4 * 2.0
        add_1 = linear + mul
        return add_1
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import replace

import torch.fx as fx
from torch import nn

from aurora_fx.ops.dropout import InputDropout
from aurora_fx.owners import Binding
from aurora_fx.passes.base import PassResult, Role, finish_graph, tag
from aurora_fx.passes.match import linear_calls

__all__ = ["insert_adapters", "adapter_graph", "inline_adapter"]


def adapter_graph(adapter: nn.Module) -> fx.Graph:
    """The fx graph of ``adapter.forward`` (cached per ``adapter.trace_key()``).

    Its ``get_attr``/``call_module`` targets are relative to the adapter; tensors (buffers included) are
    read at run time, so one graph serves adapters of every dtype.
    """
    key = adapter.trace_key()
    cached = _GRAPH_CACHE.get(key)
    if cached is None:
        cached = _AdapterTracer().trace(adapter)
        _GRAPH_CACHE[key] = cached
    return cached


class _AdapterTracer(fx.Tracer):
    """fx's default leaves (``torch.nn`` modules), plus the adapters' ``InputDropout``.

    Buffers are read through ``get_attr`` like parameters (fx's default bakes a buffer into the graph as a
    constant, so ``x.to(self.U.dtype)`` would keep the dtype the model had when it was adapted).
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, InputDropout) or super().is_leaf_module(m, module_qualified_name)


_GRAPH_CACHE: dict[tuple[type, object], fx.Graph] = {}


def inline_adapter(graph: fx.Graph, inputs: list[fx.Node], attr: str, adapter: nn.Module) -> fx.Node:
    """Copy ``adapter``'s graph into ``graph`` at the current insert point, fed with ``inputs``.

    ``inputs`` feed the adapter's placeholders in order: ``x``, then the base weight as
    ``(d_out, d_in)`` for adapters that declare ``reads_base_weight``.

    Returns:
        The node holding the adapter output ``Δ(x)``.
    """
    if not getattr(adapter, "inline", True):  # an AdapterSet: one call to the module (aurora_fx.adapter_set)
        node = graph.call_module(attr, tuple(inputs))
        tag(node, attr)
        return node
    env: dict[fx.Node, fx.Node] = {}
    result = None
    feed = iter(inputs)
    for node in adapter_graph(adapter).nodes:
        if node.op == "placeholder":
            env[node] = next(feed)
        elif node.op == "output":
            result = env[node.args[0]]
        else:
            target = f"{attr}.{node.target}" if node.op in ("get_attr", "call_module") else node.target
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: env[n])
            new = graph.create_node(node.op, target, args, kwargs, name=f"{attr}_{node.name}", type_expr=node.type)
            tag(new, attr)
            env[node] = new
    assert result is not None, "adapter graph has no output"
    return result


def _adapter_inputs(graph: fx.Graph, x: fx.Node, binding: Binding, adapter: nn.Module) -> list[fx.Node]:
    """``[x]``, plus the base weight as ``(d_out, d_in)`` when the adapter reads it."""
    if not getattr(adapter, "reads_base_weight", False):
        return [x]
    weight = graph.get_attr(binding.param)
    tag(weight, binding.attr)
    if binding.layout == "in_out":
        weight = graph.call_method("t", (weight,))
        tag(weight, binding.attr)
    return [x, weight]


def _insert_one(graph: fx.Graph, base: fx.Node, x: fx.Node, binding: Binding, adapter: nn.Module) -> None:
    """``base`` → ``base + adapter(x)`` for all of ``base``'s users."""
    with graph.inserting_before(base.next):
        delta = inline_adapter(graph, _adapter_inputs(graph, x, binding, adapter), binding.attr, adapter)
        cast = graph.call_method("type_as", (delta, base))  # float32 adapters on a half base add in its dtype
        tag(cast, binding.attr)
        total = graph.call_function(operator.add, (base, cast))
    tag(total, binding.attr, Role.SUM)
    base.replace_all_uses_with(total, delete_user_cb=lambda user: user not in (total, cast))


def insert_adapters(gm: fx.GraphModule, bindings: Iterable[Binding]) -> PassResult:
    """Insert the adapter subgraph of each binding after every linear node on its parameter.

    Args:
        gm: Owner GraphModule that already holds each binding's adapter (or ``AdapterSet``) at ``binding.slot``.
        bindings: The new bindings (parameters not yet adapted in ``gm``'s graph).

    Returns:
        ``PassResult(gm, modified)``; the graph is linted and ``forward`` regenerated.
    """
    by_param = {b.param: replace(b, attr=b.slot) for b in bindings}  # one insertion per slot (named adapters share it)
    modified = False
    for call in linear_calls(gm.graph):
        binding = by_param.get(call.attr)
        if binding is None:
            continue
        _insert_one(gm.graph, call.node, call.x, binding, gm.get_submodule(binding.attr))
        modified = True
    return PassResult(finish_graph(gm) if modified else gm, modified)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep copy of ``graph`` (nodes and meta), so the source stays untouched."""
    return copy.deepcopy(graph)
