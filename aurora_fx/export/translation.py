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


def _const(value, like):
    """A scalar constant of ``like``'s float type (typed at export time: ORT folds it)."""
    dtype = getattr(like, "dtype", None)
    if dtype is None:  # untyped value: let the graph cast it
        return op.CastLike(op.Constant(value_float=float(value)), like)
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype.numpy())))


def _cast_like(value, like):
    dtype = getattr(like, "dtype", None)
    return op.Cast(value, to=int(dtype)) if dtype is not None else op.CastLike(value, like)


def _spline(z, Ws, grid_lo: float, grid_step: float):
    """``Σ_i Σ_k w_k(z_i)·[0₃ Ws 0₃][:, j_i + k]`` → same shape as z."""
    u = op.Div(op.Sub(z, _const(grid_lo - _ORDER * grid_step, z)), _const(grid_step, z))
    j = op.Floor(u)
    tau = op.Sub(u, j)
    num_bases = op.Shape(Ws, start=1, end=2)  # G + K, int64 (1,)
    last = _cast_like(op.Add(num_bases, op.Constant(value_ints=[_ORDER - 1])), j)  # last valid interval
    zero = _const(0.0, z)
    valid = op.And(op.GreaterOrEqual(j, zero), op.LessOrEqual(j, last))
    one, two, three, four, six = (_const(v, z) for v in (1.0, 2.0, 3.0, 4.0, 6.0))
    t2 = op.Mul(tau, tau)
    t3 = op.Mul(t2, tau)
    om = op.Sub(one, tau)
    w0 = op.Where(valid, op.Mul(om, op.Mul(om, om)), zero)
    w1 = op.Where(valid, op.Add(op.Sub(op.Mul(three, t3), op.Mul(op.Mul(two, three), t2)), four), zero)
    w2 = op.Where(valid, op.Add(op.Add(op.Add(op.Mul(op.Neg(three), t3), op.Mul(three, t2)), op.Mul(three, tau)), one),
                  zero)
    w3 = op.Where(valid, t3, zero)
    axis = op.Constant(value_ints=[-1])
    weights = op.Div(op.Concat(op.Unsqueeze(w0, axis), op.Unsqueeze(w1, axis), op.Unsqueeze(w2, axis),
                               op.Unsqueeze(w3, axis), axis=-1), six)  # (..., r, 4)
    start = op.Cast(op.Where(valid, j, zero), to=7)  # int64
    idx = op.Add(op.Unsqueeze(start, axis), op.Constant(value_ints=[0, 1, 2, 3]))  # (..., r, 4)
    pad = op.Expand(_const(0.0, Ws), op.Concat(op.Shape(Ws, start=0, end=1), op.Constant(value_ints=[_ORDER]),
                                               axis=0))
    table = op.Transpose(op.Concat(pad, Ws, pad, axis=1), perm=[1, 0])  # (G+K+6, r)
    gathered = op.Gather(table, idx, axis=0)  # (..., r, 4, r)
    summed = op.ReduceSum(op.Mul(op.Unsqueeze(weights, axis), gathered), op.Constant(value_ints=[-3, -2]),
                          keepdims=0)
    return summed  # (..., r)


def aurora_delta_add_onnx(base, x, A, B, H, Ws, scale: float, grid_lo: float, grid_step: float):
    """``(base + scale·B·σ(A·x), A·x)`` in standard ONNX ops (see the module docstring)."""
    z = op.MatMul(x, op.Transpose(A, perm=[1, 0]))
    fixed = op.Tanh(op.MatMul(op.Tanh(z), op.Transpose(H, perm=[1, 0])))
    sigma = op.Add(fixed, _spline(z, Ws, grid_lo, grid_step))
    delta = op.Mul(op.MatMul(sigma, op.Transpose(B, perm=[1, 0])), _const(scale, sigma))
    return op.Add(base, delta), z
