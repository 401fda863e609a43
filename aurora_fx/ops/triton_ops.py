"""The fused adapters as ``torch.library.triton_op`` s: eager CUDA runs their Triton kernels.

``torch.compile(fullgraph=True)`` traces into them (inductor sees the kernels, unlike an opaque
``custom_op``).

Schemas (the same contracts as the CPU ops in ``aurora_delta.py`` and ``lora_delta.py``)::

    aurora_fx::aurora_delta_add_triton(Tensor base, Tensor x, Tensor A, Tensor B, Tensor H, Tensor Ws,
                                       float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)
    aurora_fx::lora_delta_add_triton(Tensor base, Tensor x, Tensor A, Tensor B, float scale)
        -> (Tensor, Tensor)

each returning ``(base + Δ(x), code)`` with ``code = x·Aᵀ``, which the backward reuses. The skinny
GEMMs go to cuBLAS (``torch.mm``); σ, its backward and the rank-r̃ update into the base output are
the kernels of ``triton_kernels.py``. ``*_inplace_triton`` variants accumulate into ``base`` (for
no-grad inference). Importing this module needs Triton; with ``TRITON_INTERPRET=1`` set before
Triton is imported, the kernels run on CPU tensors (the tests do that).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from aurora_fx.ops.aurora_delta import first_centre
from aurora_fx.ops.triton_kernels import anl_backward_kernel, anl_forward_kernel, rank_update_kernel

__all__ = ["anl_forward", "anl_backward", "rank_update", "aurora_delta_add_triton", "lora_delta_add_triton",
           "aurora_delta_add_inplace_triton", "lora_delta_add_inplace_triton"]

BLOCK_ROWS, BLOCK_N, BLOCK_D = 64, 32, 64


def _pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


@triton_op("aurora_fx::anl_forward_triton", mutates_args=())
def anl_forward(z: Tensor, H: Tensor, Ws: Tensor, grid_lo: float, grid_step: float) -> Tensor:
    """σ(z) for z (N, r) in z's dtype (float32 math)."""
    z, H, Ws = z.contiguous(), H.contiguous(), Ws.contiguous()
    n, r = z.shape
    sigma = torch.empty_like(z)
    wrap_triton(anl_forward_kernel)[(triton.cdiv(n, BLOCK_ROWS),)](
        z, H, Ws, sigma, n, r, Ws.shape[1], first_centre(grid_lo, grid_step), grid_step,
        BLOCK=BLOCK_ROWS, R=_pow2(r), NB=_pow2(Ws.shape[1]))
    return sigma


@triton_op("aurora_fx::anl_backward_triton", mutates_args=())
def anl_backward(z: Tensor, g_sigma: Tensor, H: Tensor, Ws: Tensor, grid_lo: float,
                 grid_step: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂z, ∂L/∂H, ∂L/∂W_s)`` from ``∂L/∂σ``, all float32."""
    z, g_sigma, H, Ws = z.contiguous(), g_sigma.float().contiguous(), H.contiguous(), Ws.contiguous()
    n, r = z.shape
    nb, blocks = Ws.shape[1], triton.cdiv(n, BLOCK_ROWS)
    g_z = torch.empty(n, r, device=z.device, dtype=torch.float32)
    g_h = torch.empty(blocks, r, r, device=z.device, dtype=torch.float32)
    g_ws = torch.empty(blocks, r, nb, device=z.device, dtype=torch.float32)
    wrap_triton(anl_backward_kernel)[(blocks,)](
        z, g_sigma, H, Ws, g_z, g_h, g_ws, n, r, nb, first_centre(grid_lo, grid_step), grid_step,
        BLOCK=BLOCK_ROWS, R=_pow2(r), NB=_pow2(nb))
    return g_z, g_h.sum(0), g_ws.sum(0)


def _launch_rank_update(base: Tensor, t: Tensor, U: Tensor, out: Tensor) -> None:
    n, d_out = base.shape
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(d_out, BLOCK_D))
    wrap_triton(rank_update_kernel)[grid](base, t.contiguous(), U.contiguous(), out, n, d_out, t.shape[1],
                                          BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, R=_pow2(t.shape[1]))


@triton_op("aurora_fx::rank_update_triton", mutates_args=())
def rank_update(base: Tensor, t: Tensor, U: Tensor) -> Tensor:
    """``base + t·Uᵀ`` (N, d_out) in base's dtype, one pass over the output."""
    base = base.contiguous()
    out = torch.empty_like(base)
    _launch_rank_update(base, t, U, out)
    return out


