"""LoRA (arXiv 2106.09685): ``Δ(x) = (α/r)·B·A·drop(x)``, the baseline every method is compared with."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aurora_fx import functional as AF
from aurora_fx.config import LoraConfig
from aurora_fx.methods.base import AdapterBase, Fusion, LoraFactors, RowForm, kaiming_uniform_
from aurora_fx.ops import grouped
from aurora_fx.ops.fused import lora_delta, lora_linear
from aurora_fx.registry import register_adapter

__all__ = ["LoraAdapter"]


@register_adapter
class LoraAdapter(AdapterBase):
    """LoRA: ``Δ(x) = (α/r)·B·A·drop(x)``; A Kaiming-uniform, B zero.

    Shapes: A ``(r, in_features)``, B ``(out_features, r)``. Parameters: ``r·(d_in + d_out)``.
    Fused into ``aurora_fx.ops.lora_delta`` (the update accumulated into the base output in one
    GEMM; Triton on CUDA).
    """

    config_class = LoraConfig
    lora_exact = True
    has_code_delta = True

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        kaiming_uniform_(self.A)

    def forward(self, x: Tensor) -> Tensor:
        """The LoRA delta ``s·B·A·drop(x)``."""
        return AF.lora_delta(self._input(x, self.A), self.A, self.B, self.scale)

    def code_inner(self, z: Tensor) -> Tensor:
        """LoRA's ``g`` is the identity: ``Δ = s·B·z`` (convolution sites)."""
        return z

    def fusion(self) -> Fusion:
        """``ops.lora_delta(base, x, A, B, s)``."""
        return Fusion(lora_delta, ("A", "B"), (self.scale,), linear_op=lora_linear)

    def oracle_delta(self, x: Tensor) -> Tensor:
        """``s·B·A·x`` from the oracle."""
        return AF.lora_delta(x, self.A, self.B, self.scale)

    @classmethod
    def grouped_delta(cls, adapters: list[LoraAdapter], x: Tensor, offs: Tensor) -> Tensor | None:
        """``s·B_e·A_e·drop(x)`` for every expert's rows: two grouped matmuls (``ops/grouped.py``)."""
        first = adapters[0]
        if not grouped.available(first.A):
            return None
        x = first._input(x, first.A)
        a = torch.stack([ad.A for ad in adapters]).transpose(1, 2)  # (E, d_in, r)
        b = (torch.stack([ad.B for ad in adapters]) * first.scale).transpose(1, 2)  # (E, r, d_out)
        return grouped.grouped_mm(grouped.grouped_mm(x, a, offs), b, offs)

    def row_form(self) -> RowForm:
        """``A`` and ``s·B``, identity code."""
        return RowForm(self.A, self.B * self.scale, self.config.dropout)

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """Exact ``ΔW = s·B·A`` in float32 or wider."""
        dt = AF.spline_dtype(self.A.dtype)
        return AF.lora_delta_weight(self.A.to(dt), self.B.to(dt), self.scale)

    def lora_factors(self, lossy: bool = False) -> LoraFactors:
        """A and B as they are, with the scale α/r."""
        return LoraFactors(self.A.detach(), self.B.detach(), self.scale)
