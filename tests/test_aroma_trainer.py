"""HF Trainer drives AROMA with one added line (the callback) and stops when it converges."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.aroma_callback import AromaCallback

pytestmark = pytest.mark.slow
D_IN, D_OUT = 48, 64


class Regressor(nn.Module):
    """A frozen linear layer fitted to a teacher W0 + rank-3 update; returns a Trainer-style dict."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x, labels=None):
        out = self.proj(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class _Teacher(torch.utils.data.Dataset):
    def __init__(self, model: Regressor, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        update = torch.randn(D_OUT, 3, generator=g) @ torch.randn(3, D_IN, generator=g) * 0.05
        self.x = torch.randn(n, D_IN, generator=g)
        with torch.no_grad():
            self.y = model.proj(self.x) + self.x @ update.T

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_trainer_with_the_aroma_callback_runs_to_convergence(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = Regressor()
    data = _Teacher(model)
    with torch.no_grad():
        start = nn.functional.mse_loss(model.proj(data.x), data.y).item()
    aurora_fx.apply(model, "proj", method="aroma", rank=1, alpha=1.0, dropout=0.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3000, per_device_train_batch_size=512,
                             learning_rate=3e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant", max_grad_norm=0.0)
    callback = AromaCallback(inner_check_every=5, inner_threshold=0.02, max_inner_steps=60, outer_threshold=0.02)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(callback)  # the one line
    trainer.train()
    ctl = callback.controller
    assert callback.converged_early and trainer.state.global_step < 3000
    assert 2 <= ctl.ranks()["proj"] <= 6 and ctl.trainable_params() == 0
    with torch.no_grad():
        end = nn.functional.mse_loss(model.proj(data.x), data.y).item()
    assert end < 0.05 * start


def _trainer_run(tmp_path, max_steps: int, resume: str | None = None):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = Regressor()
    data = _Teacher(model)
    aurora_fx.apply(model, "proj", method="aroma", rank=1, alpha=1.0, dropout=0.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=128,
                             learning_rate=3e-2, report_to=[], save_strategy="steps", save_steps=40,
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant",
                             max_grad_norm=0.0, seed=0, data_seed=0)
    callback = AromaCallback(inner_check_every=5, inner_threshold=0.02, max_inner_steps=15, outer_threshold=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return model, callback.controller


def test_a_trainer_run_resumed_from_a_checkpoint_ends_like_an_uninterrupted_one(tmp_path):
    """The checkpoint holds the grown AROMA factors and the controller; resuming reproduces the run."""
    from safetensors import safe_open

    whole, whole_ctl = _trainer_run(tmp_path / "whole", 100)
    checkpoint = tmp_path / "whole" / "checkpoint-40"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        record = json.loads(bytes(fh.get_tensor("aurora_fx.adapters").tolist()).decode())
    assert 0 < record["controller_state"]["counters"]["outer"] < whole_ctl.outer  # merges before and after step 40
    assert record["sites"][0]["state"]["merged_rank"] >= 1  # the factors had grown when it was saved
    resumed, resumed_ctl = _trainer_run(tmp_path / "resumed", 100, resume=str(checkpoint))
    assert resumed_ctl.ranks() == whole_ctl.ranks() and resumed_ctl.history == whole_ctl.history
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        if "adapter" in name:
            assert torch.allclose(a, b, atol=1e-6), name
