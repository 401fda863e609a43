"""ONNX translation of ``aurora_fx::aurora_delta_add`` with standard opset-18 ops only.

The exporter (``torch.onnx.export(dynamo=True)``) calls ``aurora_delta_add_onnx`` through its
``custom_translation_table``; it emits the same closed-form math as the fused CPU kernel:
``z = x·Aᵀ``; ``σ = tanh(tanh(z)·Hᵀ) + Σ_i Σ_k w_k(τ_i)·T[j_i + k]`` with ``T = [0₃ Ws 0₃]ᵀ``
(a Gather plus a cubic polynomial); ``out = base + s·σ·Bᵀ``. Written with ``opset18`` because
the exporter builds at opset 18 (PLATFORM.md §3). The spline runs in the graph's float type.

ATen schema: ``aurora_fx::aurora_delta_add(Tensor base, Tensor x, Tensor A, Tensor B, Tensor H,
Tensor Ws, float scale, float grid_lo, float grid_step) -> (Tensor, Tensor)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

__all__ = ["aurora_delta_add_onnx"]

_ORDER = 3


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


# w_k(τ) = Σ_p τ^p · M[p, k]: the four cubic B-spline pieces (METHODS §2.2) as one MatMul.
_PIECES = [[1.0 / 6, 4.0 / 6, 1.0 / 6, 0.0],
           [-3.0 / 6, 0.0, 3.0 / 6, 0.0],
           [3.0 / 6, -6.0 / 6, 3.0 / 6, 0.0],
           [-1.0 / 6, 3.0 / 6, -3.0 / 6, 1.0 / 6]]
_LEFT, _RIGHT = 7, 4  # zero rows around Ws so that clipped intervals gather only zeros


def _spline(z, Ws, grid_lo: float, grid_step: float, dtype):
    """``Σ_i Σ_k w_k(τ_i)·T[j_i + k]`` with ``T = [0₇ Ws 0₄]ᵀ``: 14 runtime nodes per site.

    ``u = (z − t_0)/h`` (kept with a trailing axis), ``j = ⌊u⌋``, ``τ = u − j``. The interval index
    is cast to int64 and clipped to ``[−4, G+K+3]``: outside the support every gathered row is a
    zero row, so no mask is needed, and a NaN (cast to the most negative int64) lands on zero rows
    too; the NaN still reaches the output through the tanh branch. Fewer nodes matter: at these
    r̃-wide sizes onnxruntime's per-node dispatch costs more than the arithmetic.
    """
    u = op.Add(op.Mul(op.Unsqueeze(z, op.Constant(value_ints=[-1])), _const(1.0 / grid_step, dtype)),
               _const(-(grid_lo - _ORDER * grid_step) / grid_step, dtype))  # (..., r, 1)
    j = op.Floor(u)
    weights = op.MatMul(op.Pow(op.Sub(u, j), _const([0.0, 1.0, 2.0, 3.0], dtype)), _const(_PIECES, dtype))
    upper = op.Add(op.Shape(Ws, start=1, end=2), op.Constant(value_ints=[_ORDER]))  # G+K+3, folded at load
    start = op.Clip(op.Cast(j, to=7), op.Constant(value_int=-4), op.Squeeze(upper))
    idx = op.Add(start, op.Constant(value_ints=[_LEFT - 3, _LEFT - 2, _LEFT - 1, _LEFT]))  # (..., r, 4)
    rows = op.Shape(Ws, start=0, end=1)
    left = op.Expand(_const(0.0, dtype), op.Concat(rows, op.Constant(value_ints=[_LEFT]), axis=0))
    right = op.Expand(_const(0.0, dtype), op.Concat(rows, op.Constant(value_ints=[_RIGHT]), axis=0))
    table = op.Transpose(op.Concat(left, Ws, right, axis=1), perm=[1, 0])  # (7+G+K+4, r), folded at load
    gathered = op.Gather(table, idx, axis=0)  # (..., r, 4, r)
    return op.ReduceSum(op.Mul(op.Unsqueeze(weights, op.Constant(value_ints=[-1])), gathered),
                        op.Constant(value_ints=[-3, -2]), keepdims=0)  # (..., r)


def aurora_delta_add_onnx(base, x, A, B, H, Ws, scale: float, grid_lo: float, grid_step: float):
    """``(base + scale·B·σ(A·x), A·x)`` in standard ONNX ops (see the module docstring)."""
    dtype = _float_dtype(Ws, A, x)
    z = op.MatMul(x, op.Transpose(A, perm=[1, 0]))
    fixed = op.Tanh(op.MatMul(op.Tanh(z), op.Transpose(H, perm=[1, 0])))
    sigma = op.Add(fixed, _spline(z, Ws, grid_lo, grid_step, dtype))
    up = op.Mul(op.Transpose(B, perm=[1, 0]), _const(scale, dtype))  # scale folded into the tiny factor
    return op.Add(base, op.MatMul(sigma, up)), z
