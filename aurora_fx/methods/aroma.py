"""AROMA (arXiv 2504.05343): frozen merged factors plus one trainable rank-r piece."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from aurora_fx import functional as AF
from aurora_fx.config import AromaConfig
from aurora_fx.distributed import assign, full
from aurora_fx.methods.base import AdapterBase, LoraFactors, RowForm, kaiming_uniform_
from aurora_fx.registry import register_adapter

__all__ = ["AromaAdapter", "Merge"]


@dataclass(frozen=True)
class Merge:
    """What one merge did to a site: its effective rank before and after, and the dropped tail."""

    rank_before: int
    rank_after: int
    tail: float  # ‖ΔW_kept − ΔW_exact‖_F of this compaction

    @property
    def new_direction(self) -> bool:
        """Whether the merged piece raised the effective rank (its direction was not in the span)."""
        return self.rank_after > self.rank_before


@register_adapter
class AromaAdapter(AdapterBase):
    """AROMA: merged frozen factors plus one trainable rank-r piece (docs/methods.md §3.1, §3.3, §3.9).

    ``Δ(x) = U·(V·x) + (α/r)·B·A·drop(x)``: U ``(d_out, k)`` and V ``(k, d_in)`` are frozen buffers
    holding the merged pieces at their effective rank k (each merge appends ``s·B`` and A, then
    re-compresses to the singular values above ``compact_tol·σ₁``); merged pieces act on the
    undropped x, as in the official code's merged-into-W function. A ``(r, d_in)`` Kaiming-uniform
    and B ``(d_out, r)`` zero are the active piece. Once frozen, the site computes ``U·(V·x)`` only
    and stores U, V only. ``AromaController`` grows, merges and freezes the pieces.
    """

    config_class = AromaConfig
    variable_width = {"U": 1, "V": 0}
    lora_exact = True

    def __init__(self, in_features: int, out_features: int, config: AromaConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.register_buffer("U", torch.zeros(out_features, 0, device=device, dtype=dtype))
        self.register_buffer("V", torch.zeros(0, in_features, device=device, dtype=dtype))
        self._frozen = False
        self.pieces = 0  # pieces merged so far (before compaction they would take pieces·r columns)
        kaiming_uniform_(self.A)

    @property
    def merged_rank(self) -> int:
        """Effective rank of the merged update: the width of the compacted U, V."""
        return self.U.shape[1]

    @property
    def full_rank(self) -> int:
        """The most rank a site can hold, ``min(d_in, d_out)``."""
        return min(self.in_features, self.out_features)

    @property
    def rank(self) -> int:
        """Effective merged rank plus the active piece while it trains."""
        return self.merged_rank + (0 if self._frozen else self.config.rank)

    @property
    def trains(self) -> bool:
        """False once the controller has stopped this site."""
        return not self._frozen

    @property
    def frozen(self) -> bool:
        """True once the controller has stopped this site (the active piece no longer trains)."""
        return bool(self._frozen)

    def trace_key(self) -> tuple:
        """A frozen site has its own, smaller graph."""
        return (type(self), self.config, self.frozen)

    def forward(self, x: Tensor) -> Tensor:
        """Merged pieces ``U·V·x`` plus, while it trains, the active piece's LoRA delta."""
        merged = AF.factors_delta(x.to(self.U.dtype), self.U, self.V)
        if self.frozen:  # a Python bool at trace time: the frozen site's graph has no A, B
            return merged
        return merged + AF.lora_delta(self._input(x, self.A), self.A, self.B, self.scale)

    def oracle_delta(self, x: Tensor) -> Tensor:
        """``U·V·x + s·B·A·x`` from the oracle (the active piece is zero once frozen)."""
        merged = AF.factors_delta(x, self.U, self.V)
        return merged if self.frozen else merged + AF.lora_delta(x, self.A, self.B, self.scale)

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """Exact ``ΔW = U·V + s·B·A`` in float32 or wider."""
        dt = AF.spline_dtype(self.A.dtype)
        merged = self.U.to(dt) @ self.V.to(dt)
        if self.frozen:
            return merged
        return merged + AF.lora_delta_weight(self.A.to(dt), self.B.to(dt), self.scale)

    def lora_factors(self, lossy: bool = False) -> LoraFactors:
        """``[U, s·B]`` and ``[V; A]`` with scale 1 (the active piece only while it trains)."""
        u, v = full(self.U), full(self.V)
        if not self.frozen:
            u = torch.cat([u, full(self.B).to(u.dtype) * self.scale], dim=1)
            v = torch.cat([v, full(self.A).to(v.dtype)], dim=0)
        return LoraFactors(v, u, 1.0)

    def row_form(self) -> RowForm | None:
        """``[V; A]`` and ``[U, s·B]``, identity code; None while the active piece's dropout is on (U·V never drops)."""
        if self.frozen:
            return RowForm(self.V, self.U)
        if self.dropout is not None and self.training:
            return None
        return RowForm(torch.cat([self.V, self.A.to(self.V.dtype)]), torch.cat([self.U, self.B * self.scale], dim=1))

    def stored_tensors(self) -> dict[str, Tensor]:
        """U, V, and the active piece's A, B while it trains (a frozen site's A, B are dead)."""
        return {"U": self.U, "V": self.V} if self.frozen else super().stored_tensors()

    @torch.no_grad()
    def merge_active(self, generator: torch.Generator | None = None) -> Merge:
        """Append ``s·B`` to U and A to V, compact to the effective rank, restart the piece.

        Sharded (FSDP2) pieces are gathered first; U and V are whole on every rank.
        """
        before = self.merged_rank
        a, b = full(self.A), full(self.B)
        U = torch.cat([self.U, (b * self.scale).to(self.U.device, self.U.dtype)], dim=1)
        V = torch.cat([self.V, a.to(self.V.device, self.V.dtype)], dim=0)
        self.U, self.V, tail = AF.compact_factors(U, V, self.config.compact_tol)
        self.pieces += 1
        self.reset_active(generator)
        return Merge(before, self.merged_rank, tail)

    def piece_trained(self) -> bool:
        """Whether the active piece moved from its start (B starts at zero)."""
        return bool(full(self.B).abs().max() > 0)

    @torch.no_grad()
    def freeze(self, keep_active: bool = False) -> Merge | None:
        """Stop this site: merge the active piece if ``keep_active``, else discard it (B = 0)."""
        merge = self.merge_active() if keep_active else None
        self.B.zero_()
        for p in (self.A, self.B):
            p.requires_grad_(False)
            p.grad = None
        self._frozen = True
        return merge
    @torch.no_grad()
    def reset_active(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the active piece in place (same Parameter objects); seeded if given.

        A is drawn whole on the CPU (a CPU generator, float32) and copied in, so every rank and
        every device gets the same values, sharded or not.
        """
        fresh = torch.empty(tuple(self.A.shape), dtype=torch.float32)
        kaiming_uniform_(fresh, generator=generator)
        assign(self.A, fresh)
        self.B.zero_()
        for p in (self.A, self.B):
            p.grad = None

    def state(self) -> dict[str, Any]:
        """``frozen``, the effective merged rank and the pieces merged."""
        return {"frozen": self.frozen, "merged_rank": self.merged_rank, "pieces": self.pieces}

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Size U, V like the checkpoint's, restore the frozen flag and the piece count."""
        width = tensors["U"].shape[1] if "U" in tensors else 0
        self.resize_factors(width)
        self._frozen = bool(state.get("frozen", False))
        self.pieces = int(state.get("pieces", width))
        for p in (self.A, self.B):
            p.requires_grad_(not self._frozen)

    def describe(self) -> dict[str, Any]:
        """Pieces merged, effective rank and whether a piece is active (for ``inspect``)."""
        return {"pieces": self.pieces, "effective rank": self.merged_rank, "active": not self.frozen}

    def resize_factors(self, width: int) -> None:
        """Give U, V ``width`` columns/rows (used when loading a grown checkpoint)."""
        self.U = torch.zeros(self.out_features, width, device=self.U.device, dtype=self.U.dtype)
        self.V = torch.zeros(width, self.in_features, device=self.V.device, dtype=self.V.dtype)
