"""Scoped tracing: each module's *own* forward, with its children kept as leaves.

transformers 5 has no fx tracer and ``torch.fx.symbolic_trace`` fails on whole HF models and
blocks, but the modules that own parameters directly (``nn.Linear``, HF ``Conv1D``, norms,
custom modules calling ``F.linear`` on their own parameter) trace alone. Rewriting happens at
that smallest scope, so the user's model keeps its class and methods (README, *How it works*).

Stock forwards (Linear, Conv1D, LayerNorm, Embedding) come from a per-class graph cache; other
modules are traced in train and eval mode, and a difference is refused, because one static graph
would be wrong in the other mode.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn

from aurora_fx.registry import is_registered_adapter

__all__ = [
    "TraceError",
    "trace_owner",
    "trace_own_forward",
    "hf_conv1d",
    "iter_param_owners",
    "join_path",
    "get_submodule",
    "param_dtype_ok",
]


class TraceError(RuntimeError):
    """torch.fx could not trace a module's own forward."""


class _OwnTracer(fx.Tracer):
    """Traces only the root's own forward: every submodule is a leaf ``call_module``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_owner(module: nn.Module) -> fx.Graph:
    """Trace ``module``'s own forward with all children as leaves (no cache, no mode check).

    Raises:
        TraceError: fx cannot trace it (data-dependent control flow, ``**kwargs``, ...).
    """
    try:
        return _OwnTracer().trace(module)
    except Exception as exc:  # fx raises many types; the reason is kept for the user
        raise TraceError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def trace_own_forward(module: nn.Module) -> fx.Graph:
    """A fresh copy of the graph of ``module``'s own forward (cached for stock forwards).

    Raises:
        TraceError: fx cannot trace it, or its forward branches on ``self.training``.
    """
    if type(module).forward in _mode_free_forwards():
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
    """Traced graph of a stock forward, cached per class and baked-in values.

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


def _mode_free_forwards() -> set:
    forwards = {nn.Linear.forward, nn.LayerNorm.forward, nn.Embedding.forward}
    conv1d = hf_conv1d()
    if conv1d is not None:
        forwards.add(conv1d.forward)
    return forwards


def hf_conv1d() -> type | None:
    """Transformers' ``Conv1D`` (GPT-2's linear with a ``(d_in, d_out)`` weight), if installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional at this level
        return None
    return Conv1D


def iter_param_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in ``named_modules`` order; adapters skipped."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if is_registered_adapter(module):
            continue
        if any(p is not None for p in module._parameters.values()):
            yield path, module
        children = [(join_path(path, n), c) for n, c in module._modules.items() if c is not None]
        stack.extend(reversed(children))


def join_path(prefix: str, name: str) -> str:
    """``"a.b" + "c" → "a.b.c"``; the root is ``""``."""
    return f"{prefix}.{name}" if prefix else name


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule`` that also accepts ``""`` for the root."""
    return model.get_submodule(path) if path else model


def param_dtype_ok(param: torch.Tensor) -> bool:
    """Floating-point weights only; integer and quantized weights cannot host an adapter."""
    return param.dtype.is_floating_point and not param.is_quantized
