"""Numerical robustness: far-off-grid inputs, bf16/fp16, NaN, bounded gradients (Prop. 2.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aurora_fx
from tests.models import randomize_adapters


def _model(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).to(dtype)
    aurora_fx.apply(model, r"^0$|^2$")
    randomize_adapters(model, std=0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])
def test_training_with_far_off_grid_inputs_stays_finite(dtype, scale):
    model = _model(dtype)
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-2, eps=1e-4)
    limit = torch.finfo(dtype).max / 64  # representable inputs (fp16 overflows at 65504); still far off the grid
    x = (torch.randn(32, 16) * scale).clamp(-limit, limit).to(dtype)
    y = torch.randn(32, 8).to(dtype)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in aurora_fx.trainable_parameters(model))


@pytest.mark.parametrize("fuse", [True, False])
def test_nan_input_propagates_as_nan_without_crashing(fuse):
    model = nn.Sequential(nn.Linear(4, 4))
    aurora_fx.apply(model, "0", fuse=fuse)
    randomize_adapters(model)
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    out = model(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_gradients_stay_bounded_under_large_inputs():
    """Prop. 2.2: tanh and the B-splines are bounded, so ∂L/∂H, ∂L/∂W_s and ∂L/∂x do not blow up."""
    model = nn.Sequential(nn.Linear(16, 16))
    aurora_fx.apply(model, "0")
    randomize_adapters(model, std=0.5)
    adapter = model[0].adapter
    norms = {}
    for scale in (1.0, 1e2, 1e4, 1e6):
        x = (torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * scale).requires_grad_()
        delta = model(x) - nn.functional.linear(x, model[0].weight, model[0].bias)  # the adapter part only
        delta.sum().backward()
        norms[scale] = (adapter.H.grad.norm().item(), adapter.Ws.grad.norm().item(), x.grad.norm().item())
        model.zero_grad()
    for scale, (h, ws, gx) in norms.items():
        assert h <= 10 * norms[1.0][0] + 1e-6, (scale, h)
        assert ws <= 10 * norms[1.0][1] + 1e-6, (scale, ws)
        assert gx <= 10 * norms[1.0][2] + 1e-6, (scale, gx)
