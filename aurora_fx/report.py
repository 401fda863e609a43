"""``aurora_fx.inspect``: what the surgery did, as a table, graph code and networkx graphs.

Named ``report`` (not ``inspect``) so it does not shadow the standard library module.

Example:
    >>> report = aurora_fx.inspect(model)
    >>> print(report)                                  # table of sites and parameter counts
    >>> print(report.code("encoder.layer.0.attention.self.query"))   # rewritten forward
    >>> g = report.to_networkx()                       # module tree, adapted sites flagged
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from aurora_fx.inventory import adapters
from aurora_fx.owners import WrappedOwner, iter_bindings, owner_state
from aurora_fx.passes.base import ADAPTER_TAG, ROLE
from aurora_fx.records import AdapterInfo, format_table

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["AdapterReport", "inspect", "node_role"]


@dataclass(frozen=True)
class AdapterReport:
    """The report of ``inspect``.

    Attributes:
        model_class: Class name of the inspected model.
        adapters: One ``AdapterInfo`` per adapted site.
        model_params: All parameters of the model (base + adapters).
        trainable_params: Parameters that require grad (adapters + trainable modules).
        owner_code: Generated ``forward`` source of each rewritten owner, by site path.
        owner_graphs: The owner ``fx.Graph`` of each site, by site path.
        module_types: Module path → class name for the whole model (for the module map).
    """

    model_class: str
    adapters: tuple[AdapterInfo, ...]
    model_params: int
    trainable_params: int
    owner_code: dict[str, str]
    owner_graphs: dict[str, fx.Graph]
    module_types: dict[str, str]

    @property
    def adapter_params(self) -> int:
        """Parameters and stored factors held by the adapters."""
        return sum(a.num_params for a in self.adapters)

    def code(self, site: str) -> str:
        """The generated ``forward`` of the owner that computes ``site``."""
        if site not in self.owner_code:
            raise KeyError(f"no adapted site {site!r}; adapted sites: {', '.join(self.owner_code) or 'none'}")
        return self.owner_code[site]

    def site_graph(self, site: str) -> nx.DiGraph:
        """The owner graph of ``site`` as a DiGraph: one node per fx node, edges along data flow.

        Node attributes: ``op``, ``target``, ``role`` (``base``, ``adapter``, ``fused``, ``sum``,
        ``input``, ``output`` or ``other``), ``adapter`` (the adapter attribute or None) and
        ``data_input`` (the node's first argument, if a node).
        """
        self.code(site)
        if site not in self.owner_graphs:
            raise KeyError(f"{site!r} is an expert site: its owner runs the experts' own forward under "
                           f"aurora_fx.expert_routing and has no fx graph (report.code({site!r}) says how it runs)")
        import networkx as nx  # (imported on use: ``import aurora_fx`` stays light)

        graph = nx.DiGraph(site=site)
        for node in self.owner_graphs[site].nodes:
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            graph.add_node(node.name, op=node.op, target=_target_name(node), role=node_role(node),
                           adapter=node.meta.get(ADAPTER_TAG), data_input=first.name if first else None)
            for src in node.all_input_nodes:
                graph.add_edge(src.name, node.name)
        return graph

    def to_networkx(self) -> nx.DiGraph:
        """The module tree (parent → child edges); adapted sites carry method, rank and params."""
        import networkx as nx

        graph = nx.DiGraph(model_class=self.model_class)
        for path, kind in self.module_types.items():
            graph.add_node(path or "<root>", type=kind, adapted=False)
            if path:
                parent = path.rpartition(".")[0] or "<root>"
                graph.add_edge(parent, path)
        for info in self.adapters:
            node = info.path or "<root>"
            if node not in graph:  # functional site named owner.param
                graph.add_node(node, type="functional site", adapted=False)
                graph.add_edge(node.rpartition(".")[0] or "<root>", node)
            graph.nodes[node].update(adapted=True, method=info.method, rank=info.rank, num_params=info.num_params,
                                     trainable_params=info.trainable_params, fused=info.fused)
        return graph

    def table(self) -> str:
        """Plain-text table of adapted sites, then totals."""
        rows = [(a.path, a.kind, a.method, a.rank, f"{a.in_features}→{a.out_features}", f"{a.num_params:,}",
                 f"{a.trainable_params:,}", "yes" if a.fused else "no", _details(a.details)) for a in self.adapters]
        header = ("site", "kind", "method", "rank", "shape", "params", "trainable", "fused", "details")
        if len({a.name for a in self.adapters}) > 1:  # named adapters: which one, and whether it is active
            rows = [(*r[:1], f"{a.name}{'' if a.active else ' (off)'}", *r[1:]) for r, a in zip(rows, self.adapters,
                                                                                                strict=True)]
            header = (header[0], "name", *header[1:])
        text = format_table(header, rows)
        share = 100.0 * self.trainable_params / max(self.model_params, 1)
        return (f"{text}\n{len(self.adapters)} adapted site(s) in {self.model_class}: "
                f"{self.adapter_params:,} adapter parameters; {self.trainable_params:,} trainable of "
                f"{self.model_params:,} ({share:.3f}%)")

    def __str__(self) -> str:
        return self.table()


def _details(details: dict) -> str:
    return ", ".join(f"{k} {('yes' if v else 'no') if isinstance(v, bool) else v}" for k, v in details.items())


def node_role(node: fx.Node) -> str:
    """Role of an owner-graph node, for pictures and the DiGraph."""
    if node.op in ("placeholder", "output"):
        return "input" if node.op == "placeholder" else "output"
    role = node.meta.get(ROLE)
    if role is not None:
        return role
    if node.meta.get(ADAPTER_TAG) is not None:
        return "adapter"
    return "base" if node.op in ("call_function", "call_method", "get_attr") else "other"


def _target_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def inspect(model: nn.Module) -> AdapterReport:
    """Report what aurora_fx did to ``model`` (see ``AdapterReport``)."""
    code, graphs = {}, {}
    for _, gm, b in iter_bindings(model):
        if isinstance(gm, WrappedOwner):
            code[b.site] = _wrapped_code(gm, b)
            continue
        code[b.site] = gm.code
        graphs[b.site] = gm.graph
    params = list(model.parameters())
    return AdapterReport(
        model_class=type(model).__name__,
        adapters=tuple(adapters(model)),
        model_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        owner_code=code,
        owner_graphs=graphs,
        module_types={path: _module_type(m) for path, m in model.named_modules()},
    )


def _wrapped_code(owner: nn.Module, b) -> str:
    family = owner.get_submodule(b.attr)
    original = type(owner_state(owner).original)
    if b.kind == "conv":
        return (f"# {type(owner).__name__}: {original.__module__}.{original.__qualname__}.forward (the convolution, "
                f"unchanged), then\n#     out = out + conv_delta(self.{b.attr}, input)   ({family.method} on the "
                f"input patches: A as a convolution, B as a 1×1 one)\n")
    if b.kind != "expert":
        return (f"# {type(owner).__name__}: {original.__module__}.{original.__qualname__}.forward "
                f"(the {b.quantization} base, unchanged), then\n"
                f"#     out = out + self.{b.attr}(input)   ({family.method}, on the quantized layer's input)\n")
    return (f"# {type(owner).__name__}: {original.__module__}.{original.__qualname__}.forward, unchanged, run under\n"
            f"# aurora_fx.expert_routing.ExpertRouting: wherever it computes with {b.param} (W[e] with F.linear or @,\n"
            f"# W[ids] with torch.bmm, W with grouped_mm), self.{b.attr}.experts[e] ({family.method}, "
            f"{family.num_experts} experts) adds its output for the tokens routed to expert e.\n")


def _module_type(module: nn.Module) -> str:
    state = owner_state(module)
    return type(state.original).__name__ if state is not None else type(module).__name__
