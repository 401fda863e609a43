"""A resumed AROMA run ends where an uninterrupted one does.

Save mid-run (``save_adapters(..., controller=)``; the optimizer's state is kept in memory here, as a
Trainer checkpoint would hold it), load onto a fresh model with ``load_adapters``, build a new optimizer
and controller, ``load_state_dict`` the controller's state, continue: ranks, history and every adapter
tensor equal the run that never stopped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.checkpoint import read_controller_state

STEPS = 120
# ε_in 0.5: pieces settle before the 20-step cap (outer steps at 15, 33, 51, 69, 87, 102, 120), so the inner
# check's snapshots decide when the outer steps come (at 0.3 every outer step came at the cap, and a resume that
# forgot them went unnoticed). Saved: mid inner loop (76), one step before the check that ends a piece, whose
# snapshot decides it (85), and mid re-warm after a merge (88: the ramp's rate must be back in the groups).
SAVE_POINTS = (76, 85, 88)
KW = {"inner_check_every": 3, "inner_threshold": 0.5, "max_inner_steps": 20, "outer_threshold": 1e-3,
      "rewarm_steps": 5}


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _adapted() -> nn.Module:
    return aurora_fx.apply(_base(), "^0$|^2$", config=aurora_fx.AromaConfig(dropout=0.0))


def _train(model, optimizer, controller, steps: range) -> None:
    target = nn.Linear(16, 8)
    with torch.no_grad():
        torch.manual_seed(123)
        target.weight.normal_()
    for step in steps:
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        loss = nn.functional.mse_loss(model(x), target(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step()


def _run(model):
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-2)
    return optimizer, aurora_fx.AromaController(model, optimizer, **KW)


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".adapter." in k}


@pytest.mark.parametrize("save_at", SAVE_POINTS)
def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, save_at):
    whole = _adapted()
    optimizer, uninterrupted = _run(whole)
    _train(whole, optimizer, uninterrupted, range(STEPS))

    first = _adapted()
    optimizer, controller = _run(first)
    _train(first, optimizer, controller, range(save_at))
    assert controller.outer > 0 and not controller.done  # saved mid-run, after merges
    aurora_fx.save_adapters(first, tmp_path / "ckpt.safetensors", controller=controller)
    names = {id(p): n for n, p in first.named_parameters()}
    moments = {names[id(p)]: copy.deepcopy(s) for p, s in optimizer.state.items()}  # (a Trainer checkpoint)

    resumed = aurora_fx.load_adapters(_base(), tmp_path / "ckpt.safetensors")
    optimizer, controller = _run(resumed)
    params = dict(resumed.named_parameters())
    for name, state in moments.items():
        optimizer.state[params[name]] = state
    controller.load_state_dict(read_controller_state(tmp_path / "ckpt.safetensors"))
    _train(resumed, optimizer, controller, range(save_at, STEPS))

    assert controller.ranks() == uninterrupted.ranks()
    assert controller.history == uninterrupted.history and len(controller.history) > 1
    expected = _tensors(whole)
    got = _tensors(resumed)
    assert sorted(got) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
