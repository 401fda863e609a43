"""Adapter modules: they own the adapter parameters and compute ``Δ(x)`` through the oracle.

An adapter never computes the base ``W0·x + b0``: the rewritten owner graph adds the adapter's
output to the base node's output (``passes/insert_adapters.py``).  The graph of ``forward`` is
what gets inlined into the owner, so ``forward`` must stay fx-traceable and branch only on
frozen config values.

All adapters map ``(..., in_features) → (..., out_features)``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from aurora_fx import functional as AF
from aurora_fx.config import AdapterConfig, AromaConfig, AuroraConfig, LoraConfig

__all__ = [
    "Adapter",
    "LoraAdapter",
    "AuroraAdapter",
    "AromaAdapter",
    "ADAPTER_TYPES",
    "build_adapter",
]


@runtime_checkable
class Adapter(Protocol):
    """What makes a module an aurora_fx adapter."""

    config: AdapterConfig
    in_features: int
    out_features: int

    def adapter_params(self) -> list[str]:
        """Names of this adapter's own trainable parameters."""
        ...

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """The update ``ΔW`` (d_out, d_in) that a merge adds to the base weight."""
        ...


def _kaiming_uniform(t: Tensor) -> None:
    """LoRA's A init: Kaiming-uniform(a=√5), i.e. U(±1/√d_in)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class _AdapterBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: AdapterConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def _drop(self, x: Tensor) -> Tensor:
        return self.dropout(x) if self.dropout is not None else x

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters(recurse=False)]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config}"


class LoraAdapter(_AdapterBase):
    """LoRA: ``Δ(x) = (α/r)·B·A·drop(x)``; A Kaiming-uniform, B zero.

    Shapes: A ``(r, in_features)``, B ``(out_features, r)``. Parameters: ``r·(d_in + d_out)``.
    """

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        _kaiming_uniform(self.A)

    def forward(self, x: Tensor) -> Tensor:
        """The LoRA delta ``s·B·A·drop(x)``."""
        return AF.lora_delta(self._drop(x), self.A, self.B, self.scale)

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """Exact ``ΔW = s·B·A`` in float32 or wider."""
        dt = AF.spline_dtype(self.A.dtype)
        return AF.lora_delta_weight(self.A.to(dt), self.B.to(dt), self.scale)


class AuroraAdapter(_AdapterBase):
    """AuroRA: ``Δ(x) = (α/r̃)·B·σ(A·drop(x))``, ``σ(z) = tanh(H·tanh z) + W_s·Σ_i basis(z_i)``.

    Init (METHODS §2.4): A Kaiming-uniform(a=√5); B zero (the output starts at exactly 0);
    H Xavier-normal; Ws U(±spline_init). The 12-knot vector is a non-persistent float64 buffer
    rebuilt from the config (also after ``.to()``/``.double()``, so casts never round it).
    Parameters per site: ``r̃(d_in + d_out) + r̃² + r̃(G + K)``.
    """

    def __init__(self, in_features: int, out_features: int, config: AuroraConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r, nb = config.rank, config.num_bases
        self.order = config.spline_order
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.H = nn.Parameter(torch.empty(r, r, device=device, dtype=dtype))
        self.Ws = nn.Parameter(torch.empty(r, nb, device=device, dtype=dtype))
        self.register_buffer("knots", self._knots(device), persistent=False)
        _kaiming_uniform(self.A)
        nn.init.xavier_normal_(self.H)
        nn.init.uniform_(self.Ws, -config.spline_init, config.spline_init)

    def _knots(self, device) -> Tensor:
        cfg = self.config
        return AF.spline_knots(cfg.grid_size, cfg.spline_order, cfg.grid_range, dtype=torch.float64, device=device)

    def _apply(self, fn, recurse=True):
        # Knots stay exact float64 whatever .to()/.half()/.double() does to the module.
        super()._apply(fn, recurse)
        self.knots = self._knots(self.A.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """The AuroRA delta ``s·B·σ(A·drop(x))`` (reference path; the fuse pass swaps in the op)."""
        return AF.aurora_delta(self._drop(x), self.A, self.B, self.H, self.Ws, self.knots, self.scale, self.order)

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """The paper's static merge ``s·B·σ(Aᵀ)ᵀ``; lossy, so ``lossy=True`` is required."""
        if not lossy:
            raise ValueError(
                "an AuroRA adapter cannot be merged exactly: B·σ(A·x) is nonlinear in x. "
                "Pass lossy=True for the paper's static merge (drops B·σ(0) and the nonlinearity), "
                "or keep the adapter unmerged (aurora_fx.export.to_onnx exports it exactly)"
            )
        dt = AF.spline_dtype(self.A.dtype)
        p = [t.to(dt) for t in (self.A, self.B, self.H, self.Ws)]
        return AF.aurora_static_delta_weight(*p, self.knots, self.scale, self.order)


