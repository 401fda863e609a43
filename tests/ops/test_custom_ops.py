"""Every aurora_fx custom op: ``torch.library.opcheck`` (schema, fake, autograd registration, AOT dispatch) and,
for the differentiable ones, float64 ``gradcheck``; the in-place ops against the oracle.

``aurora_delta_add`` has its own file (``test_aurora_delta.py``); this one covers the rest: ``lora_delta_add``,
``aurora_linear``, ``lora_linear`` (with and without a bias), the in-place inference ops, ``AuroraLinearDropout``
(the eager training path with a mask) and ``keep_mask`` (random: schema and fake only).
"""

from __future__ import annotations

import pytest
import torch

import aurora_fx.ops.fused  # noqa: F401  (registers every op)
from aurora_fx import functional as AF
from aurora_fx.ops import linear_fused as LF
from aurora_fx.ops.dropout import keep_scale

OPS = torch.ops.aurora_fx
HYPER = (2.0, -1.0, 0.4)  # scale, grid_lo, grid_step (the default grid)
KNOTS = AF.spline_knots(dtype=torch.float64)


def _t(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)


def _lora(grad=False, batch=(3, 5), d_in=6, d_out=4, r=2):
    return _t(*batch, d_out, grad=grad), _t(*batch, d_in, grad=grad), _t(r, d_in, grad=grad), _t(d_out, r, grad=grad)


def _linear(bias: bool, grad=False, batch=(3, 5), d_in=6, d_out=4, r=2):
    return (_t(*batch, d_in, grad=grad), _t(d_out, d_in, grad=grad), _t(d_out, grad=grad) if bias else None,
            _t(r, d_in, grad=grad), _t(d_out, r, grad=grad))


def _anl(grad=False, r=2):
    return _t(r, r, grad=grad), _t(r, 8, grad=grad)


def test_lora_delta_add_opcheck_and_gradcheck():
    torch.library.opcheck(OPS.lora_delta_add.default, (*_lora(grad=True), 2.0))
    args = _lora(grad=True)
    assert torch.autograd.gradcheck(lambda *a: OPS.lora_delta_add(*a, 2.0)[0], args)
    base, x, A, B = _lora()
    torch.testing.assert_close(OPS.lora_delta_add(base, x, A, B, 2.0)[0], base + AF.lora_delta(x, A, B, 2.0))


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_opcheck_and_gradcheck(bias):
    torch.library.opcheck(OPS.lora_linear.default, (*_linear(bias, grad=True), 2.0))
    args = tuple(a for a in _linear(bias, grad=True) if a is not None)

    def f(*a):
        x, w, *rest = a
        b, A, B = (rest if bias else (None, *rest))
        return OPS.lora_linear(x, w, b, A, B, 2.0)[0]

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("bias", [True, False])
def test_aurora_linear_opcheck_gradcheck_and_oracle(bias):
    torch.library.opcheck(OPS.aurora_linear.default, (*_linear(bias, grad=True), *_anl(grad=True), *HYPER))
    args = tuple(a for a in (*_linear(bias, grad=True), *_anl(grad=True)) if a is not None)

    def f(*a):
        x, w, *rest = a
        b, A, B, H, Ws = (rest if bias else (None, *rest))
        return OPS.aurora_linear(x, w, b, A, B, H, Ws, *HYPER)[0]

    assert torch.autograd.gradcheck(f, args)
    x, w, b, A, B = _linear(bias)
    H, Ws = _anl()
    expected = torch.nn.functional.linear(x, w, b) + AF.aurora_delta(x, A, B, H, Ws, KNOTS, 2.0)
    torch.testing.assert_close(OPS.aurora_linear(x, w, b, A, B, H, Ws, *HYPER)[0], expected)


def test_the_inplace_ops_add_the_oracle_delta():
    base, x, A, B = _lora()
    H, Ws = _anl()
    out = base.clone()
    torch.library.opcheck(OPS.lora_delta_add_inplace.default, (out, x, A, B, 2.0), test_utils=("test_schema",
                                                                                               "test_faketensor"))
    out = base.clone()
    OPS.lora_delta_add_inplace(out, x, A, B, 2.0)
    torch.testing.assert_close(out, base + AF.lora_delta(x, A, B, 2.0))
    out = base.clone()
    torch.library.opcheck(OPS.aurora_delta_add_inplace.default, (out, x, A, B, H, Ws, *HYPER),
                          test_utils=("test_schema", "test_faketensor"))
    out = base.clone()
    OPS.aurora_delta_add_inplace(out, x, A, B, H, Ws, *HYPER)
    torch.testing.assert_close(out, base + AF.aurora_delta(x, A, B, H, Ws, KNOTS, 2.0))


def test_aurora_linear_dropout_gradcheck_with_a_fixed_mask():
    x, w, b, A, B = _linear(True, grad=True)
    H, Ws = _anl(grad=True)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    scale = keep_scale(0.3)

    def f(x, w, b, A, B, H, Ws):
        return LF.AuroraLinearDropout.apply(x, w, b, A, B, H, Ws, *HYPER, keep, scale)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, A, B, H, Ws))
    with torch.no_grad():  # the base sees x, the adapter the dropped copy
        expected = torch.nn.functional.linear(x, w, b) + AF.aurora_delta(x * keep * scale, A, B, H, Ws, KNOTS, 2.0)
        torch.testing.assert_close(f(x, w, b, A, B, H, Ws), expected)


def test_keep_mask_schema_and_fake():
    order = torch.zeros((), dtype=torch.int64)
    torch.library.opcheck(OPS.keep_mask.default, (order, [4, 6], 0.25), test_utils=("test_schema", "test_faketensor"))
    assert OPS.keep_mask(order, [4, 6], 0.25).dtype == torch.bool and int(order) >= 1
