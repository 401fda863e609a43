"""The fused AuroRA op ``aurora_fx::aurora_delta_add``: schema, kernel, fake and autograd.

Schema::

    aurora_fx::aurora_delta_add(Tensor base, Tensor x, Tensor A, Tensor B, Tensor H, Tensor Ws,
                                float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)

Returns ``(base + s·B·σ(A·x), z)`` with ``z = A·x``, the r̃-wide code, which the backward needs
(returning it lets the op save ``x`` and ``z`` only, never the ``(N, r̃, G+K)`` spline tensors).
The op takes the base linear's output and accumulates the adapter into it in one GEMM
(``addmm``), instead of writing a separate delta and adding it, which saves a full pass over
the ``(N, d_out)`` output in the forward and another in the backward; the scale is folded into
the tiny B. Only cubic splines (K = 3) on a uniform grid are fused: the basis is evaluated in
closed form as a gather of 4 columns of Ws plus a cubic polynomial (METHODS §2.2), in float32
or wider, exactly as the oracle ``aurora_fx.functional.aurora_delta``.

Shapes: base ``(..., d_out)``, x ``(..., d_in)``, A ``(r, d_in)``, B ``(d_out, r)``,
H ``(r, r)``, Ws ``(r, G+3)``; z ``(..., r)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aurora_fx.functional import spline_dtype

__all__ = ["aurora_delta_add", "spline_terms"]

ORDER = 3  # the only spline order the fused kernel implements


def spline_terms(z: Tensor, grid_lo: float, grid_step: float, num_bases: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form cubic B-spline pieces for every element of ``z`` (float32 or wider).

    Returns:
        ``idx`` ``(..., 4)`` long: columns of the zero-padded spline weights ``[0₃ Ws 0₃]``;
        ``w`` ``(..., 4)``: basis values ``(1-τ)³/6, (3τ³-6τ²+4)/6, (-3τ³+3τ²+3τ+1)/6, τ³/6``;
        ``dw`` ``(..., 4)``: their derivatives in z (``d/dτ`` divided by h);
        ``valid`` ``(...)``: inside the support ``[t_0, t_last)``.
    """
    zs = z.to(spline_dtype(z.dtype))
    u = (zs - (grid_lo - ORDER * grid_step)) / grid_step  # position in knot intervals from t_0
    j = torch.floor(u)
    tau = u - j
    valid = (j >= 0) & (j <= num_bases + ORDER - 1)  # interval index 0 … G+2K-1
    mask = valid.to(zs.dtype).unsqueeze(-1)
    t2, t3 = tau * tau, tau * tau * tau
    w = torch.stack([(1 - tau) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * tau + 1, t3], -1) / 6 * mask
    dw = torch.stack([-((1 - tau) ** 2), 3 * t2 - 4 * tau, -3 * t2 + 2 * tau + 1, t2], -1) / (2 * grid_step) * mask
    base = torch.where(valid, j, torch.zeros_like(j)).long().unsqueeze(-1)
    idx = base + torch.arange(4, device=z.device)
    return idx, w, dw, valid


def _padded_spline_weights(Ws: Tensor, dtype: torch.dtype) -> Tensor:
    """``[0₃ Ws 0₃]ᵀ`` as ``(G+K+6, r)``: row ``j + k`` serves basis ``j - 3 + k``."""
    zeros = Ws.new_zeros(Ws.shape[0], ORDER, dtype=dtype)
    return torch.cat([zeros, Ws.to(dtype), zeros], dim=1).t()


def _anl_forward(z: Tensor, H: Tensor, Ws: Tensor, grid_lo: float, grid_step: float) -> Tensor:
    """σ(z) in z's dtype: tanh branch plus the gathered spline branch."""
    fixed = torch.tanh(torch.tanh(z) @ H.t())  # (N, r)
    idx, w, _, _ = spline_terms(z, grid_lo, grid_step, Ws.shape[1])
    table = _padded_spline_weights(Ws, w.dtype)  # (G+K+6, r)
    learnable = torch.einsum("nik,nikc->nc", w, table[idx])  # (N, r)
    return fixed + learnable.to(z.dtype)


