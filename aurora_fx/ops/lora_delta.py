"""The fused LoRA op ``aurora_fx::lora_delta_add`` (CPU and generic kernel), and the in-place variants.

Schema::

    aurora_fx::lora_delta_add(Tensor base, Tensor x, Tensor A, Tensor B, float scale) -> (Tensor, Tensor)

returns ``(base + s·B·A·x, A·x)``: the rank-r update is accumulated into the base output in one pass
(``addmm``, or one ``addcmul`` per rank at r ≤ 4 on CPU: ``aurora_fx.ops.skinny``), the scale
folded into the tiny ``B``, and ``t = A·x`` returned so the backward saves x
and t only. The adapter computes in its parameters' dtype and adds into ``base`` in base's.

``aurora_delta_add_inplace`` and ``lora_delta_add_inplace`` (``mutates_args={"base"}``) accumulate
into ``base`` itself, for no-grad inference where ``base`` is an intermediate (the base linear's own
output): one pass over the output and no new allocation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aurora_fx.ops.aurora_delta import _anl, register_autocast
from aurora_fx.ops.skinny import low_rank, low_rank_into, tn

__all__ = ["lora_delta_add", "aurora_delta_add_inplace", "lora_delta_add_inplace"]


@torch.library.custom_op("aurora_fx::lora_delta_add", mutates_args=())
def lora_delta_add(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(base + scale·B·A·x, A·x)``: the fused LoRA adapter (see the module docstring)."""
    d_in, d_out, r = x.shape[-1], B.shape[0], A.shape[0]
    t = x.new_empty(*x.shape[:-1], r, dtype=A.dtype)
    torch.mm(x.reshape(-1, d_in).to(A.dtype), A.t(), out=t.view(-1, r))
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    low_rank_into(out.view(-1, d_out), t.view(-1, r), (B * scale).t().contiguous(), base.reshape(-1, d_out))
    return out, t


@lora_delta_add.register_fake
def _(base, x, A, B, scale):
    return torch.empty_like(base), x.new_empty(*x.shape[:-1], A.shape[0], dtype=A.dtype)


def _setup(ctx, inputs, output) -> None:
    _, x, A, B, scale = inputs
    ctx.save_for_backward(x, A, B, output[1])
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor, grad_t: Tensor | None):
    x, A, B, t = ctx.saved_tensors
    d_in, d_out, r = x.shape[-1], B.shape[0], A.shape[0]
    need = ctx.needs_input_grad
    x2, t2 = x.reshape(-1, d_in).to(A.dtype), t.reshape(-1, r)
    g = grad_out.reshape(-1, d_out).to(A.dtype)
    # the fast skinny layouts of the CPU GEMM (see aurora_delta._backward)
    g_t = (g @ B.t().contiguous().t()) * ctx.scale  # (N, r)
    if grad_t is not None:
        g_t = g_t + grad_t.reshape(-1, r)
    grad_B = tn(t2, g).t() * ctx.scale if need[3] else None
    grad_x = low_rank(g_t, A).reshape(x.shape).to(x.dtype) if need[1] else None
    grad_A = tn(g_t, x2) if need[2] else None
    return (grad_out if need[0] else None), grad_x, grad_A, grad_B, None


lora_delta_add.register_autograd(_backward, setup_context=_setup)
register_autocast(lora_delta_add, "lora_delta_add")


@torch.library.custom_op("aurora_fx::lora_delta_add_inplace", mutates_args={"base"})
def lora_delta_add_inplace(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> None:
    """``base += scale·B·A·x`` in place (``base`` contiguous; no autograd)."""
    base2 = base.view(-1, base.shape[-1])
    t = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.t()
    low_rank_into(base2, t, (B * scale).t().contiguous(), base2)


@torch.library.custom_op("aurora_fx::aurora_delta_add_inplace", mutates_args={"base"})
def aurora_delta_add_inplace(base: Tensor, x: Tensor, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor, scale: float,
                             grid_lo: float, grid_step: float) -> None:
    """``base += scale·B·σ(A·x)`` in place (``base`` contiguous; no autograd)."""
    base2 = base.view(-1, base.shape[-1])
    z = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.t()
    sigma = _anl(z, H, Ws, grid_lo, grid_step).sigma
    low_rank_into(base2, sigma, (B * scale).t().contiguous(), base2)
