"""ONNX translation of ``aurora_fx::aurora_delta_add`` with standard opset-18 ops only.

The exporter (``torch.onnx.export(dynamo=True)``) calls ``aurora_delta_add_onnx`` through its
``custom_translation_table``. The cubic B-spline is written in its symmetric closed form (the same
function as docs/methods.md §2.2's recursion and the fused kernel's ``spline_basis``): with centres
``c_k = t_{k+2}`` and spacing ``h``,

    B_k(z) = (relu(2h − |z − c_k|)³ − 4·relu(h − |z − c_k|)³) / (6h³)

which is exact everywhere, is 0 outside the support and needs neither a Gather nor a mask.
``z = x·Aᵀ``; the spline branch is one MatMul of the cubes of both halves by
``[Wsᵀ tiled over the r channels · 1/(6h³) ; the same · −4]`` (the channel sum ``S(z)`` and ``W_s``
at once), added to the tanh branch ``tanh(tanh(z)·Hᵀ)``: ``σ``, r̃ wide; then
``out = base + σ·(s·Bᵀ)``. The weight products depend on initializers only, so onnxruntime folds
them once at load: 13 runtime nodes per site. Every MatMul keeps one side r̃ wide or narrow:
onnxruntime's CPU GEMM pads the narrow output side to 16 columns, so a wide-K product such as
``(N, 2·r·(G+K))·(…, d_out)`` costs as much as the whole spline. The adapter runs in its weights'
float type: on a half-precision base with float32 adapters (the default), x is cast to float32 and
the delta back to the base's type (two Cast nodes), so the spline stays float32 as in the op.

ATen schema: ``aurora_fx::aurora_delta_add(Tensor base, Tensor x, Tensor A, Tensor B, Tensor H,
Tensor Ws, float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from aurora_fx.ops.aurora_delta import first_centre

__all__ = ["aurora_delta_add_onnx", "lora_delta_add_onnx", "aurora_linear_onnx", "lora_linear_onnx", "spline_layout"]


def _float_dtype(*values):
    """The graph's float type: from the first value that knows it (Ws, an initializer, always does)."""
    for value in values:
        dtype = getattr(value, "dtype", None)
        if dtype is not None:
            return dtype
    return ir.DataType.FLOAT


def _const(value, dtype):
    """A typed constant, folded by onnxruntime at load (never a CastLike)."""
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype.numpy())))


def _static_dims(Ws) -> tuple[int, int]:
    shape = getattr(Ws, "shape", None)
    dims = tuple(shape) if shape is not None else ()
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        raise ValueError(f"the ONNX translation needs the spline weights' static shape (r, G+K); got {shape}")
    return dims


def spline_layout(rank: int, num_bases: int, grid_lo: float, grid_step: float):
    """Constants of the closed-form spline: expansion ``E``, offsets and radii for ``2·r·(G+K)`` columns.

    Column ``(p, i, k)`` of ``z·E + offsets`` (``p`` the half, ``i`` the channel, ``k`` the basis)
    is ``z_i − c_k``; its term is ``relu(radius_p − |z_i − c_k|)³`` with ``radius = (2h, h)``.
    ``E`` is ``(r, 2·r·(G+K))``.
    """
    centres = first_centre(grid_lo, grid_step) + np.arange(num_bases) * grid_step  # c_k = t_{k+2}
    expand = np.kron(np.ones((1, 2)), np.kron(np.eye(rank), np.ones((1, num_bases))))
    offsets = np.tile(-centres, 2 * rank)
    radii = np.repeat([2 * grid_step, grid_step], rank * num_bases)
    return expand, offsets, radii


