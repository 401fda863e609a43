"""Initial values, by their distributions (fixed seeds, many draws): A Kaiming-uniform, B zero, H Xavier-normal,
Ws U(±spline_init); LoRA's A the same Kaiming-uniform. A wrong init (H = I, Ws ~ U(±1), a wider A) fails."""

from __future__ import annotations

import math

import pytest
import torch

from aurora_fx.config import AuroraConfig, LoraConfig
from aurora_fx.methods import AuroraAdapter, LoraAdapter

D_IN, D_OUT, DRAWS = 64, 48, 300


def _pooled(cls, config, name: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([getattr(cls(D_IN, D_OUT, config), name).detach().flatten() for _ in range(DRAWS)])


@pytest.mark.parametrize(("cls", "config"), [(AuroraAdapter, AuroraConfig()), (LoraAdapter, LoraConfig())])
def test_a_is_kaiming_uniform_and_b_is_zero(cls, config):
    a, b = _pooled(cls, config, "A"), _pooled(cls, config, "B")
    bound = 1 / math.sqrt(D_IN)
    assert a.abs().max() <= bound and a.abs().max() > 0.98 * bound  # U(±1/√d_in), its whole range used
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03) and abs(a.mean()) < 0.02 * bound
    assert torch.count_nonzero(b) == 0


def test_h_is_xavier_normal():
    h = _pooled(AuroraAdapter, AuroraConfig(), "H")  # (r̃, r̃) each: std √(2 / (r̃ + r̃))
    r = AuroraConfig().rank
    assert h.std().item() == pytest.approx(math.sqrt(2 / (2 * r)), rel=0.06) and abs(h.mean()) < 0.06
    assert (h == 0).float().mean() < 0.01  # not an identity


def test_ws_is_uniform_in_plus_minus_spline_init():
    config = AuroraConfig()
    ws = _pooled(AuroraAdapter, config, "Ws")
    assert ws.abs().max() <= config.spline_init and ws.abs().max() > 0.98 * config.spline_init
    assert ws.std().item() == pytest.approx(config.spline_init / math.sqrt(3), rel=0.04)
