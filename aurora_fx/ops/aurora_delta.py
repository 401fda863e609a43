"""The fused AuroRA op ``aurora_fx::aurora_delta_add``: schema, kernel, fake and autograd.

Schema::

    aurora_fx::aurora_delta_add(Tensor base, Tensor x, Tensor A, Tensor B, Tensor H, Tensor Ws,
                                float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)

Returns ``(base + s·B·σ(A·x), z)`` with ``z = A·x``, the r̃-wide code, which the backward needs
(returning it lets the op save ``x`` and ``z`` only, never the ``(N, r̃, G+K)`` spline tensors).
The op takes the base linear's output and accumulates the adapter into it in one pass
(``addmm``; on CPU at r̃ ≤ 4 one ``addcmul`` per rank, ``aurora_fx.ops.skinny``), instead of
writing a separate delta and adding it, which saves a full pass over
the ``(N, d_out)`` output in the forward and another in the backward; the scale is folded into
the tiny B. Only cubic splines (K = 3) on a uniform grid are fused: the basis is evaluated in
its symmetric closed form ``(relu(2h − |z − c_k|)³ − 4·relu(h − |z − c_k|)³)/(6h³)`` (see
``spline_basis``; the same function as docs/methods.md §2.2's recursion), in float32 or wider, exactly
as the oracle ``aurora_fx.functional.aurora_delta``. The ``(N, r̃, G+K)`` basis exists only
transiently, in the forward and again in the backward, never saved.

Shapes: base ``(..., d_out)``, x ``(..., d_in)``, A ``(r, d_in)``, B ``(d_out, r)``,
H ``(r, r)``, Ws ``(r, G+3)``; z ``(..., r)``.

Dtypes: the adapter computes in its parameters' dtype (x is cast to it; float32 adapters on a
bf16/fp16 base, aurora_fx's default) and adds into ``base`` in base's dtype. Under autocast
(CPU or CUDA, bf16 or fp16) every floating input is first cast to the autocast dtype, as autocast
does for the unfused graph's linears; the spline always runs in float32 or wider.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from aurora_fx.functional import spline_dtype
from aurora_fx.ops.skinny import low_rank, low_rank_into, tn

__all__ = ["aurora_delta_add", "spline_basis", "first_centre", "adapter_grads", "AdapterGrads",
           "register_autocast"]

ORDER = 3  # the only spline order the fused kernel implements


def first_centre(grid_lo: float, grid_step: float) -> float:
    """Centre ``c_0 = t_2`` of the first cubic basis; ``c_k = c_0 + k·h``."""
    return grid_lo + (2 - ORDER) * grid_step


def spline_basis(z: Tensor, grid_lo: float, grid_step: float, num_bases: int,
                 derivative: bool = False) -> tuple[Tensor, Tensor | None]:
    """Cubic B-spline basis of every element of ``z`` in closed form (float32 or wider).

    With centres ``c_k = t_{k+2}``, spacing ``h`` and ``v = z − c_k``::

        B_k(z)  = (relu(2h − |v|)³ − 4·relu(h − |v|)³) / (6h³)
        B_k'(z) = sign(v)·(−3·relu(2h − |v|)² + 12·relu(h − |v|)²) / (6h³)

    the same function as docs/methods.md §2.2's recursion (tested to 1e-14), zero outside the support
    with no mask, and only ~10 elementwise ops on an ``(..., r, G+K)`` tensor: no index, gather or
    scatter. Returns ``(basis, derivative or None)``, each ``(..., G+K)`` per element of ``z``.
    """
    zs = z.to(spline_dtype(z.dtype))
    centres = torch.arange(num_bases, dtype=zs.dtype, device=z.device) * grid_step + first_centre(grid_lo, grid_step)
    v = zs.unsqueeze(-1) - centres
    dist = v.abs()
    outer = torch.rsub(dist, 2 * grid_step).clamp_min_(0)
    inner = dist.neg_().add_(grid_step).clamp_min_(0)  # in place: dist is not needed again
    norm = 1.0 / (6 * grid_step**3)
    if not derivative:  # fewest passes over the (..., G+K) tensors: the forward of inference
        return torch.sub(outer.pow_(3), inner.pow_(3), alpha=4).mul_(norm), None
    outer2, inner2 = outer.square(), inner.square()
    basis = torch.sub(outer2 * outer, inner2 * inner, alpha=4).mul_(norm)
    slope = torch.sub(inner2, outer2, alpha=0.25).mul_(v.sign_().mul_(12 * norm))  # 12·inner² − 3·outer²
    return basis, slope


class _Anl(NamedTuple):
    """σ(z) and the pieces of it the backward reuses (all ``(N, ·)``)."""

    sigma: Tensor  # (N, r) in z's dtype
    tanh_z: Tensor  # tanh(z)
    fixed: Tensor  # tanh(tanh(z)·Hᵀ)
    summed: Tensor  # S(z) = Σ_i basis(z_i), (N, G+K), spline dtype
    slope: Tensor | None  # basis'(z_i), (N, r, G+K), when asked for


def _channel_sum(basis: Tensor) -> Tensor:
    """``basis.sum(-2)`` over the r̃ channels, as slice adds (about twice as fast as the strided reduction)."""
    if basis.shape[-2] == 1:
        return basis[..., 0, :].clone()
    summed = basis[..., 0, :] + basis[..., 1, :]
    for i in range(2, basis.shape[-2]):
        summed += basis[..., i, :]
    return summed


def _anl(z: Tensor, H: Tensor, Ws: Tensor, grid_lo: float, grid_step: float, derivative: bool = False) -> _Anl:
    """σ(z): tanh branch plus the spline branch ``S(z)·Wsᵀ`` (the one place both passes compute it)."""
    tanh_z = torch.tanh(z)
    fixed = torch.tanh(tanh_z @ H.t())  # (N, r)
    basis, slope = spline_basis(z, grid_lo, grid_step, Ws.shape[1], derivative)  # (N, r, G+K)
    summed = _channel_sum(basis)
    sigma = fixed + (summed @ Ws.t().to(summed.dtype)).to(z.dtype)
    return _Anl(sigma, tanh_z, fixed, summed, slope)


@torch.library.custom_op("aurora_fx::aurora_delta_add", mutates_args=())
def aurora_delta_add(
    base: Tensor, x: Tensor, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor,
    scale: float, grid_lo: float, grid_step: float,
) -> tuple[Tensor, Tensor]:
    """``(base + scale·B·σ(A·x), A·x)``: the fused AuroRA adapter (see the module docstring)."""
    d_in, d_out, r = x.shape[-1], B.shape[0], A.shape[0]
    x2 = x.reshape(-1, d_in).to(A.dtype)  # (N, d_in), in the adapter's dtype
    # Outputs are allocated in their final shapes and written with out=: returning a reshaped view
    # would make the autograd wrapper clone the whole (N, d_out) output.
    z = x.new_empty(*x.shape[:-1], r, dtype=A.dtype)
    torch.mm(x2, A.t(), out=z.view(-1, r))  # (N, r)
    sigma = _anl(z.view(-1, r), H, Ws, grid_lo, grid_step).sigma  # (N, r)
    base2 = base.reshape(-1, d_out)
    up = (B * scale).t().contiguous()  # (r, d_out), scale folded into the tiny factor
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    low_rank_into(out.view(-1, d_out), sigma, up, base2)  # accumulate into the output in one pass
    return out, z


@aurora_delta_add.register_fake
def _(base, x, A, B, H, Ws, scale, grid_lo, grid_step):
    return torch.empty_like(base), x.new_empty(*x.shape[:-1], A.shape[0], dtype=A.dtype)


def _setup_context(ctx, inputs, output) -> None:
    _, x, A, B, H, Ws, scale, grid_lo, grid_step = inputs
    ctx.save_for_backward(x, A, B, H, Ws, output[1])
    ctx.hyper = (scale, grid_lo, grid_step)


class AdapterGrads(NamedTuple):
    """Gradients of the adapter's own tensors, and of its code z (``(N, r)``), from ``∂L/∂out``."""

    g_z: Tensor
    grad_B: Tensor | None  # noqa: N815 - the math names
    grad_H: Tensor | None  # noqa: N815
    grad_Ws: Tensor | None  # noqa: N815


