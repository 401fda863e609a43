"""The official AROMA training loop, ported for the quality benchmark's reference row (issue 34).

A benchmark-only port of github.com/ShuDun23/AROMA (``peft_pretraining/aroma.py``: ``AROMALinear``,
``AROMAModel``; ``run_glue_aroma.py``: ``AROMATrainer.training_step``; ``peft_pretraining/training_utils.py``:
``optimizer_reset``, the ``cosine_restarts`` schedule), rewritten here, so that "AROMA the method learns
this little" and "aurora_fx's AROMA learns this little" can be told apart. It is *not* the library's
AROMA (``aurora_fx.aroma``) and nothing in ``aurora_fx`` imports it.

Kept as the official code has them (docs/methods.md §3.8 lists them as defects the library does not copy):

* the check, merge and optimizer reset run after ``backward()`` and **before** ``optimizer.step()``, so the
  old piece's gradients (and Adam moments, 0.1% of them kept) move the freshly re-initialised piece;
* the inner check's snapshot is overwritten by the difference (``current.sub_(previous)`` then
  ``previous.copy_(current)``), so from the second check on a piece is compared with a difference of
  products, not with its previous product;
* the optimizer reset zeroes 99.9% of each moment buffer with an **independent** mask per buffer
  (ReLoRA's ``random_pruning_``), leaving ~0.1% of first moments over emptied second moments;
* the outer step waits until *every* layer asks for it (stabilized, converged, or ``T_in`` steps since
  its own last reset), and a layer whose merged weight moved less than ``convergence_threshold``
  (relative) drops its last piece and stops; when every layer has stopped, training stops;
* the learning rate restarts on the clock (every ``T_in`` steps: ReLoRA's cosine with multiple warm-ups),
  not at merges; input dropout 0.1; pieces merged into the weight itself.

Not kept: the official trainer merges only when the model is wrapped in ``DistributedDataParallel``
(``_perform_lora_reset`` logs a warning and merges nothing otherwise, while the optimizer reset still
runs); this port always takes the DDP path (the one that merges), since a single-process run of the
official script would be a LoRA with periodic optimizer resets, not AROMA. Rank-0 decisions with a
broadcast are moot in one process. The protocol's new classification head trains at the method's rate,
as for every row (the official GLUE script freezes every non-adapter parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class StopTraining(Exception):  # noqa: N818  (a signal, as the official TrainerStopException)
    """Every layer converged: the official trainer stops here (``TrainerStopException``)."""


class OfficialAromaLinear(nn.Module):
    """``AROMALinear``: ``x W0ᵀ + b + s·B(A(dropout(x)))``, pieces merged into ``weight``."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float, *, check_every: int,
                 max_steps: int, change_threshold: float, convergence_threshold: float, window: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Linear(linear.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, linear.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.check_every, self.max_steps = check_every, max_steps
        self.change_threshold, self.convergence_threshold, self.window = change_threshold, convergence_threshold, window
        self.previous_weight: torch.Tensor | None = None
        self.previous_product: torch.Tensor | None = None
        self.history: list[float] = []
        self.converged = self.stabilized = False
        self.steps_since_check = 0
        self.merges = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.converged:
            out = out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return out

    @torch.no_grad()
    def wants_reset(self) -> bool:
        """``check_lora_change``: stabilized, converged, or ``max_steps`` since this layer's last reset."""
        if self.converged or self.stabilized:
            return True
        self.steps_since_check += 1
        if self.steps_since_check >= self.max_steps:
            self.steps_since_check = 0
            return True
        if self.steps_since_check % self.check_every != 0:
            return False
        current = self.lora_B.weight @ self.lora_A.weight
        if self.previous_product is None:
            self.previous_product = current.clone()
            return False
        diff = torch.norm(current.sub_(self.previous_product))  # in place: ``current`` is now the difference
        change = diff / (torch.norm(self.previous_product) + 1e-9)
        self.previous_product.copy_(current)  # the official snapshot keeps the difference (kept defect)
        if change < self.change_threshold:
            self.stabilized, self.steps_since_check = True, 0
            return True
        return False

    @torch.no_grad()
    def merge_check_and_reinit(self) -> None:
        """Merge the piece into ``weight`` unless the weight stopped moving (then drop it and stop)."""
        if self.converged:
            return
        self.stabilized = False
        new_weight = self.weight + self.lora_B.weight @ self.lora_A.weight * self.scaling
        if self.previous_weight is not None:
            self.history = [*self.history, float(torch.norm(new_weight - self.previous_weight)
                                                 / torch.norm(self.previous_weight))][-self.window:]
            if len(self.history) == self.window and sum(self.history) / self.window < self.convergence_threshold:
                self.converged = True  # the last piece is dropped, not merged
                return
        self.weight.copy_(new_weight)
        self.previous_weight = new_weight.clone()
        self.merges += 1
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


@dataclass(frozen=True)
class OfficialConfig:
    """The official MRPC script's settings (``run_for_seed_mrpc.sh``); ``t_in`` is set per budget."""

    r: int = 1
    alpha: float = 4.0
    dropout: float = 0.1
    check_every: int = 10  # LORA_CHECK_FREQUENCY
    change_threshold: float = 0.1  # LORA_CHANGE_THRESHOLD (ε_in)
    convergence_threshold: float = 1e-3  # CONVERGENCE_THRESHOLD (ε_out)
    window: int = 1
    patience: int = 1
    first_warmup: int = 100
    restart_warmup: int = 50
    min_lr_ratio: float = 0.1
    prune_ratio: float = 0.999


def t_in_for(steps: int, official: int = 200) -> int:
    """T_in for a budget: the official 200 where it divides the budget, else ``steps / cycles`` with the
    cycle count nearest to ``steps / 200`` (at least 2); the official scheduler needs ``steps % T_in == 0``."""
    cycles = max(2, round(steps / official))
    while steps % cycles:
        cycles += 1
    return steps // cycles


def wrap(model: nn.Module, pattern: str, config: OfficialConfig, t_in: int) -> list[OfficialAromaLinear]:
    """``AROMAModel``: replace every ``nn.Linear`` whose path matches ``pattern`` (a regex searched);
    every other parameter is frozen (the caller unfreezes the head)."""
    import re

    model.requires_grad_(False)
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, n)]
    layers = []
    for name, linear in sites:
        layer = OfficialAromaLinear(linear, config.r, config.alpha, config.dropout, check_every=config.check_every,
                                    max_steps=t_in, change_threshold=config.change_threshold,
                                    convergence_threshold=config.convergence_threshold, window=config.window)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
        layers.append(layer)
    return layers


