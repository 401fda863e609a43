"""Scoped tracing: each module's *own* forward, with its children kept as leaves.

transformers 5 has no fx tracer and ``torch.fx.symbolic_trace`` fails on whole HF models and
blocks, but the modules that own parameters directly (``nn.Linear``, HF ``Conv1D``, norms,
custom modules calling ``F.linear`` on their own parameter) trace alone. Rewriting happens at
that smallest scope, so the user's model keeps its class and methods (DESIGN.md).

A rewritten owner is a ``torch.fx.GraphModule`` whose ``meta["aurora_fx"]`` holds an
``OwnerState``: the module it replaced and the adapters it carries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from aurora_fx.modules import ADAPTER_TYPES

__all__ = [
    "TraceError",
    "OwnerState",
    "Binding",
    "owner_state",
    "is_adapter",
    "trace_owner",
    "iter_param_owners",
    "join_path",
    "get_submodule",
]

_STATE_KEY = "aurora_fx"


class TraceError(RuntimeError):
    """torch.fx could not trace a module's own forward."""


@dataclass(frozen=True)
class Binding:
    """An adapter attached to one weight parameter of an owner.

    Attributes:
        site: The site path.
        param: The owner's weight parameter name.
        attr: Attribute name of the adapter module inside the owner GraphModule.
        kind: Site kind.
        layout: ``"out_in"`` or ``"in_out"`` (weight storage, see ``Site.layout``).
    """

    site: str
    param: str
    attr: str
    kind: str
    layout: str


@dataclass(frozen=True)
class OwnerState:
    """What a rewritten owner remembers: the module it replaced and its adapter bindings."""

    original: nn.Module
    bindings: tuple[Binding, ...]

    def binding(self, param: str) -> Binding | None:
        """The binding on ``param``, or None."""
        return next((b for b in self.bindings if b.param == param), None)


def owner_state(module: nn.Module) -> OwnerState | None:
    """The ``OwnerState`` of a rewritten owner, or None for any other module."""
    if isinstance(module, fx.GraphModule):
        state = module.meta.get(_STATE_KEY)
        if isinstance(state, OwnerState):
            return state
    return None


def set_owner_state(gm: fx.GraphModule, state: OwnerState) -> None:
    """Attach ``state`` to ``gm`` (kept across ``copy.deepcopy``)."""
    gm.meta[_STATE_KEY] = state


def is_adapter(module: nn.Module) -> bool:
    """True for aurora_fx adapter modules."""
    return isinstance(module, tuple(ADAPTER_TYPES.values()))


class _OwnTracer(fx.Tracer):
    """Traces only the root's own forward: every submodule is a leaf ``call_module``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_owner(module: nn.Module) -> fx.Graph:
    """Trace ``module``'s own forward with all children as leaves.

    Raises:
        TraceError: fx cannot trace it (data-dependent control flow, ``**kwargs``, ...).
    """
    try:
        return _OwnTracer().trace(module)
    except Exception as exc:  # fx raises many types; the reason is kept for the user
        raise TraceError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def iter_param_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in ``named_modules`` order; adapters skipped."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if is_adapter(module):
            continue
        if any(p is not None for p in module._parameters.values()) or owner_state(module) is not None:
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
