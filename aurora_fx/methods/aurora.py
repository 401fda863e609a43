"""AuroRA (arXiv 2505.18738): ``Δ(x) = (α/r̃)·B·σ(A·drop(x))`` with the Adaptive Nonlinear Layer σ."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aurora_fx import functional as AF
from aurora_fx.config import AuroraConfig
from aurora_fx.methods.base import AdapterBase, Fusion, LoraFactors, RowForm, kaiming_uniform_
from aurora_fx.ops import grouped
from aurora_fx.ops.aurora_delta import ORDER
from aurora_fx.ops.fused import aurora_delta, aurora_linear
from aurora_fx.registry import register_adapter

__all__ = ["AuroraAdapter"]

_A_INITS = {  # AuroraConfig.a_init → init of A (r̃, d_in), docs/methods.md §2.4
    "kaiming_uniform": kaiming_uniform_,  # U(±1/√d_in)
    "xavier_normal": nn.init.xavier_normal_,  # N(0, 2/(d_in + r̃))
    "normal": lambda a: nn.init.normal_(a, 0.0, a.shape[1] ** -0.5),  # N(0, 1/d_in)
}


@register_adapter
class AuroraAdapter(AdapterBase):
    """AuroRA: ``Δ(x) = (α/r̃)·B·σ(A·drop(x))``, ``σ(z) = tanh(H·tanh z) + W_s·Σ_i basis(z_i)``.

    Init (docs/methods.md §2.4): A by ``config.a_init`` (Kaiming-uniform(a=√5) by default); B zero (the
    output starts at exactly 0);
    H Xavier-normal; Ws U(±spline_init). The knot vector is a non-persistent float64 buffer
    rebuilt from the config (also after ``.to()``/``.double()``, so casts never round it).
    Parameters per site: ``r̃(d_in + d_out) + r̃² + r̃(G + K)``. Fused (cubic splines) into
    ``aurora_fx.ops.aurora_delta`` (the CPU op ``aurora_fx::aurora_delta_add``, Triton on CUDA).
    """

    config_class = AuroraConfig
    has_code_delta = True

    def __init__(self, in_features: int, out_features: int, config: AuroraConfig, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, config)
        r, nb = config.rank, config.num_bases
        self.order = config.spline_order
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.H = nn.Parameter(torch.empty(r, r, device=device, dtype=dtype))
        self.Ws = nn.Parameter(torch.empty(r, nb, device=device, dtype=dtype))
        self.register_buffer("knots", self._knots(device), persistent=False)
        _A_INITS[config.a_init](self.A)
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
        x = self._input(x, self.A)
        return AF.aurora_delta(x, self.A, self.B, self.H, self.Ws, self.knots, self.scale, self.order)

    def code_inner(self, z: Tensor) -> Tensor:
        """AuroRA's ``g`` is the ANL: ``Δ = s·B·σ(z)`` (convolution sites)."""
        return AF.anl(z, self.H, self.Ws, self.knots, self.order)

    def fusion(self) -> Fusion | str:
        """``ops.aurora_delta(base, x, A, B, H, Ws, s, lo, h)`` for cubic splines (CPU op, or Triton on CUDA)."""
        if self.order != ORDER:
            return f"spline_order {self.order}: the fused kernel implements cubic splines only"
        lo, _ = self.config.grid_range
        return Fusion(aurora_delta, ("A", "B", "H", "Ws"), (self.scale, lo, self.config.grid_step),
                      linear_op=aurora_linear)

    @classmethod
    def grouped_delta(cls, adapters: list[AuroraAdapter], x: Tensor, offs: Tensor) -> Tensor | None:
        """``s·B_e·σ_e(A_e·drop(x))`` for every expert's rows in one go.

        Grouped matmuls for A and B; σ with each row's own H and Ws gathered (``functional.anl_rows``: r̃×r̃ and
        r̃×(G+K) numbers per row).
        """
        first = adapters[0]
        if not grouped.available(first.A):
            return None
        x = first._input(x, first.A)
        z = grouped.grouped_mm(x, torch.stack([a.A for a in adapters]).transpose(1, 2), offs)  # (S, r)
        ids = torch.searchsorted(offs.to(torch.int64), torch.arange(x.shape[0], device=x.device), right=True)
        ids = ids.clamp(max=len(adapters) - 1)
        h, ws = torch.stack([a.H for a in adapters])[ids], torch.stack([a.Ws for a in adapters])[ids]
        sigma = AF.anl_rows(z, h, ws, first.knots, first.order)
        b = (torch.stack([a.B for a in adapters]) * first.scale).transpose(1, 2)  # (E, r, d_out)
        return grouped.grouped_mm(sigma, b, offs)

    def row_form(self) -> RowForm:
        """``A``, ``s·B`` and the ANL's ``H``, ``Ws`` and knots."""
        cfg = self.config
        grid = (cfg.grid_size, cfg.spline_order, tuple(cfg.grid_range))
        return RowForm(self.A, self.B * self.scale, cfg.dropout, self.H, self.Ws, self.knots, self.order, grid)

    def oracle_delta(self, x: Tensor) -> Tensor:
        """``s·B·σ(A·x)`` from the oracle, with knots rebuilt from the config."""
        cfg = self.config
        knots = AF.spline_knots(cfg.grid_size, cfg.spline_order, cfg.grid_range, dtype=torch.float64)
        knots = knots.to(x.device)
        return AF.aurora_delta(x, self.A, self.B, self.H, self.Ws, knots, cfg.scale, cfg.spline_order)

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

    def lora_factors(self, lossy: bool = False) -> LoraFactors:
        """The static merge as LoRA: ``A' = σ(Aᵀ)ᵀ`` (r̃, d_in), ``B`` and the scale (lossy)."""
        self.delta_weight(lossy)  # raises unless lossy
        dt = AF.spline_dtype(self.A.dtype)
        sigma = AF.anl(self.A.detach().to(dt).t(), self.H.detach().to(dt), self.Ws.detach().to(dt), self.knots,
                       self.order).t()  # (r̃, d_in)
        return LoraFactors(sigma, self.B.detach().to(dt), self.scale)