def schedule(optimizer: torch.optim.Optimizer, steps: int, t_in: int, config: OfficialConfig):
    """ReLoRA's ``get_cosine_schedule_with_multiple_warmups`` (``cosine_restarts``, ``adjust_step=0``)."""
    first = min(config.first_warmup, t_in)  # the official asserts first_warmup <= restart_every
    restart = min(config.restart_warmup, t_in)

    def factor(step: int) -> float:
        if step < first:
            return step / max(1, first)
        number, within = divmod(step, t_in)
        if within < restart and step >= t_in:
            end = (number * t_in + restart - first) / max(1, steps - first)
            peak = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * end))
            return within / max(1, restart) * peak
        progress = (step - first) / max(1, steps - first)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class OfficialLoop:
    """``AROMATrainer.training_step``'s reset logic, run as an optimizer step pre-hook (after backward,
    before the step, as in the official trainer)."""

    def __init__(self, layers: list[OfficialAromaLinear], optimizer: torch.optim.Optimizer,
                 config: OfficialConfig, seed: int = 0) -> None:
        self.layers, self.optimizer, self.config = layers, optimizer, config
        self.generator = torch.Generator().manual_seed(seed)
        self.resets: list[int] = []
        self.step_count = 0
        self.converged_count = 0
        self.handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step())

    def before_step(self) -> None:
        self.step_count += 1
        wanting = sum(layer.wants_reset() for layer in self.layers)
        if wanting < len(self.layers):
            return
        for layer in self.layers:
            layer.merge_check_and_reinit()
        self._reset_optimizer()
        self.resets.append(self.step_count)
        if all(layer.converged for layer in self.layers):
            self.converged_count += 1
            if self.converged_count >= self.config.patience:
                raise StopTraining(f"every layer converged at step {self.step_count}")
        else:
            self.converged_count = 0

    @torch.no_grad()
    def _reset_optimizer(self) -> None:
        """``optimizer_reset(reset_optimizer_on_relora=True)``: ``random_pruning_(0.999)`` per buffer."""
        for layer in self.layers:
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                state = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:  # no state before the first step (the official skips it too)
                        keep = torch.rand(state[key].shape, generator=self.generator) > self.config.prune_ratio
                        state[key].mul_(keep)

    def stored_params(self) -> int:
        """Merged pieces as rank-1 factors, plus each still-active piece: the size the updates would take
        stored apart from the weight (the official code writes them into it)."""
        total = 0
        for layer in self.layers:
            d_out, d_in = layer.weight.shape
            pieces = layer.merges + (0 if layer.converged else 1)
            total += pieces * self.config.r * (d_in + d_out)
        return total

    def summary(self) -> dict:
        return {"resets": self.resets, "merges": [layer.merges for layer in self.layers],
                "converged": sum(layer.converged for layer in self.layers)}