def adapter_grads(g: Tensor, z2: Tensor, B: Tensor, H: Tensor, Ws: Tensor, scale: float, grid_lo: float,
                  grid_step: float, need: tuple[bool, bool, bool], saved: _Anl | None = None) -> AdapterGrads:
    """Backward through ``s·B·σ(z)`` for ``g`` (N, d_out); ``need`` asks for (grad_B, grad_H, grad_Ws).

    ``saved``: the forward's ``_anl(z2, ..., derivative=True)``, else those cheap N×r pieces are recomputed.
    """
    sigma, a, f, summed, slope = saved or _anl(z2, H, Ws, grid_lo, grid_step, derivative=True)
    ws = Ws.to(summed.dtype)
    # Skinny GEMMs are fast on CPU only in the "(N,d)·(d,r) with a transposed (r,d) operand" and
    # "(r,N)·(N,d)" layouts (up to 8x faster than the naive forms), so the operands are arranged so;
    # the (r,N)·(N,d) reductions run blocked (ops.skinny.tn).
    g_sigma = (g @ B.t().contiguous().t()).to(z2.dtype) * scale  # (N, r)
    grad_B = tn(sigma.to(g.dtype), g).t() * scale if need[0] else None  # (d_out, r)
    # Fixed branch: f = tanh(tanh(z)·Hᵀ).
    g_pre = g_sigma * (1 - f * f)
    grad_H = g_pre.t() @ a if need[1] else None
    g_z = (g_pre @ H) * (1 - a * a)
    # Spline branch: l = S(z)·Wsᵀ with S(z) = Σ_i basis(z_i).
    gs = g_sigma.to(summed.dtype)
    g_z = g_z + (slope * (gs @ ws).unsqueeze(-2)).sum(-1).to(z2.dtype)
    grad_Ws = (gs.t() @ summed).to(Ws.dtype) if need[2] else None
    return AdapterGrads(g_z, grad_B, grad_H, grad_Ws)


