"""The adapter contract: the one base class every method's module derives from.

Everything the rest of aurora_fx asks of an adapter is a method or class attribute here, so no
other module tests for a concrete adapter class:

* **shape and config**: ``in_features``, ``out_features``, ``config``, ``method``, ``rank``;
* **training**: ``adapter_params()`` (its own parameters), ``trains`` (False once frozen);
* **storage**: ``stored_tensors()`` (what a checkpoint saves and ``num_params`` counts), ``describe()``
  (facts for ``inspect``),
  ``state()`` / ``load_state()`` (JSON state beside the tensors), ``variable_width`` (tensors
  whose width may differ between fine-tunes of one structure, for swappable ONNX);
* **graph**: ``forward`` (traced once per ``trace_key()`` and inlined into the owner graph),
  ``reads_base_weight`` (then ``forward(x, weight)`` gets the base weight, ``(d_out, d_in)``),
  ``fusion()`` (the fused op that replaces the inlined subgraph, or why there is none);
* **math**: ``oracle_delta(x)`` (the functional oracle, what every fast path is tested against),
  ``grouped_delta(adapters, x, offs)`` (optional: many experts' adapters in grouped matmuls),
  ``delta_weight(lossy)`` (the merge) and ``lora_factors(lossy)`` / ``lora_exact`` (the update as
  LoRA factors, for ``export.to_peft``), ``row_form()`` (optional: the update as factors and a code function, so
  many named adapters run as one gathered op over a mixed batch, ``aurora_fx.adapter_set``);
* **sites**: ``check_site(site, config)`` (a method's own refusal, called by ``passes.check``);
  ``units()`` (the adapters one by one: itself, or an expert family's per-expert adapters).

Adapters never compute the base ``W0·x + b0``: the owner graph adds their output to the base
node (``passes/insert_adapters.py``), cast to the base output's dtype. All map
``(..., in_features) → (..., out_features)``, computing in their parameters' dtype (``_input``
casts x to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from aurora_fx.config import AdapterConfig
from aurora_fx.ops.dropout import InputDropout

__all__ = ["AdapterBase", "Fusion", "LoraFactors", "RowForm", "kaiming_uniform_"]


@dataclass(frozen=True)
class Fusion:
    """How an adapter's inlined subgraph plus its ``add`` becomes one op call.

    The fuse pass emits ``op(base, x, *[adapter.<p> for p in params], *constants)``, where ``x`` is
    the input of the linear on ``input_param`` (after dropout, if any). Where the base node is a plain
    ``linear(x, W, b)`` on the adapter's own input (up to its dropout), it emits
    ``linear_op(x, W, b, *params, *constants[, dropout=adapter.dropout])`` instead, which computes the
    base linear too (and applies the dropout to the adapter's input while it is active).
    """

    op: Any
    params: tuple[str, ...]
    constants: tuple[float, ...] = ()
    input_param: str = "A"
    linear_op: Any = None


@dataclass(frozen=True)
class LoraFactors:
    """An update written as LoRA: ``ΔW = scale · B·A`` with A ``(k, d_in)``, B ``(d_out, k)``."""

    A: Tensor
    B: Tensor
    scale: float


@dataclass(frozen=True)
class RowForm:
    """An update as ``Δ(x) = B·g(A·drop(x))``, the scale folded into B (live tensors: gradients flow through).

    ``g`` is the identity when ``H`` is None (LoRA, AROMA), else AuroRA's ANL ``σ(z) = tanh(H·tanh z) + Ws·S(z)``
    with ``knots`` and ``order`` (``grid``: a hashable key of the knot vector; forms stack only on one grid).
    ``dropout`` is the input dropout of every rank (an adapter whose ranks drop out differently has no row form
    while its dropout is active).
    """

    A: Tensor
    B: Tensor
    dropout: float = 0.0
    H: Tensor | None = None
    Ws: Tensor | None = None
    knots: Tensor | None = None
    order: int = 3
    grid: tuple | None = None


def kaiming_uniform_(t: Tensor, generator: torch.Generator | None = None) -> None:
    """LoRA's A init: Kaiming-uniform(a=√5), i.e. U(±1/√d_in)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


class AdapterBase(nn.Module):
    """Base of every adapter module (see the module docstring for the contract)."""

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    reads_base_weight: ClassVar[bool] = False
    has_code_delta: ClassVar[bool] = False  # Δ = scale·B·code_inner(A·x) (convolution sites use it)
    variable_width: ClassVar[dict[str, int]] = {}

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.scale = config.scale
        self.dropout = InputDropout(config.dropout) if config.dropout > 0 else None  # nn.Dropout, cheap CPU mask

    def _input(self, x: Tensor, like: Tensor) -> Tensor:
        """``drop(x)`` in the dtype of ``like`` (an adapter parameter): float32 adapters on a half base."""
        x = x.to(like.dtype)
        return self.dropout(x) if self.dropout is not None else x

    # -- identity -------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The registered method name (``config.method``)."""
        return self.config.method

    @property
    def rank(self) -> int:
        """The rank this adapter holds now (the config's rank unless the method grows it)."""
        return self.config.rank

    @classmethod
    def check_site(cls, site: Any, config: AdapterConfig) -> str | None:
        """A reason this method cannot adapt ``site`` (a ``Site``), or None. Default: any site."""
        return None

    # -- training and storage -------------------------------------------------------------------
    @property
    def trains(self) -> bool:
        """Whether its parameters should require grad (False once a method freezes it)."""
        return True

    def units(self) -> tuple[tuple[str, AdapterBase], ...]:
        """The adapters one by one, as ``(site suffix, adapter)``: ``(("", self),)``.

        An expert site's family lists ``(".<e>", expert e's adapter)`` (``methods/experts.py``).
        """
        return (("", self),)

    def adapter_params(self) -> list[str]:
        """Names of this adapter's own parameters (dotted for nested ones)."""
        return [name for name, _ in self.named_parameters(recurse=False)]

    def stored_tensors(self) -> dict[str, Tensor]:
        """Parameters and persistent buffers: what a checkpoint saves and ``num_params`` counts."""
        out = dict(self.named_parameters(recurse=False))
        persistent = self.state_dict(keep_vars=True)
        out.update({n: b for n, b in self.named_buffers(recurse=False) if n in persistent})
        return out

    def state(self) -> dict[str, Any]:
        """JSON-ready state saved beside the tensors (default: none)."""
        return {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Prepare to receive ``tensors`` from a checkpoint (e.g. resize grown buffers)."""

    def describe(self) -> dict[str, Any]:
        """Method-specific facts for ``inspect`` (e.g. AROMA's pieces and effective rank)."""
        return {}

    # -- graph ----------------------------------------------------------------------------------
    def trace_key(self) -> tuple:
        """Adapters with equal keys share one traced ``forward`` graph."""
        return (type(self), self.config)

    def fusion(self) -> Fusion | str:
        """The fused op for this adapter, or the reason it stays unfused."""
        return f"{type(self).__name__} has no fused op"

    # -- math -----------------------------------------------------------------------------------
    def oracle_delta(self, x: Tensor) -> Tensor:
        """``Δ(x)`` from ``aurora_fx.functional`` only, without dropout (the test reference)."""
        raise NotImplementedError(f"{type(self).__name__} must implement oracle_delta")

    def code_inner(self, z: Tensor) -> Tensor:
        """``g(z)`` of a method whose ``Δ(x) = scale·B·g(A·drop(x))`` (``has_code_delta``); ``z`` is ``(..., r)``.

        Convolution sites compute ``z`` as a convolution, ``g`` per position and ``B`` as a 1×1 one (``conv_sites.py``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no code_inner (has_code_delta is False)")

    def add_to(self, base: Tensor, x: Tensor) -> Tensor:
        """``base + Δ(x)`` in ``base``'s dtype: how a wrapped owner (a quantized linear) adds the adapter."""
        return base + self(x).to(base.dtype)

    @classmethod
    def grouped_delta(cls, adapters: list[AdapterBase], x: Tensor, offs: Tensor) -> Tensor | None:
        """``Δ_e`` of each expert's adapter on its rows of ``x`` (sorted by expert, ``offs`` cumulative), in one go.

        The experts' fast path (``methods/experts.py``); None (the default) makes the caller loop over experts.
        """
        return None

    def row_form(self) -> RowForm | None:
        """The update as ``RowForm`` factors (several named adapters then run as one gathered op), or None."""
        return None

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """The ``(d_out, d_in)`` update a merge adds to the base weight."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    lora_exact: ClassVar[bool] = False  # whether lora_factors() is exact (else it needs lossy=True)

    def lora_factors(self, lossy: bool = False) -> LoraFactors:
        """The update as LoRA factors (exact when ``lora_exact``; a method's lossy form otherwise)."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA form; export it with mode='fit'")

    def extra_repr(self) -> str:
        """Shape and config, for ``print(model)``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config}"
