"""AROMA (arXiv 2504.05343): frozen merged factors plus one trainable rank-r piece."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from aurora_fx import functional as AF
from aurora_fx.config import AromaConfig
from aurora_fx.distributed import assign, full
from aurora_fx.methods.base import AdapterBase, kaiming_uniform_
from aurora_fx.registry import register_adapter

__all__ = ["AromaAdapter"]


@register_adapter
class AromaAdapter(AdapterBase):
    """AROMA: merged frozen factors plus one trainable rank-r piece (docs/methods.md §3.1, §3.3).

    ``Δ(x) = U·(V·x) + (α/r)·B·A·drop(x)``: U ``(d_out, k)`` and V ``(k, d_in)`` are frozen
    buffers that grow at each merge (merged pieces act on the undropped x, as in the official
    code's merged-into-W function); A ``(r, d_in)`` Kaiming-uniform and B ``(d_out, r)`` zero
    are the active piece. ``AromaController`` grows, merges and freezes the pieces.
    """

    config_class = AromaConfig
    variable_width = {"U": 1, "V": 0}

    def __init__(self, in_features: int, out_features: int, config: AromaConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.register_buffer("U", torch.zeros(out_features, 0, device=device, dtype=dtype))
        self.register_buffer("V", torch.zeros(0, in_features, device=device, dtype=dtype))
        self._frozen = False
        kaiming_uniform_(self.A)

    @property
    def merged_rank(self) -> int:
        """Width of the merged, frozen factors."""
        return self.U.shape[1]

    @property
    def rank(self) -> int:
        """Merged width plus the active piece while it trains."""
        return self.merged_rank + (0 if self._frozen else self.config.rank)

    @property
    def trains(self) -> bool:
        """False once the controller has stopped this site."""
        return not self._frozen

    @property
    def frozen(self) -> bool:
        """True once the controller has stopped this site (the active piece no longer trains)."""
        return bool(self._frozen)

    def forward(self, x: Tensor) -> Tensor:
        """Merged pieces ``U·V·x`` plus the active piece's LoRA delta."""
        merged = AF.factors_delta(x.to(self.U.dtype), self.U, self.V)
        return merged + AF.lora_delta(self._input(x, self.A), self.A, self.B, self.scale)

    def oracle_delta(self, x: Tensor) -> Tensor:
        """``U·V·x + s·B·A·x`` from the oracle."""
        return AF.factors_delta(x, self.U, self.V) + AF.lora_delta(x, self.A, self.B, self.scale)

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """Exact ``ΔW = U·V + s·B·A`` in float32 or wider."""
        dt = AF.spline_dtype(self.A.dtype)
        merged = self.U.to(dt) @ self.V.to(dt)
        return merged + AF.lora_delta_weight(self.A.to(dt), self.B.to(dt), self.scale)

    @torch.no_grad()
    def merge_active(self, generator: torch.Generator | None = None) -> None:
        """Append ``s·B`` to U and A to V (exact), then restart the piece: A Kaiming, B zero.

        Sharded (FSDP2) pieces are gathered first; U and V are whole on every rank.
        """
        a, b = full(self.A), full(self.B)
        self.U = torch.cat([self.U, (b * self.scale).to(self.U.device, self.U.dtype)], dim=1)
        self.V = torch.cat([self.V, a.to(self.V.device, self.V.dtype)], dim=0)
        self.reset_active(generator)

    @torch.no_grad()
    def freeze(self, keep_active: bool = False) -> None:
        """Stop this site: merge the active piece if ``keep_active``, else discard it (B = 0)."""
        if keep_active:
            self.merge_active()
        self.B.zero_()
        for p in (self.A, self.B):
            p.requires_grad_(False)
            p.grad = None
        self._frozen = True

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
        """``frozen`` and the merged width."""
        return {"frozen": self.frozen, "merged_rank": self.merged_rank}

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Size U, V like the checkpoint's, restore the frozen flag."""
        width = tensors["U"].shape[1] if "U" in tensors else 0
        self.resize_factors(width)
        self._frozen = bool(state.get("frozen", False))

    def resize_factors(self, width: int) -> None:
        """Give U, V ``width`` columns/rows (used when loading a grown checkpoint)."""
        self.U = torch.zeros(self.out_features, width, device=self.U.device, dtype=self.U.dtype)
        self.V = torch.zeros(width, self.in_features, device=self.V.device, dtype=self.V.dtype)