class AromaAdapter(_AdapterBase):
    """AROMA: merged frozen factors plus one trainable rank-r piece (METHODS §3.1, §3.3).

    ``Δ(x) = U·(V·x) + (α/r)·B·A·drop(x)``: U ``(d_out, P·r)`` and V ``(P·r, d_in)`` are frozen
    buffers that grow at each merge (merged pieces act on the undropped x, as in the official
    code's merged-into-W function); A ``(r, d_in)`` Kaiming-uniform and B ``(d_out, r)`` zero
    are the active piece. ``AromaController`` grows, merges and freezes the pieces.
    """

    def __init__(self, in_features: int, out_features: int, config: AromaConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.register_buffer("U", torch.zeros(out_features, 0, device=device, dtype=dtype))
        self.register_buffer("V", torch.zeros(0, in_features, device=device, dtype=dtype))
        self._frozen = False
        _kaiming_uniform(self.A)

    @property
    def merged_rank(self) -> int:
        """Total width of the merged, frozen factors (pieces × r)."""
        return self.U.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        """Merged pieces ``U·Vᵀ·x`` plus the active piece's LoRA delta."""
        return AF.factors_delta(x, self.U, self.V) + AF.lora_delta(self._drop(x), self.A, self.B, self.scale)

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """Exact ``ΔW = U·V + s·B·A`` in float32 or wider."""
        dt = AF.spline_dtype(self.A.dtype)
        merged = self.U.to(dt) @ self.V.to(dt)
        return merged + AF.lora_delta_weight(self.A.to(dt), self.B.to(dt), self.scale)

    @torch.no_grad()
    def merge_active(self, generator: torch.Generator | None = None) -> None:
        """Append ``s·B`` to U and A to V (exact), then restart the piece: A Kaiming, B zero."""
        self.U = torch.cat([self.U, (self.B * self.scale).to(self.U.dtype)], dim=1)
        self.V = torch.cat([self.V, self.A.to(self.V.dtype)], dim=0)
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
        """Re-initialise the active piece in place (same Parameter objects); seeded if given."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B.zero_()
        for p in (self.A, self.B):
            p.grad = None

    @property
    def frozen(self) -> bool:
        """True once the controller has stopped this site (the active piece no longer trains)."""
        return bool(self._frozen)

    def checkpoint_state(self) -> dict:
        """JSON-ready state saved with the tensors."""
        return {"frozen": self.frozen, "merged_rank": self.merged_rank}

    def restore_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        """Prepare for loading: size U, V like the checkpoint's, restore the frozen flag."""
        width = tensors["U"].shape[1] if "U" in tensors else 0
        self.resize_factors(width)
        self._frozen = bool(state.get("frozen", False))

    def resize_factors(self, width: int) -> None:
        """Give U, V ``width`` columns/rows (used when loading a grown checkpoint)."""
        self.U = torch.zeros(self.out_features, width, device=self.U.device, dtype=self.U.dtype)
        self.V = torch.zeros(width, self.in_features, device=self.V.device, dtype=self.V.dtype)


ADAPTER_TYPES: dict[type[AdapterConfig], type[_AdapterBase]] = {
    LoraConfig: LoraAdapter,
    AuroraConfig: AuroraAdapter,
    AromaConfig: AromaAdapter,
}


def build_adapter(
    config: AdapterConfig, in_features: int, out_features: int, *, device=None, dtype=None
) -> _AdapterBase:
    """The adapter module for ``config`` (dispatch on the config type)."""
    return ADAPTER_TYPES[type(config)](in_features, out_features, config, device=device, dtype=dtype)
