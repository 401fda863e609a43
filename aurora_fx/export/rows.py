"""The adapter index as a graph input: one exported graph serves a batch whose rows use different adapters.

A model with several named adapters (``aurora_fx.named``) exports with an ``adapter_index`` input: an int64
``(batch,)`` tensor of indices into ``aurora_fx.adapter_names(model)`` (``-1`` runs the base alone). Every
adapted site gathers its rows' factors from the stacked weights in the graph (``aurora_fx.adapter_set``), so an
onnxruntime session answers row ``i`` with adapter ``adapter_index[i]``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from aurora_fx.named import adapter_names, adapter_rows

__all__ = ["RowRouted", "row_routed", "routes_rows", "example_index", "INDEX_INPUT"]

INDEX_INPUT = "adapter_index"


def routes_rows(model: nn.Module, wanted: bool | None) -> bool:
    """Whether the export takes an adapter index: ``wanted``, or (None) when the model holds several names.

    Raises:
        ValueError: ``wanted`` is True for a model with fewer than two names.
    """
    several = len(adapter_names(model)) > 1
    if wanted and not several:
        raise ValueError("adapter_index=True needs a model with several named adapters (apply(..., name=...)); "
                         f"this one holds {list(adapter_names(model)) or 'none'}")
    return several if wanted is None else bool(wanted)


def example_index(model: nn.Module, batch: int) -> torch.Tensor:
    """An example index for tracing and verifying: rows cycle through the names, then -1 (the base)."""
    n = len(adapter_names(model))
    return (torch.arange(batch) % (n + 1) - 1).roll(-1) if batch > n else torch.arange(batch) % n


class RowRouted(nn.Module):
    """``model`` with an ``adapter_index`` keyword: the forward runs inside ``adapter_rows(model, adapter_index)``.

    ``row_routed(model)`` builds one whose forward's signature is the model's plus ``adapter_index`` (the
    exporters bind example inputs by it).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward with row ``i`` on adapter ``adapter_index[i]``."""
        index = kwargs.pop(INDEX_INPUT)
        with adapter_rows(self.model, index):
            return self.model(*args, **kwargs)


def row_routed(model: nn.Module) -> RowRouted:
    """A ``RowRouted`` over ``model`` whose ``forward`` declares the model's parameters plus ``adapter_index``."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    index = inspect.Parameter(INDEX_INPUT, inspect.Parameter.KEYWORD_ONLY)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return RowRouted.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature([self_param, *params, index])
    forward.__doc__ = RowRouted.forward.__doc__
    cls = type(f"RowRouted{type(model).__name__}", (RowRouted,), {"forward": forward})
    return cls(model)