def _spline_weights(Ws, rank: int, grid_step: float, dtype):
    """``(2·r·(G+K), r)``: ``Wsᵀ`` tiled over the r channels, times ``1/(6h³)`` and ``−4/(6h³)``.

    Initializers only, folded by onnxruntime at load.
    """
    per_channel = op.Tile(op.Transpose(Ws, perm=[1, 0]), op.Constant(value_ints=[rank, 1]))  # (r·nb, r)
    h3 = 6.0 * grid_step**3
    return op.Concat(op.Mul(per_channel, _const(1.0 / h3, dtype)), op.Mul(per_channel, _const(-4.0 / h3, dtype)),
                     axis=0)


def aurora_delta_add_onnx(base, x, A, B, H, Ws, scale: float, grid_lo: float, grid_step: float, base_dtype=None):
    """``(base + scale·B·σ(A·x), A·x)`` in standard ONNX ops (see the module docstring)."""
    dtype = _float_dtype(Ws, A, x)
    rank, num_bases = _static_dims(Ws)
    expand, offsets, radii = spline_layout(rank, num_bases, grid_lo, grid_step)
    x = _cast(x, getattr(x, "dtype", None), dtype)  # float32 adapters on a half base compute in float32
    z = op.MatMul(x, op.Transpose(A, perm=[1, 0]))
    fixed = op.Tanh(op.MatMul(op.Tanh(z), op.Transpose(H, perm=[1, 0])))
    distance = op.Abs(op.Add(op.MatMul(z, _const(expand, dtype)), _const(offsets, dtype)))
    cubes = op.Pow(op.Relu(op.Sub(_const(radii, dtype), distance)), _const(3.0, dtype))
    sigma = op.Add(fixed, op.MatMul(cubes, _spline_weights(Ws, rank, grid_step, dtype)))  # (..., r)
    up = op.Mul(op.Transpose(B, perm=[1, 0]), _const(scale, dtype))  # scale folded into the tiny factor
    return op.Add(base, _cast(op.MatMul(sigma, up), dtype, base_dtype or getattr(base, "dtype", None))), z


def _cast(value, have, want):
    """``value`` (of type ``have``) as ``want``: a Cast node only where both are known and differ."""
    return value if have is None or want is None or have == want else op.Cast(value, to=want)


def lora_delta_add_onnx(base, x, A, B, scale: float, base_dtype=None):
    """``(base + scale·B·A·x, A·x)`` in two MatMuls (the scale folded into Bᵀ, folded at load).

    ATen schema: ``aurora_fx::lora_delta_add(Tensor base, Tensor x, Tensor A, Tensor B, float scale)
    -> (Tensor, Tensor)``.
    """
    dtype = _float_dtype(A, B, x)
    x = _cast(x, getattr(x, "dtype", None), dtype)
    t = op.MatMul(x, op.Transpose(A, perm=[1, 0]))
    up = op.Mul(op.Transpose(B, perm=[1, 0]), _const(scale, dtype))
    return op.Add(base, _cast(op.MatMul(t, up), dtype, base_dtype or getattr(base, "dtype", None))), t


def _base_linear(x, weight, bias):
    """``x·Wᵀ (+ b)``: the base linear the ``*_linear`` ops compute themselves."""
    base = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return base if bias is None else op.Add(base, bias)


def aurora_linear_onnx(x, weight, bias, A, B, H, Ws, scale: float, grid_lo: float, grid_step: float):
    """``(x·Wᵀ + b + scale·B·σ(A·x), A·x)``.

    ATen schema: ``aurora_fx::aurora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B,
    Tensor H, Tensor Ws, float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)``.
    """
    return aurora_delta_add_onnx(_base_linear(x, weight, bias), x, A, B, H, Ws, scale, grid_lo, grid_step,
                                 base_dtype=getattr(weight, "dtype", None))


def lora_linear_onnx(x, weight, bias, A, B, scale: float):
    """``(x·Wᵀ + b + scale·B·A·x, A·x)``.

    ATen schema: ``aurora_fx::lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B,
    float scale) -> (Tensor, Tensor)``.
    """
    return lora_delta_add_onnx(_base_linear(x, weight, bias), x, A, B, scale, base_dtype=getattr(weight, "dtype", None))