@torch.library.custom_op("aurora_fx::aurora_delta_add", mutates_args=())
def aurora_delta_add(
    base: Tensor, x: Tensor, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor,
    scale: float, grid_lo: float, grid_step: float,
) -> tuple[Tensor, Tensor]:
    """``(base + scale·B·σ(A·x), A·x)``: the fused AuroRA adapter (see the module docstring)."""
    d_in, d_out, r = x.shape[-1], B.shape[0], A.shape[0]
    x2 = x.reshape(-1, d_in)  # (N, d_in)
    # Outputs are allocated in their final shapes and written with out=: returning a reshaped view
    # would make the autograd wrapper clone the whole (N, d_out) output.
    z = x.new_empty(*x.shape[:-1], r)
    torch.mm(x2, A.t(), out=z.view(-1, r))  # (N, r)
    sigma = _anl_forward(z.view(-1, r), H, Ws, grid_lo, grid_step)  # (N, r)
    base2 = base.reshape(-1, d_out)
    up = (B * scale).t().contiguous()  # (r, d_out), scale folded into the tiny factor
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    if base2.dtype == sigma.dtype:
        torch.addmm(base2, sigma, up, out=out.view(-1, d_out))  # accumulate into the output in one GEMM
    else:
        torch.add(base2, (sigma @ up).to(base2.dtype), out=out.view(-1, d_out))
    return out, z


@aurora_delta_add.register_fake
def _(base, x, A, B, H, Ws, scale, grid_lo, grid_step):
    return torch.empty_like(base), x.new_empty(*x.shape[:-1], A.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    _, x, A, B, H, Ws, scale, grid_lo, grid_step = inputs
    ctx.save_for_backward(x, A, B, H, Ws, output[1])
    ctx.hyper = (scale, grid_lo, grid_step)


def _backward(ctx, grad_out: Tensor, grad_z: Tensor | None):
    x, A, B, H, Ws, z = ctx.saved_tensors
    scale, grid_lo, grid_step = ctx.hyper
    d_in, d_out, r = x.shape[-1], B.shape[0], A.shape[0]
    need = ctx.needs_input_grad
    x2, z2, g = x.reshape(-1, d_in), z.reshape(-1, r), grad_out.reshape(-1, d_out)
    # Recompute the cheap N×r pieces of the forward.
    a = torch.tanh(z2)
    f = torch.tanh(a @ H.t())
    idx, w, dw, _ = spline_terms(z2, grid_lo, grid_step, Ws.shape[1])
    table = _padded_spline_weights(Ws, w.dtype)
    gathered = table[idx]  # (N, r, 4, r)
    sigma = f + torch.einsum("nik,nikc->nc", w, gathered).to(z2.dtype)
    # Skinny GEMMs are fast on CPU only in the "(N,d)·(d,r) with a transposed (r,d) operand" and
    # "(r,N)·(N,d)" layouts (up to 8x faster than the naive forms), so the operands are arranged so.
    g_sigma = (g @ B.t().contiguous().t()).to(z2.dtype) * scale  # (N, r)
    grad_B = (sigma.to(g.dtype).t() @ g).t() * scale if need[3] else None  # (d_out, r)
    # Fixed branch: f = tanh(tanh(z)·Hᵀ).
    g_pre = g_sigma * (1 - f * f)
    grad_H = g_pre.t() @ a if need[4] else None
    g_z = (g_pre @ H) * (1 - a * a)
    # Spline branch: l_c = Σ_i Σ_k w_k(z_i)·table[idx_ik, c].
    gs = g_sigma.to(w.dtype)
    g_z = g_z + torch.einsum("nik,nikc,nc->ni", dw, gathered, gs).to(z2.dtype)
    grad_Ws = None
    if need[5]:
        contrib = (w.unsqueeze(-1) * gs[:, None, None, :]).reshape(-1, r)
        grad_table = torch.zeros_like(table).index_add_(0, idx.reshape(-1), contrib)
        grad_Ws = grad_table[ORDER:ORDER + Ws.shape[1]].t().to(Ws.dtype)
    if grad_z is not None:
        g_z = g_z + grad_z.reshape(-1, r)
    grad_x = (g_z @ A).reshape(x.shape) if need[1] else None
    grad_A = g_z.t() @ x2 if need[2] else None
    grad_base = grad_out if need[0] else None
    return grad_base, grad_x, grad_A, grad_B, grad_H, grad_Ws, None, None, None


aurora_delta_add.register_autograd(_backward, setup_context=_setup_context)
