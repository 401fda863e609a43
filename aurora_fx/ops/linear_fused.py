"""The base linear and its adapter in one op: ``aurora_fx::aurora_linear`` and ``aurora_fx::lora_linear``.

Schemas::

    aurora_fx::aurora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor H, Tensor Ws,
                             float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)
    aurora_fx::lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale)
        -> (Tensor, Tensor)

return ``(x·Wᵀ + b + Δ(x), code)`` (``code`` = ``A·x``) for a ``(d_out, d_in)`` weight. Owning the
base linear lets the op write the rank-r update (with the bias) first and let the base GEMM
accumulate into it (beta 1), so the update costs no extra pass over the ``(N, d_out)`` output; in
the backward the base's ``g·W`` GEMM likewise accumulates into the adapter's part of ``∂L/∂x``:
autograd never adds two ``(N, d_in)`` gradients. The fuse pass uses these for every plain-linear site;
while a site's adapter dropout is active the base and the adapter see different inputs:
``AuroraLinearDropout`` (eager CPU training) takes the mask as an input, otherwise
``aurora_fx.ops.fused`` runs the base linear plus ``aurora_delta_add``.
``∂L/∂W`` and ``∂L/∂b`` are computed only when they require grad.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aurora_fx.ops.aurora_delta import _Anl, _anl, adapter_grads, register_autocast
from aurora_fx.ops.skinny import low_rank, low_rank_into, tn

__all__ = ["aurora_linear", "lora_linear", "aurora_linear_kernel", "lora_linear_kernel", "AuroraLinear",
           "LoraLinear", "AuroraLinearDropout"]


def _outputs(x: Tensor, xa: Tensor, weight: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """The op's two outputs in their final shapes, ``code = A·x`` filled.

    Returning reshaped views instead would make the custom op's autograd wrapper clone the whole
    ``(N, d_out)`` output.
    """
    out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype)
    code = x.new_empty(*x.shape[:-1], A.shape[0], dtype=A.dtype)
    torch.mm(xa, A.t(), out=code.view(-1, A.shape[0]))
    return out, code


def _linear_plus(out2: Tensor, xb: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor, up: Tensor) -> None:
    """``out2 = xb·Wᵀ + b + t·up`` with no extra pass over the output.

    The rank-r product (plus the bias) is written first, where the bias broadcast would go anyway;
    the big GEMM then accumulates into it (``addmm_`` with beta 1 reads C inside the GEMM).
    """
    low_rank_into(out2, t, up, bias)
    out2.addmm_(xb, weight.t())


def _flat(x: Tensor, weight: Tensor, A: Tensor):
    x2 = x.reshape(-1, x.shape[-1])
    return x2.to(weight.dtype), x2.to(A.dtype)


def _aurora_forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor,
                    scale: float, grid_lo: float, grid_step: float, keep: Tensor | None = None,
                    drop_scale: float = 1.0, *, derivative: bool = False) -> tuple[Tensor, Tensor, Tensor, _Anl]:
    """``(x·Wᵀ + b + s·B·σ(z), z, xa, σ's pieces)``, ``z = c·A·xa``, with ``xa`` = x (c = 1) or x masked by ``keep``.

    Under dropout ``c = drop_scale`` is folded into the tiny A instead of scaling the ``(N, d_in)`` copy
    (one pass less each way). ``derivative``: also the spline's slope, so a training backward need not
    recompute σ.
    """
    xb, xa = _flat(x, weight, A)
    if keep is not None:
        xa = torch.where(keep.reshape(xa.shape), xa, 0)
    out, z = _outputs(x, xa, weight, A if keep is None else A * drop_scale)
    anl = _anl(z.view(-1, A.shape[0]), H, Ws, grid_lo, grid_step, derivative)
    _linear_plus(out.view(-1, weight.shape[0]), xb, weight, bias, anl.sigma, (B * scale).t().contiguous())
    return out, z, xa, anl


def aurora_linear_kernel(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, H: Tensor,
                         Ws: Tensor, scale: float, grid_lo: float, grid_step: float) -> tuple[Tensor, Tensor]:
    """``(x·Wᵀ + b + s·B·σ(A·x), A·x)``: the CPU kernel of both the custom op and ``AuroraLinear``."""
    return _aurora_forward(x, weight, bias, A, B, H, Ws, scale, grid_lo, grid_step)[:2]


@torch.library.custom_op("aurora_fx::aurora_linear", mutates_args=())
def aurora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, H: Tensor, Ws: Tensor,
                  scale: float, grid_lo: float, grid_step: float) -> tuple[Tensor, Tensor]:
    """``(x·Wᵀ + b + s·B·σ(A·x), A·x)`` (see the module docstring)."""
    return aurora_linear_kernel(x, weight, bias, A, B, H, Ws, scale, grid_lo, grid_step)


@aurora_linear.register_fake
def _(x, weight, bias, A, B, H, Ws, scale, grid_lo, grid_step):
    return (x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype),
            x.new_empty(*x.shape[:-1], A.shape[0], dtype=A.dtype))


def _setup_aurora(ctx, inputs, output, dropped: tuple[Tensor, Tensor] | None = None, anl: _Anl | None = None) -> None:
    """Save what the backward needs.

    ``dropped`` = (keep, xa) when the adapter saw a dropped copy of x; ``anl`` = the forward's σ pieces
    with the slope (eager Functions; the custom op's backward recomputes them from z).
    """
    x, weight, bias, A, B, H, Ws, scale, grid_lo, grid_step = inputs[:10]
    ctx.save_for_backward(x, weight, A, B, H, Ws, output[1], *(dropped or ()), *(anl or ()))
    ctx.hyper, ctx.has_bias = (scale, grid_lo, grid_step), bias is not None
    ctx.dropped, ctx.saved_anl = dropped is not None, anl is not None


def _base_grads(ctx, g: Tensor, xb: Tensor, weight: Tensor, g_code: Tensor, A: Tensor, x: Tensor,
                keep: Tensor | None = None):
    """``∂L/∂x = g·W + g_code·A`` (accumulated in place), ``∂L/∂W``, ``∂L/∂b`` when needed.

    Under dropout the adapter's part is masked by ``keep`` in place (``g_code`` already carries the keep scale).
    """
    need = ctx.needs_input_grad
    grad_x = None
    if need[0]:
        part = low_rank(g_code.to(A.dtype), A)  # (N, d_in): the adapter's part first ...
        if keep is not None:
            torch.where(keep.reshape(part.shape), part, part.new_zeros(()), out=part)
        grad_x = part.to(weight.dtype)
        grad_x.addmm_(g.to(weight.dtype), weight)  # ... then the base's g·W GEMM accumulates into it
        grad_x = grad_x.reshape(x.shape).to(x.dtype)
    grad_w = (g.t() @ xb).to(weight.dtype) if need[1] else None
    grad_b = g.sum(0).to(weight.dtype) if need[2] and ctx.has_bias else None
    return grad_x, grad_w, grad_b


def _backward_aurora(ctx, grad_out: Tensor, grad_z: Tensor | None):
    x, weight, A, B, H, Ws, z, *rest = ctx.saved_tensors
    xb, xa = _flat(x, weight, A)
    keep, xa = rest[:2] if ctx.dropped else (None, xa)
    saved = _Anl(*rest[-len(_Anl._fields):]) if ctx.saved_anl else None
    r, need = A.shape[0], ctx.needs_input_grad
    g = grad_out.reshape(-1, weight.shape[0])
    grads = adapter_grads(g.to(A.dtype), z.reshape(-1, r), B, H, Ws, *ctx.hyper, need[4:7], saved)
    g_z = grads.g_z if grad_z is None else grads.g_z + grad_z.reshape(-1, r)
    if ctx.dropped:  # z = c·A·xa: both of z's inputs see the keep scale c; apply it once, to the (N, r) g_z
        g_z = g_z * ctx.drop_scale
    grad_x, grad_w, grad_b = _base_grads(ctx, g, xb, weight, g_z, A, x, keep)
    grad_A = tn(g_z, xa) if need[3] else None
    return grad_x, grad_w, grad_b, grad_A, grads.grad_B, grads.grad_H, grads.grad_Ws, None, None, None


aurora_linear.register_autograd(_backward_aurora, setup_context=_setup_aurora)


def lora_linear_kernel(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                       scale: float) -> tuple[Tensor, Tensor]:
    """``(x·Wᵀ + b + s·B·A·x, A·x)``: the CPU kernel of both the custom op and ``LoraLinear``."""
    xb, xa = _flat(x, weight, A)
    out, t = _outputs(x, xa, weight, A)
    _linear_plus(out.view(-1, weight.shape[0]), xb, weight, bias, t.view(-1, A.shape[0]),
                 (B * scale).t().contiguous())
    return out, t


@torch.library.custom_op("aurora_fx::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scale: float) -> tuple[Tensor, Tensor]:
    """``(x·Wᵀ + b + s·B·A·x, A·x)`` (see the module docstring)."""
    return lora_linear_kernel(x, weight, bias, A, B, scale)


@lora_linear.register_fake
def _(x, weight, bias, A, B, scale):
    return (x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype),
            x.new_empty(*x.shape[:-1], A.shape[0], dtype=A.dtype))


def _setup_lora(ctx, inputs, output) -> None:
    x, weight, bias, A, B, scale = inputs
    ctx.save_for_backward(x, weight, A, B, output[1])
    ctx.scale, ctx.has_bias = scale, bias is not None


def _backward_lora(ctx, grad_out: Tensor, grad_t: Tensor | None):
    x, weight, A, B, t = ctx.saved_tensors
    xb, xa = _flat(x, weight, A)
    r, need = A.shape[0], ctx.needs_input_grad
    g = grad_out.reshape(-1, weight.shape[0])
    ga = g.to(A.dtype)
    g_t = (ga @ B.t().contiguous().t()) * ctx.scale  # (N, r), the fast skinny layout
    if grad_t is not None:
        g_t = g_t + grad_t.reshape(-1, r)
    grad_x, grad_w, grad_b = _base_grads(ctx, g, xb, weight, g_t, A, x)
    grad_A = tn(g_t, xa) if need[3] else None
    grad_B = tn(t.reshape(-1, r), ga).t() * ctx.scale if need[4] else None
    return grad_x, grad_w, grad_b, grad_A, grad_B, None


lora_linear.register_autograd(_backward_lora, setup_context=_setup_lora)

register_autocast(aurora_linear, "aurora_linear")
register_autocast(lora_linear, "lora_linear")


class AuroraLinear(torch.autograd.Function):
    """Eager training path: the kernel and backward of ``aurora_fx::aurora_linear``, as a Function.

    It skips the custom op's dispatch layers (about 1 ms a call on CPU); compile and export use the op.
    """

    @staticmethod
    def forward(ctx, *inputs):  # noqa: D102
        out, z, _, anl = _aurora_forward(*inputs, derivative=True)
        _setup_aurora(ctx, inputs, (out, z), anl=anl)
        return out, z

    @staticmethod
    def backward(ctx, grad_out, grad_z):  # noqa: D102
        return _backward_aurora(ctx, grad_out, grad_z)


class LoraLinear(torch.autograd.Function):
    """Eager training path of ``aurora_fx::lora_linear`` (see ``AuroraLinear``)."""

    @staticmethod
    def forward(ctx, *inputs):  # noqa: D102
        output = lora_linear_kernel(*inputs)
        _setup_lora(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_t):  # noqa: D102
        return _backward_lora(ctx, grad_out, grad_t)


class AuroraLinearDropout(torch.autograd.Function):
    """Eager CPU training with active input dropout: ``x·Wᵀ + b + s·B·σ(A·(x⊙keep)·c)``, one pass over the output.

    Inputs are ``AuroraLinear``'s plus ``keep`` (bool, x's shape) and ``c = 1/(1-p)`` from
    ``aurora_fx.ops.dropout`` (the mask ``InputDropout`` would draw). The base linear sees x, the
    adapter the dropped copy (saved for ``∂L/∂A``); the backward masks the adapter's part of ``∂L/∂x``
    in place and lets the base's ``g·W`` GEMM accumulate into it, so dropout adds no ``(N, d)`` sum.
    """

    @staticmethod
    def forward(ctx, *inputs):  # noqa: D102
        out, z, xa, anl = _aurora_forward(*inputs, derivative=True)
        keep, ctx.drop_scale = inputs[10:12]
        _setup_aurora(ctx, inputs, (out, z), dropped=(keep, xa), anl=anl)
        return out, z

    @staticmethod
    def backward(ctx, grad_out, grad_z):  # noqa: D102
        return (*_backward_aurora(ctx, grad_out, grad_z), None, None)
