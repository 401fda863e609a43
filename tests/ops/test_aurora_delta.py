"""The fused op against the oracle: opcheck, float64 gradcheck, hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aurora_fx import functional as AF
from aurora_fx.ops.aurora_delta import aurora_delta_add, spline_basis
from tests.conftest import TOLERANCES

OP = torch.ops.aurora_fx.aurora_delta_add.default
KNOTS = AF.spline_knots(dtype=torch.float64)
HYPER = (2.0, -1.0, 0.4)  # scale, grid_lo, grid_step


def _args(batch_shape=(3, 5), d_in=6, d_out=4, r=2, dtype=torch.float64, z_scale=1.0, requires_grad=False):
    x = torch.randn(*batch_shape, d_in, dtype=dtype) * z_scale
    tensors = [torch.randn(*batch_shape, d_out, dtype=dtype), x, torch.randn(r, d_in, dtype=dtype),
               torch.randn(d_out, r, dtype=dtype), torch.randn(r, r, dtype=dtype), torch.randn(r, 8, dtype=dtype)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _reference(base, x, A, B, H, Ws, scale=2.0):
    return base + AF.aurora_delta(x, A, B, H, Ws, KNOTS, scale)


def test_closed_form_basis_equals_the_recursion():
    z = torch.cat([torch.linspace(-3, 3, 601, dtype=torch.float64), KNOTS, KNOTS + 1e-9, KNOTS - 1e-9])
    basis, _ = spline_basis(z, -1.0, 0.4, 8)
    torch.testing.assert_close(basis, AF.bspline_basis(z, KNOTS), rtol=0, atol=1e-14)


def test_closed_form_slope_is_the_derivative_of_the_recursion():
    z = torch.linspace(-3, 3, 601, dtype=torch.float64).requires_grad_()
    expected = torch.stack([torch.autograd.grad(AF.bspline_basis(z, KNOTS)[:, k].sum(), z)[0] for k in range(8)], -1)
    _, slope = spline_basis(z.detach(), -1.0, 0.4, 8, derivative=True)
    torch.testing.assert_close(slope, expected, rtol=0, atol=1e-12)


def test_forward_matches_the_oracle_in_float64():
    args = _args(z_scale=2.0)
    out, z = aurora_delta_add(*args, *HYPER)
    torch.testing.assert_close(out, _reference(*args), **TOLERANCES[torch.float64])
    torch.testing.assert_close(z, args[1] @ args[2].T, **TOLERANCES[torch.float64])


def test_opcheck():
    torch.library.opcheck(OP, (*_args(requires_grad=True), *HYPER))
    torch.library.opcheck(OP, (*_args(batch_shape=(0,), requires_grad=True), *HYPER))


@pytest.mark.parametrize("z_scale", [0.5, 3.0], ids=["inside-grid", "outside-support"])
def test_gradcheck_float64_for_every_input(z_scale):
    args = _args(batch_shape=(2, 3), z_scale=z_scale, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: aurora_delta_add(*a, *HYPER)[0], tuple(args))


def test_backward_matches_the_oracle_gradients():
    args = _args(requires_grad=True, z_scale=1.5)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    g = torch.randn_like(args[0])
    aurora_delta_add(*args, *HYPER)[0].backward(g)
    _reference(*ref_args).backward(g)
    for a, b in zip(args, ref_args, strict=False):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_backward_saves_only_x_and_z():
    args = _args(batch_shape=(64,), d_in=32, d_out=16, dtype=torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        aurora_delta_add(*args, *HYPER)
    big = [s for s in saved if len(s) >= 2 and s[0] == 64]
    assert sorted(big) == [(64, 2), (64, 32)]  # z and x; no (N, r, G+K) spline tensors


def test_nan_input_gives_nan_output():
    args = _args()
    args[1][0, 0, 0] = float("nan")
    out, _ = aurora_delta_add(*args, *HYPER)
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[1:]).all()


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SHAPES = st.sampled_from([(), (1,), (5,), (0,), (2, 3), (2, 0, 4), (1, 2, 3)])


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, d_in=st.integers(1, 9), d_out=st.integers(1, 9), r=st.integers(1, 3), dtype=DTYPES,
       z_scale=st.sampled_from([0.1, 1.0, 4.0, 50.0]), seed=st.integers(0, 2**16))
def test_property_fused_equals_reference(shape, d_in, d_out, r, dtype, z_scale, seed):
    torch.manual_seed(seed)
    args64 = _args(batch_shape=shape, d_in=d_in, d_out=d_out, r=r, z_scale=z_scale)
    args = [a.to(dtype) for a in args64]
    out, _ = aurora_delta_add(*args, *HYPER)
    expected = _reference(*args)  # the oracle in the same dtype (splines in fp32+)
    assert out.shape == args[0].shape and out.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=tol * scale)


@pytest.mark.parametrize(("grid_size", "grid_range"), [(7, (-2.0, 2.0)), (3, (-0.5, 1.5))])
def test_the_op_matches_the_oracle_off_the_default_grid(grid_size, grid_range):
    knots = AF.spline_knots(grid_size, 3, grid_range, dtype=torch.float64)
    step = (grid_range[1] - grid_range[0]) / grid_size
    base, x, A, B, H, _ = _args(z_scale=2.0)
    Ws = torch.randn(2, grid_size + 3, dtype=torch.float64)
    out, _ = aurora_delta_add(base, x, A, B, H, Ws, 2.0, grid_range[0], step)
    torch.testing.assert_close(out, base + AF.aurora_delta(x, A, B, H, Ws, knots, 2.0), **TOLERANCES[torch.float64])
