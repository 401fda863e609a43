"""What a fused adapter node in an owner graph calls: one function per method, picking the kernel.

``aurora_delta(base, x, A, B, H, Ws, s, lo, h)`` and ``lora_delta(base, x, A, B, s)`` return
``base + Δ(x)`` and choose, at each call:

* the Triton ``triton_op`` s on CUDA tensors when Triton is installed (eager runs the kernels;
  ``torch.compile`` traces into them);
* the CPU / generic ``custom_op`` s otherwise (``torch.export`` and the ONNX translation see these);
* the in-place variants in no-grad eager inference: ``base`` is the base linear's own output,
  an intermediate nothing else reads, so the update is accumulated into it (no new output).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

import aurora_fx.ops.aurora_delta  # noqa: F401  (registers aurora_fx::aurora_delta_add)
import aurora_fx.ops.lora_delta  # noqa: F401  (registers aurora_fx::lora_delta_add and the in-place ops)

__all__ = ["aurora_delta", "lora_delta", "triton_available"]

_OPS = torch.ops.aurora_fx


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed, with a backend)."""
    try:
        import aurora_fx.ops.triton_ops  # noqa: F401
    except Exception:  # no triton, or no usable backend
        return False
    return True


def _use_triton(x: Tensor) -> bool:
    return x.is_cuda and triton_available()


def _inplace(base: Tensor) -> bool:
    """No-grad eager inference on a contiguous base output: accumulate into it."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    return not torch.is_grad_enabled() and not tracing and base.is_contiguous()


def aurora_delta(base: Tensor, x: Tensor, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor, scale: float,
                 grid_lo: float, grid_step: float) -> Tensor:
    """``base + s·B·σ(A·x)`` on the best kernel for the call (see the module docstring)."""
    if _use_triton(x):
        from aurora_fx.ops import triton_ops

        if _inplace(base):
            return triton_ops.aurora_delta_add_inplace_triton(base, x, A, B, H, Ws, scale, grid_lo, grid_step)
        return triton_ops.aurora_delta_add_triton(base, x, A, B, H, Ws, scale, grid_lo, grid_step)[0]
    if _inplace(base):
        _OPS.aurora_delta_add_inplace(base, x, A, B, H, Ws, scale, grid_lo, grid_step)
        return base
    return _OPS.aurora_delta_add(base, x, A, B, H, Ws, scale, grid_lo, grid_step)[0]


def lora_delta(base: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``base + s·B·A·x`` on the best kernel for the call."""
    if _use_triton(x):
        from aurora_fx.ops import triton_ops

        if _inplace(base):
            return triton_ops.lora_delta_add_inplace_triton(base, x, A, B, scale)
        return triton_ops.lora_delta_add_triton(base, x, A, B, scale)[0]
    if _inplace(base):
        _OPS.lora_delta_add_inplace(base, x, A, B, scale)
        return base
    return _OPS.lora_delta_add(base, x, A, B, scale)[0]

