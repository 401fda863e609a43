"""A small, honest fine-tuning loop for sequence classifiers (demo, CLI and benchmarks).

AdamW over ``aurora_fx.trainable_parameters``, linear warm-up then linear decay, a tqdm
progress bar, and an optional per-step callback (the AROMA controller uses it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from aurora_fx.data import TextDataset
from aurora_fx.inventory import adapter_modules, trainable_parameters

__all__ = ["TrainConfig", "TrainResult", "Encoded", "encode", "train_classifier", "evaluate", "make_scheduler"]


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        lr: Peak AdamW learning rate for the adapters.
        head_lr: Learning rate of non-adapter trainable parameters (None: ``lr``).
        max_length: Tokens per text (truncation).
        warmup_ratio: Share of steps with linear warm-up (then linear decay to 0).
        weight_decay: AdamW weight decay.
        seed: Batch-order seed.
    """

    steps: int = 60
    batch_size: int = 16
    lr: float = 5e-3
    head_lr: float | None = None
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    """Losses per step and wall time."""

    losses: tuple[float, ...]
    seconds: float
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Encoded:
    """Tokenized texts: ``input_ids``/``attention_mask`` (N, L) and labels (N,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model kwargs for the rows in ``index``, trimmed to the longest row."""
        mask = self.attention_mask[index]
        length = int(mask.sum(1).max())
        return {"input_ids": self.input_ids[index, :length], "attention_mask": mask[:, :length]}


def encode(tokenizer, data: TextDataset, max_length: int) -> Encoded:
    """Tokenize once, padded to ``max_length``."""
    enc = tokenizer(list(data.texts), truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(data.labels))


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio·steps``, then linear decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min((t + 1) / warmup, max(0.0, (steps - t) / max(1, steps - warmup))))


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    ids = {id(p) for _, _, a in adapter_modules(model) for p in a.parameters()}
    adapter = [p for p in model.parameters() if p.requires_grad and id(p) in ids]
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": adapter, "lr": cfg.lr}] if adapter else []
    if other:
        groups.append({"params": other, "lr": cfg.head_lr if cfg.head_lr is not None else cfg.lr})
    return groups


def train_classifier(
    model: nn.Module,
    data: Encoded,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> TrainResult:
    """Fine-tune ``model`` (an HF sequence classifier) for ``cfg.steps`` steps.

    Args:
        model: Returns ``.logits`` for ``input_ids``/``attention_mask``.
        data: Encoded training set.
        cfg: Settings.
        progress: Show a tqdm bar with the running loss.
        on_step: Called as ``on_step(step, loss)`` after each optimizer and scheduler step.
        optimizer: Defaults to AdamW over the trainable parameters.
        scheduler: Defaults to ``make_scheduler``.
    """
    if not trainable_parameters(model):
        raise ValueError("model has no trainable parameters; call aurora_fx.apply(model, pattern) first")
    optimizer = optimizer or torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    scheduler = scheduler or make_scheduler(optimizer, cfg.steps, cfg.warmup_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data), generator=gen)
    losses, start, pos = [], time.perf_counter(), 0
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        index = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        logits = model(**data.batch(index)).logits
        loss = nn.functional.cross_entropy(logits, data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return TrainResult(tuple(losses), time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, *, batch_size: int = 32, progress: bool = True) -> float:
    """Accuracy of ``model`` on ``data`` (eval mode)."""
    model.eval()
    correct = 0
    for start in tqdm(range(0, len(data), batch_size), desc="eval", disable=not progress, dynamic_ncols=True,
                      leave=False):
        index = torch.arange(start, min(start + batch_size, len(data)))
        pred = model(**data.batch(index)).logits.argmax(-1)
        correct += int((pred == data.labels[index]).sum())
    return correct / max(len(data), 1)
