"""What every pass returns, and the lint + recompile step after each mutation."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

__all__ = ["PassResult", "finish_graph"]


@dataclass(frozen=True)
class PassResult:
    """A pass's result, like ``torch.fx.passes.infra.pass_base.PassResult``.

    Attributes:
        graph_module: The (possibly new) GraphModule.
        modified: Whether the pass changed the graph.
    """

    graph_module: fx.GraphModule
    modified: bool


def finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint the graph and regenerate ``forward``.

    No dead-code elimination: user graphs may hold side effects whose results are unused.
    """
    gm.graph.lint()
    gm.recompile()
    return gm
