"""InputDropout: the right drop rate, exact expectation, its gradient, seeding, and the identity in eval."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import aurora_fx
import aurora_fx.ops.dropout as D
from aurora_fx.ops.dropout import InputDropout, effective_p, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_mask_drops_p_of_the_elements_in_every_16_bit_lane(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask((n // 64, 64), p)
    sigma = math.sqrt(p * (1 - p) / (n // 4))
    for lane in range(4):  # each int16 lane of the 64-bit words: a biased top bit would show in one
        dropped = 1 - keep.reshape(-1, 4)[:, lane].float().mean().item()
        assert abs(dropped - p) < 5 * sigma, (lane, dropped)


def test_p_is_rounded_to_a_multiple_of_2_to_the_minus_16():
    assert effective_p(0.05) == round(0.05 * 65536) / 65536
    assert effective_p(0.0) == 0.0 and effective_p(0.999999999) == 65535 / 65536  # one level always kept


def test_kept_elements_are_scaled_so_the_expectation_is_exact_and_the_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(300, 70, requires_grad=True)
    drop = InputDropout(0.2)
    y = drop(x)
    keep = y != 0
    scale = 1 / (1 - effective_p(0.2))
    torch.testing.assert_close(y[keep], x.detach()[keep] * scale)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(keep, g, 0) * scale)


def test_masks_follow_the_seed_and_eval_is_the_identity():
    drop = InputDropout(0.3)
    x = torch.randn(64, 32)
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a)
    assert not torch.equal(drop(x), a)  # the next call draws a new mask
    assert drop.eval()(x) is x and InputDropout(0.0)(x) is x


def test_adapters_use_it_and_it_is_an_nn_dropout():
    model = aurora_fx.apply(torch.nn.Sequential(torch.nn.Linear(8, 8)), "0", dropout=0.1)
    assert isinstance(model[0].adapter.dropout, InputDropout)
    assert isinstance(model[0].adapter.dropout, torch.nn.Dropout)  # p, eval(), isinstance checks keep working


def test_docstring_example_runs():
    assert doctest.testmod(D).failed == 0


def test_mask_elements_are_drawn_independently():
    torch.manual_seed(0)
    keep = keep_mask((200_000,), 0.5).float()
    assert keep.mean().item() == pytest.approx(0.5, abs=0.005)
    for lag in (1, 2, 3, 4, 5):  # neighbours agree half the time, as independent draws do
        assert (keep[lag:] == keep[:-lag]).float().mean().item() == pytest.approx(0.5, abs=0.005)