@triton_op("aurora_fx::rank_update_inplace_triton", mutates_args={"base"})
def rank_update_(base: Tensor, t: Tensor, U: Tensor) -> None:
    """``base += t·Uᵀ`` in place (``base`` contiguous)."""
    _launch_rank_update(base, t, U, base)


def _flat(base: Tensor, x: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    return base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]).to(A.dtype)


@triton_op("aurora_fx::aurora_delta_add_triton", mutates_args=())
def aurora_delta_add_triton(base: Tensor, x: Tensor, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor, scale: float,
                            grid_lo: float, grid_step: float) -> tuple[Tensor, Tensor]:
    """``(base + s·B·σ(A·x), A·x)`` on the GPU kernels."""
    base2, x2 = _flat(base, x, A)
    z = x2 @ A.t()  # (N, r): cuBLAS
    sigma = anl_forward(z, H, Ws, grid_lo, grid_step)
    out = rank_update(base2, sigma, B * scale)
    return out.view(base.shape), z.view(*x.shape[:-1], A.shape[0])


@triton_op("aurora_fx::lora_delta_add_triton", mutates_args=())
def lora_delta_add_triton(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(base + s·B·A·x, A·x)``: the LoRA update accumulated into the base output in one pass."""
    base2, x2 = _flat(base, x, A)
    t = x2 @ A.t()
    out = rank_update(base2, t, B * scale)
    return out.view(base.shape), t.view(*x.shape[:-1], A.shape[0])


def aurora_delta_add_inplace_triton(base: Tensor, x: Tensor, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor,
                                    scale: float, grid_lo: float, grid_step: float) -> Tensor:
    """No-grad inference: accumulate into ``base`` (an intermediate) and return it."""
    base2, x2 = _flat(base, x, A)
    rank_update_(base2, anl_forward(x2 @ A.t(), H, Ws, grid_lo, grid_step), B * scale)
    return base


def lora_delta_add_inplace_triton(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """No-grad inference: ``base += s·B·A·x`` and return it."""
    base2, x2 = _flat(base, x, A)
    rank_update_(base2, x2 @ A.t(), B * scale)
    return base


def _save_aurora(ctx, inputs, output) -> None:
    _, x, A, B, H, Ws, scale, grid_lo, grid_step = inputs
    ctx.save_for_backward(x, A, B, H, Ws, output[1])
    ctx.hyper = (scale, grid_lo, grid_step)


def _aurora_backward(ctx, grad_out: Tensor, grad_z: Tensor | None):
    x, A, B, H, Ws, z = ctx.saved_tensors
    scale, grid_lo, grid_step = ctx.hyper
    r = A.shape[0]
    x2, z2 = x.reshape(-1, x.shape[-1]).to(A.dtype), z.reshape(-1, r)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(A.dtype)
    sigma = anl_forward(z2, H, Ws, grid_lo, grid_step)  # recomputed: N×r̃, cheap
    g_sigma = (g @ B) * scale
    g_z, g_h, g_ws = anl_backward(z2, g_sigma, H, Ws, grid_lo, grid_step)
    if grad_z is not None:
        g_z = g_z + grad_z.reshape(-1, r).float()
    g_z = g_z.to(A.dtype)
    return (grad_out, (g_z @ A).reshape(x.shape).to(x.dtype), g_z.t() @ x2, (g.t() @ sigma) * scale,
            g_h.to(H.dtype), g_ws.to(Ws.dtype), None, None, None)


def _save_lora(ctx, inputs, output) -> None:
    _, x, A, B, scale = inputs
    ctx.save_for_backward(x, A, B, output[1])
    ctx.scale = scale


def _lora_backward(ctx, grad_out: Tensor, grad_t: Tensor | None):
    x, A, B, t = ctx.saved_tensors
    r = A.shape[0]
    x2, t2 = x.reshape(-1, x.shape[-1]).to(A.dtype), t.reshape(-1, r)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(A.dtype)
    g_t = (g @ B) * ctx.scale
    if grad_t is not None:
        g_t = g_t + grad_t.reshape(-1, r)
    return grad_out, (g_t @ A).reshape(x.shape).to(x.dtype), g_t.t() @ x2, (g.t() @ t2) * ctx.scale, None


aurora_delta_add_triton.register_autograd(_aurora_backward, setup_context=_save_aurora)
lora_delta_add_triton.register_autograd(_lora_backward, setup_context=_save_lora)
