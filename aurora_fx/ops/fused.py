"""What a fused adapter node in an owner graph calls: one function per method, picking the kernel.

``aurora_delta(base, x, A, B, H, Ws, s, lo, h)`` and ``lora_delta(base, x, A, B, s)`` return
``base + Δ(x)``; ``aurora_linear(x, W, b, A, B, H, Ws, s, lo, h)`` and ``lora_linear(x, W, b, A, B, s)``
also compute the base linear (with active adapter dropout, in training: AuroRA's one-op CPU path with
the mask as an input, else the base linear and the delta op on the dropped input). They choose, at
each call:

* the Triton ``triton_op`` s on CUDA tensors when Triton is installed (eager runs the kernels;
  ``torch.compile`` traces into them);
* the CPU / generic ``custom_op`` s otherwise (``torch.export`` and the ONNX translation see these);
* the in-place variants in no-grad eager inference: ``base`` is the base linear's own output,
  an intermediate nothing else reads, so the update is accumulated into it (no new output).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

import aurora_fx.ops.aurora_delta  # noqa: F401  (registers aurora_fx::aurora_delta_add)
import aurora_fx.ops.dropout as D
import aurora_fx.ops.linear_fused as LF  # (registers aurora_fx::aurora_linear and lora_linear)
import aurora_fx.ops.lora_delta  # noqa: F401  (registers aurora_fx::lora_delta_add and the in-place ops)

__all__ = ["aurora_delta", "lora_delta", "aurora_linear", "lora_linear", "triton_available"]

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
    return not torch.is_grad_enabled() and not _tracing() and base.is_contiguous()


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



def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _eager(kernel, function, op, args: tuple) -> Tensor:
    """Run a fused linear op: the custom op under compile/export, else the kernel directly.

    Eager calls skip the custom op's dispatch layers: the kernel itself under no-grad, else the
    autograd Function; autocast is applied here, as the op's autocast rule would.
    """
    if _tracing():
        return op(*args)[0]
    device = args[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != torch.float64
                     else a for a in args)
        with torch.autocast(device, enabled=False):
            return _eager(kernel, function, op, args)
    if not torch.is_grad_enabled():
        return kernel(*args)[0]
    return function.apply(*args)[0]


def _active(dropout: nn.Module | None) -> bool:
    return dropout is not None and dropout.training and dropout.p > 0


def _adapter_input(x: Tensor, A: Tensor, dropout: nn.Module | None) -> Tensor:
    """What the adapter sees: ``drop(x)`` in A's dtype while the dropout is active, else x."""
    return dropout(x.to(A.dtype)) if _active(dropout) else x


def _fused_dropout(x: Tensor, dropout: nn.Module) -> bool:
    """Eager CPU training without autocast, with the adapters' own dropout: one op, mask included."""
    return (isinstance(dropout, D.InputDropout) and x.device.type == "cpu" and torch.is_grad_enabled()
            and not _tracing() and not torch.is_autocast_enabled("cpu"))


def aurora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor,
                  scale: float, grid_lo: float, grid_step: float, dropout: nn.Module | None = None) -> Tensor:
    """``x·Wᵀ + b + s·B·σ(A·drop(x))`` in one op on the CPU (the base linear is cuBLAS's on CUDA).

    While ``dropout`` (the adapter's own) is active, the base sees x and the adapter the dropped copy:
    ``AuroraLinearDropout`` with the mask as an input in eager CPU training, else ``linear`` plus
    ``aurora_delta``; in eval the dropout is the identity and the op is fused.
    """
    args = (x, weight, bias, A, B, H, Ws, scale, grid_lo, grid_step)
    if _active(dropout) and _fused_dropout(x, dropout):
        keep = D.keep_mask(x.shape, dropout.p, x.device)  # the mask InputDropout would draw
        return LF.AuroraLinearDropout.apply(*args, keep, D.keep_scale(dropout.p))[0]
    if _active(dropout) or _use_triton(x):
        base = torch.nn.functional.linear(x, weight, bias)
        return aurora_delta(base, _adapter_input(x, A, dropout), A, B, H, Ws, scale, grid_lo, grid_step)
    return _eager(LF.aurora_linear_kernel, LF.AuroraLinear, _OPS.aurora_linear, args)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: nn.Module | None = None) -> Tensor:
    """``x·Wᵀ + b + s·B·A·drop(x)`` in one op on the CPU (``dropout`` as in ``aurora_linear``)."""
    if _active(dropout) or _use_triton(x):
        return lora_delta(torch.nn.functional.linear(x, weight, bias), _adapter_input(x, A, dropout), A, B, scale)
    return _eager(LF.lora_linear_kernel, LF.LoraLinear, _OPS.lora_linear, (x, weight, bias, A, B, scale))
