"""What every pass returns, the lint + recompile step after each mutation, and the node tags.

Nodes inserted for an adapter carry ``node.meta[ADAPTER_TAG] = <adapter attribute>``; the ones
with a special job also carry ``node.meta[ROLE]``: ``Role.SUM`` (the ``base + Δ`` add, or the
fused op's result) and ``Role.FUSED`` (the fused op call and its operands).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

__all__ = ["PassResult", "finish_graph", "ADAPTER_TAG", "ROLE", "Role", "tag"]

ADAPTER_TAG = "aurora_fx_adapter"  # node.meta key: the adapter attribute a node belongs to
ROLE = "aurora_fx_role"  # node.meta key: the node's job (a Role value)


class Role:
    """Values of ``node.meta[ROLE]``."""

    SUM = "sum"
    FUSED = "fused"


@dataclass(frozen=True)
class PassResult:
    """A pass's result, like ``torch.fx.passes.infra.pass_base.PassResult``.

    Attributes:
        graph_module: The (possibly new) GraphModule.
        modified: Whether the pass changed the graph.
    """

    graph_module: fx.GraphModule
    modified: bool


def tag(node: fx.Node, attr: str, role: str | None = None) -> None:
    """Mark ``node`` as belonging to the adapter at ``attr`` (with a ``Role``, if given)."""
    node.meta = {ADAPTER_TAG: attr} if role is None else {ADAPTER_TAG: attr, ROLE: role}


def finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint the graph and regenerate ``forward``.

    No dead-code elimination: user graphs may hold side effects whose results are unused.
    """
    gm.graph.lint()
    gm.recompile()
    return gm
