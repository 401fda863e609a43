"""The oracle itself: spline values of docs/methods.md §2.2, merges, Gram-trace norms."""

from __future__ import annotations

import pytest
import torch

from aurora_fx import functional as AF
from tests.conftest import assert_close

KNOTS = AF.spline_knots(dtype=torch.float64)
F64 = torch.float64


def basis(u: float) -> torch.Tensor:
    return AF.bspline_basis(torch.tensor(u, dtype=F64), KNOTS)


def test_knots_are_the_twelve_of_the_spec():
    expected = torch.tensor([-2.2, -1.8, -1.4, -1.0, -0.6, -0.2, 0.2, 0.6, 1.0, 1.4, 1.8, 2.2], dtype=F64)
    assert_close(KNOTS, expected, F64)


@pytest.mark.parametrize(("u", "expected"), [
    (0.0, [0, 0, 1 / 48, 23 / 48, 23 / 48, 1 / 48, 0, 0]),
    (0.2, [0, 0, 0, 1 / 6, 4 / 6, 1 / 6, 0, 0]),
    (-1.0, [1 / 6, 4 / 6, 1 / 6, 0, 0, 0, 0, 0]),
])
def test_basis_values_match_the_spec(u, expected):
    assert_close(basis(u), torch.tensor(expected, dtype=F64), F64, atol=1e-14)


@pytest.mark.parametrize(("u", "total"), [(1.5, 0.6822916666666666), (-1.5, 0.6822916666666666),
                                          (2.0, 0.0208333333333333), (-2.0, 0.0208333333333333)])
def test_basis_sums_outside_the_grid(u, total):
    assert basis(u).sum().item() == pytest.approx(total, abs=1e-12)


def test_partition_of_unity_on_the_grid_and_zero_beyond_support():
    u = torch.linspace(-1, 1 - 1e-9, 101, dtype=F64)
    assert_close(AF.bspline_basis(u, KNOTS).sum(-1), torch.ones_like(u), F64, atol=1e-12)
    far = torch.tensor([2.2, 3.0, -2.2 - 1e-9, 1e30, -1e30], dtype=F64)
    assert torch.equal(AF.bspline_basis(far, KNOTS), torch.zeros(5, 8, dtype=F64))


def test_nan_propagates():
    assert torch.isnan(AF.bspline_basis(torch.tensor([float("nan")]), KNOTS.float())).all()


def _weights(d_in=6, d_out=5, r=2, dtype=F64):
    return (torch.randn(r, d_in, dtype=dtype), torch.randn(d_out, r, dtype=dtype),
            torch.randn(r, r, dtype=dtype), torch.randn(r, 8, dtype=dtype))


def test_anl_is_the_sum_of_the_fixed_and_the_summed_spline_branch():
    A, B, H, Ws = _weights()
    z = torch.randn(4, 2, dtype=F64)
    fixed = torch.tanh(torch.tanh(z) @ H.T)
    learnable = AF.bspline_basis(z, KNOTS).sum(1) @ Ws.T
    assert_close(AF.anl(z, H, Ws, KNOTS), fixed + learnable, F64)


def test_anl_at_zero_is_not_zero():
    _, _, H, Ws = _weights()
    expected = Ws @ (2 * basis(0.0))  # σ(0) = W_s·(r̃·basis(0))
    assert_close(AF.anl(torch.zeros(2, dtype=F64), H, Ws, KNOTS), expected, F64)


def test_aurora_delta_is_s_b_sigma_ax():
    A, B, H, Ws = _weights()
    x = torch.randn(3, 4, 6, dtype=F64)
    expected = 2.0 * AF.anl(x @ A.T, H, Ws, KNOTS) @ B.T
    assert_close(AF.aurora_delta(x, A, B, H, Ws, KNOTS, 2.0), expected, F64)


def test_static_merge_applies_sigma_to_each_column_of_a():
    A, B, H, Ws = _weights()
    columns = torch.stack([AF.anl(A[:, j], H, Ws, KNOTS) for j in range(A.shape[1])], dim=1)  # (r, d_in)
    assert_close(AF.aurora_static_delta_weight(A, B, H, Ws, KNOTS, 2.0), 2.0 * B @ columns, F64)


def test_static_merge_differs_from_the_dynamic_forward():
    A, B, H, Ws = _weights()
    x = torch.randn(10, 6, dtype=F64)
    static = x @ AF.aurora_static_delta_weight(A, B, H, Ws, KNOTS, 2.0).T
    assert (static - AF.aurora_delta(x, A, B, H, Ws, KNOTS, 2.0)).abs().max() > 1e-3


def test_lora_delta_and_its_exact_merge():
    A, B, _, _ = _weights(r=3)
    x = torch.randn(7, 6, dtype=F64)
    assert_close(AF.lora_delta(x, A, B, 0.5), x @ AF.lora_delta_weight(A, B, 0.5).T, F64)


def test_gram_trace_norms_equal_the_dense_ones():
    B1, A1, B2, A2 = torch.randn(9, 2), torch.randn(2, 7), torch.randn(9, 2), torch.randn(2, 7)
    dense1, dense2 = B1.double() @ A1.double(), B2.double() @ A2.double()
    assert AF.lowrank_norm2(B1, A1).item() == pytest.approx(dense1.square().sum().item(), rel=1e-9)
    assert AF.lowrank_diff_norm2(B1, A1, B2, A2).item() == pytest.approx((dense1 - dense2).square().sum().item(),
                                                                         rel=1e-9)
    assert AF.lowrank_diff_norm2(B1, A1, B1, A1).item() == pytest.approx(0.0, abs=1e-9)
