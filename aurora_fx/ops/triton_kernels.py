"""Triton kernels of the fused adapters (GPU; the Triton interpreter runs them on CPU tensors in tests).

Three kernels, the rest left to cuBLAS (``torch.mm``), which is faster on the skinny products
``x·Aᵀ`` (N×r̃ out of N×d_in) and ``g·B`` than a hand-written reduction:

* ``anl_forward_kernel``: σ(z) for a block of rows, all r̃-wide work in registers: ``tanh z``, the
  ``H`` mix, the closed-form cubic B-spline of every channel, the channel sum ``S(z)`` and ``W_s``.
* ``rank_update_kernel``: ``out = base + t·Uᵀ`` for a rank-r (≤ 8) update, one pass over the
  ``(N, d_out)`` output (in place when ``out`` is ``base``). AuroRA uses it with ``t = σ``,
  ``U = s·B``; LoRA with ``t = x·Aᵀ``, ``U = s·B``.
* ``anl_backward_kernel``: ``∂L/∂z`` from ``∂L/∂σ``, and the block's partial sums of ``∂L/∂H`` and
  ``∂L/∂W_s`` (summed over blocks by the caller).

Math in float32 whatever the input dtype (docs/methods.md §2.3). ``R`` (r̃ padded to a power of two)
and ``NB`` (G + K padded) are compile-time constants. The closed form of the cubic basis with
centres ``c_k = c_0 + k·h`` and ``v = z − c_k`` is ``(relu(2h − |v|)³ − 4·relu(h − |v|)³)/(6h³)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["anl_forward_kernel", "anl_backward_kernel", "rank_update_kernel"]


@triton.jit
def _tanh(x):
    """Tanh from exp (the interpreter has no libdevice); saturates correctly at ±inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_rows(ptr, rows, n_rows, r, R: tl.constexpr):
    """A [BLOCK, R] tile of an (n_rows, r) row-major tensor, as float32 (zeros past the edges)."""
    cols = tl.arange(0, R)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < r)
    return tl.load(ptr + rows[:, None] * r + cols[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _load_small(ptr, n0, n1, P0: tl.constexpr, P1: tl.constexpr):
    """A whole small (n0, n1) matrix padded to [P0, P1], as float32."""
    i, j = tl.arange(0, P0), tl.arange(0, P1)
    mask = (i[:, None] < n0) & (j[None, :] < n1)
    return tl.load(ptr + i[:, None] * n1 + j[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _spline(z, centre0, step, nb, NB: tl.constexpr):
    """Basis values and slopes of every channel: two [BLOCK, R, NB] tensors (zero past ``nb``)."""
    k = tl.arange(0, NB)
    centres = centre0 + k.to(tl.float32) * step
    v = z[:, :, None] - centres[None, None, :]
    dist = tl.abs(v)
    outer = tl.maximum(2.0 * step - dist, 0.0)
    inner = tl.maximum(step - dist, 0.0)
    norm = 1.0 / (6.0 * step * step * step)
    valid = (k < nb)[None, None, :]
    basis = tl.where(valid, (outer * outer * outer - 4.0 * inner * inner * inner) * norm, 0.0)
    sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
    slope = tl.where(valid, sign * (12.0 * inner * inner - 3.0 * outer * outer) * norm, 0.0)
    return basis, slope


@triton.jit
def anl_forward_kernel(z_ptr, h_ptr, ws_ptr, sigma_ptr, n_rows, r, nb, centre0, step,
                       BLOCK: tl.constexpr, R: tl.constexpr, NB: tl.constexpr):
    """``σ = tanh(tanh(z)·Hᵀ) + S(z)·W_sᵀ`` for ``BLOCK`` rows of z (N, r)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z, mask = _load_rows(z_ptr, rows, n_rows, r, R)
    H = _load_small(h_ptr, r, r, R, R)  # (j, i)
    Ws = _load_small(ws_ptr, r, nb, R, NB)  # (j, k)
    a = _tanh(z)
    fixed = _tanh(tl.sum(a[:, None, :] * H[None, :, :], axis=2))  # [BLOCK, R(j)]
    basis, _ = _spline(z, centre0, step, nb, NB)
    channel_valid = (tl.arange(0, R) < r)[None, :, None]
    summed = tl.sum(tl.where(channel_valid, basis, 0.0), axis=1)  # S(z): [BLOCK, NB]
    learned = tl.sum(summed[:, None, :] * Ws[None, :, :], axis=2)  # [BLOCK, R(j)]
    cols = tl.arange(0, R)
    tl.store(sigma_ptr + rows[:, None] * r + cols[None, :], (fixed + learned).to(sigma_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def anl_backward_kernel(z_ptr, gs_ptr, h_ptr, ws_ptr, gz_ptr, gh_ptr, gws_ptr, n_rows, r, nb, centre0, step,
                        BLOCK: tl.constexpr, R: tl.constexpr, NB: tl.constexpr):
    """``∂L/∂z`` for ``BLOCK`` rows, and this block's partial ``∂L/∂H`` (r, r), ``∂L/∂W_s`` (r, nb)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    z, mask = _load_rows(z_ptr, rows, n_rows, r, R)
    g_sigma, _ = _load_rows(gs_ptr, rows, n_rows, r, R)  # zero past the edges: no contribution
    H = _load_small(h_ptr, r, r, R, R)
    Ws = _load_small(ws_ptr, r, nb, R, NB)
    a = _tanh(z)
    fixed = _tanh(tl.sum(a[:, None, :] * H[None, :, :], axis=2))
    g_pre = g_sigma * (1.0 - fixed * fixed)  # [BLOCK, R(j)]
    g_z = tl.sum(g_pre[:, :, None] * H[None, :, :], axis=1) * (1.0 - a * a)  # [BLOCK, R(i)]
    basis, slope = _spline(z, centre0, step, nb, NB)
    channel_valid = (tl.arange(0, R) < r)[None, :, None]
    summed = tl.sum(tl.where(channel_valid, basis, 0.0), axis=1)  # [BLOCK, NB]
    g_summed = tl.sum(g_sigma[:, :, None] * Ws[None, :, :], axis=1)  # [BLOCK, NB]
    g_z += tl.sum(slope * g_summed[:, None, :], axis=2)
    cols = tl.arange(0, R)
    tl.store(gz_ptr + rows[:, None] * r + cols[None, :], g_z, mask=mask)
    grad_h = tl.sum(g_pre[:, :, None] * a[:, None, :], axis=0)  # [R(j), R(i)]
    grad_ws = tl.sum(g_sigma[:, :, None] * summed[:, None, :], axis=0)  # [R(j), NB]
    i, k = tl.arange(0, R), tl.arange(0, NB)
    tl.store(gh_ptr + pid * r * r + i[:, None] * r + i[None, :], grad_h, mask=(i[:, None] < r) & (i[None, :] < r))
    tl.store(gws_ptr + pid * r * nb + i[:, None] * nb + k[None, :], grad_ws, mask=(i[:, None] < r) & (k[None, :] < nb))


@triton.jit
def rank_update_kernel(base_ptr, t_ptr, u_ptr, out_ptr, n_rows, d_out, r,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr):
    """``out = base + t·Uᵀ`` for a [BLOCK_N, BLOCK_D] tile; t (N, r), U (d_out, r)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t, _ = _load_rows(t_ptr, rows, n_rows, r, R)
    U, _ = _load_rows(u_ptr, cols, d_out, r, R)  # [BLOCK_D, R]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < d_out)
    offsets = rows[:, None] * d_out + cols[None, :]
    acc = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    acc += tl.sum(t[:, None, :] * U[None, :, :], axis=2)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