def _backward(ctx, grad_out: Tensor, grad_z: Tensor | None):
    x, A, B, H, Ws, z = ctx.saved_tensors
    d_in, d_out, r = x.shape[-1], B.shape[0], A.shape[0]
    need = ctx.needs_input_grad
    x2, z2, g = x.reshape(-1, d_in).to(A.dtype), z.reshape(-1, r), grad_out.reshape(-1, d_out).to(A.dtype)
    grads = adapter_grads(g, z2, B, H, Ws, *ctx.hyper, need[3:6])
    g_z = grads.g_z if grad_z is None else grads.g_z + grad_z.reshape(-1, r)
    grad_x = low_rank(g_z, A).reshape(x.shape).to(x.dtype) if need[1] else None
    grad_A = tn(g_z, x2) if need[2] else None
    grad_base = grad_out if need[0] else None
    return grad_base, grad_x, grad_A, grads.grad_B, grads.grad_H, grads.grad_Ws, None, None, None


aurora_delta_add.register_autograd(_backward, setup_context=_setup_context)

_LIB = torch.library.Library("aurora_fx", "IMPL")  # keeps the autocast registrations alive


def register_autocast(op, name: str) -> None:
    """Give the aurora_fx op ``name`` an autocast rule on every device that has autocast.

    Under autocast, every floating input is cast to the autocast dtype of the moment (bf16 or fp16),
    as autocast does for the unfused graph's linears, then the op runs with autocast off; the
    spline inside still runs in float32. (``torch.library.register_autocast`` fixes one dtype.)
    """
    for device_type in ("cpu", "cuda"):
        if not torch.amp.is_autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _LIB.impl(name, _autocast_kernel(op, device_type, key), key, with_keyset=True)


def _autocast_kernel(op, device_type: str, key: str):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != torch.float64 else a
                for a in args]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast)

    return kernel


register_autocast(aurora_delta_add, "aurora_delta_add")
