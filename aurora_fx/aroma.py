"""AROMA's controller: grow each site's update one rank-r piece at a time (docs/methods.md §3).

Usage (plain PyTorch)::

    aurora_fx.apply(model, "query|key|value|dense", method="aroma")
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-4)
    scheduler = AromaLR(optimizer, max_steps=T)               # optional; re-warmed at each merge
    controller = AromaController(model, optimizer, scheduler)
    for batch in data:
        loss(model, batch).backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
        controller.step()                                     # once per optimizer step, after it
        if controller.done: break
    controller.finalize()                                     # end of budget: keep active pieces

The rules (inner/outer loops, Gram-trace norms, seeded 99.9% moment reset, re-warm, identical
decisions on every DDP rank) follow docs/methods.md §3.2–3.6, not the official code's defects
(§3.8): the controller runs *after* ``optimizer.step()``, always merges, keeps a clean
snapshot, never materialises an m×n product, and logs one line per outer step.

HF ``Trainer`` users add one line: ``trainer.add_callback(AromaCallback())``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aurora_fx import functional as AF
from aurora_fx.attach import rebuild_owner
from aurora_fx.config import AromaConfig
from aurora_fx.distributed import agree, assign, full
from aurora_fx.model_state import update_model_state
from aurora_fx.owners import iter_units

if TYPE_CHECKING:
    from aurora_fx.methods.aroma import AromaAdapter

__all__ = ["AromaController", "AromaLR", "SiteRank", "OuterStep", "Finalized", "Rollback"]

logger = logging.getLogger("aurora_fx.aroma")
_IDLE_WARNING = 10  # calls in a row without an optimizer step before a warning


class AromaLR(torch.optim.lr_scheduler.LambdaLR):
    """docs/methods.md §3.5 default: warm-up, cosine decay to ``min_lr_ratio``, linear re-warm after merges.

    ``lr(t) = base · min(1, t/first_warmup) · cos_decay(t) · min(1, (t - t_merge)/rewarm)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, first_warmup: int = 100,
                 rewarm_steps: int = 50, min_lr_ratio: float = 0.1) -> None:
        self.max_steps, self.first_warmup, self.rewarm_steps = max_steps, first_warmup, rewarm_steps
        self.min_lr_ratio = min_lr_ratio
        self.last_merge: int | None = None
        super().__init__(optimizer, self._factor)

    def _factor(self, t: int) -> float:
        warm = min(1.0, (t + 1) / max(1, self.first_warmup))
        progress = min(1.0, t / max(1, self.max_steps))
        cosine = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        rewarm = 1.0 if self.last_merge is None else min(1.0, (t - self.last_merge + 1) / max(1, self.rewarm_steps))
        return warm * cosine * rewarm

    def rewarm(self) -> None:
        """Restart the linear re-warm from the current step (called by the controller at a merge)."""
        self.last_merge = self.last_epoch
        rates = [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, rates, strict=True):  # (get_lr() warns outside step())
            group["lr"] = lr
        self._last_lr = rates


class _Rewarm:
    """Linear LR re-warm after a merge for any optimizer, with or without a scheduler.

    Each step it scales the groups' current learning rate by ``min(1, k/steps)``. The value it
    wrote last is remembered: if nobody changed it (no scheduler), the underlying rate is the
    one saved at the merge; if a closed-form scheduler (``LambdaLR``, HF schedules) wrote a new
    one, that becomes the underlying rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.optimizer, self.steps = optimizer, steps
        self.k = 0
        self.underlying: list[float] = []
        self.written: list[float] | None = None

    def start(self) -> None:
        """A merge happened: ramp from 1/steps of the rate back to the full rate."""
        if self.steps <= 1:
            return
        if self.written is None:  # not already ramping: the current rates are the underlying ones
            self.underlying = [g["lr"] for g in self.optimizer.param_groups]
        self.k = 1
        self._write()

    def step(self) -> None:
        """Advance the ramp by one optimizer step."""
        if self.written is None:
            return
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self.written[i]:  # a scheduler set a fresh rate
                self.underlying[i] = group["lr"]
        self.k += 1
        self._write()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a ramp saved mid-way: its counters and the rate it had written into the groups.

        Without the rate, an optimizer rebuilt for the resume would take its next step at the full rate.
        """
        self.k, self.underlying, self.written = state["k"], list(state["underlying"]), state["written"]
        for group, lr in zip(self.optimizer.param_groups, self.written or (), strict=False):
            group["lr"] = lr

    def _write(self) -> None:
        factor = min(1.0, self.k / self.steps)
        for group, lr in zip(self.optimizer.param_groups, self.underlying, strict=False):
            group["lr"] = lr * factor
        self.written = None if factor >= 1.0 else [g["lr"] for g in self.optimizer.param_groups]


@dataclass
class _Track:
    """Controller state of one site (internal, mutable)."""

    path: str
    owner: str  # module path of the owner (rebuilt when the site freezes)
    adapter: AromaAdapter
    weight: Callable[[], torch.Tensor]  # the base weight as (d_out, d_in): a view, or dequantized on demand
    wnorm2: float
    snap: tuple[torch.Tensor, torch.Tensor] | None = None
    stabilized: bool = False
    converged: bool = False
    merges: int = 0
    hist: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SiteRank:
    """Rank bookkeeping of one site.

    Attributes:
        path: The site.
        pieces: Pieces merged so far.
        effective: Effective rank of the merged update (the compacted factors' width).
        active: Width of the active piece while it trains (0 once the site stopped).
        converged: Whether the site stopped.
    """

    path: str
    pieces: int
    effective: int
    active: int
    converged: bool

    @property
    def rank(self) -> int:
        """Effective merged rank plus the active piece's width."""
        return self.effective + self.active


@dataclass(frozen=True)
class Finalized:
    """What ``finalize()`` did at the end of the budget."""

    kept: tuple[str, ...]  # active pieces that had trained: merged
    discarded: tuple[str, ...]  # active pieces that never trained: dropped
    already_stopped: tuple[str, ...]


@dataclass(frozen=True)
class Rollback:
    """The guarantee acted: the training loss rose beyond the tolerance, so the best state came back.

    Attributes:
        best_loss: Mean training loss of the inner period that ended at ``best_step`` (the best seen).
        best_step: The optimizer step whose adapters were restored.
        loss: The mean training loss that triggered it (``> best_loss·(1 + tolerance)``).
        step: The step at which it triggered.
    """

    best_loss: float
    best_step: int
    loss: float
    step: int


@dataclass
class _Best:
    loss: float
    step: int
    state: dict[str, Any]


@dataclass(frozen=True)
class OuterStep:
    """One line of history per outer step."""

    outer: int
    step: int
    merged: tuple[str, ...]
    converged: tuple[str, ...]  # stopped by ε_out, or because a merge added no direction / hit full rank
    trainable_params: int


class AromaController:
    """Drives AROMA's inner and outer loops; call ``step()`` once after each ``optimizer.step()``.

    Args:
        model: A model with AROMA adapters (``apply(..., method="aroma")``).
        optimizer: The optimizer holding their parameters (Adam-family moments are reset).
        scheduler: ``AromaLR`` (re-warmed through its ``rewarm()``), or any closed-form scheduler
            (``LambdaLR``, HF schedules) or None: then the controller itself ramps the learning
            rate linearly over ``rewarm_steps`` after each merge. Chainable schedulers that multiply
            the current rate (``StepLR``, ``ExponentialLR``) would compound that ramp: avoid them.
        inner_check_every: ΔT_in, steps between inner checks (10).
        inner_threshold: ε_in for ``‖P_t − P_{t−ΔT}‖_F / ‖P_{t−ΔT}‖_F`` (0.1).
        max_inner_steps: T_in, the inner loop's cap (1000).
        outer_threshold: ε_out for ``s·‖b a‖_F / ‖W_eff‖_F`` (5e-3).
        window: Outer ratios averaged (1).
        patience: Outer steps with every site converged before ``done`` (1).
        prune_ratio: Share of optimizer moments zeroed at random at each merge (0.999).
        rewarm_steps: Linear LR re-warm after a merge (50) when the scheduler is not ``AromaLR``.
        exact_reset: Zero all moments instead of the random 99.9%.
        reset_step: Also reset Adam's step count with the moments, so its bias correction
            restarts (False keeps it, as the official code does; docs/methods.md §3.2).
        seed: Seeds re-initialisation and reset masks (identical on every rank).
        rollback_tolerance: The guarantee (aurora_fx's addition): with training losses given to ``step(loss)``,
            each outer step compares the mean loss of the inner period that just ended with the best such mean so
            far; while it improves, the adapters' state is kept as the best; when it exceeds the best by more
            than this fraction, every site goes back to the best state and stops growing (``rollback``). The first
            outer step is the first piece alone, so a run never ends worse than it (within the tolerance, on the
            training loss). None disables it; without losses it never acts.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 inner_check_every: int = 10, inner_threshold: float = 0.1, max_inner_steps: int = 1000,
                 outer_threshold: float = 5e-3, window: int = 1, patience: int = 1, prune_ratio: float = 0.999,
                 rewarm_steps: int = 50, exact_reset: bool = False, reset_step: bool = False,
                 seed: int = 0, rollback_tolerance: float | None = 0.05) -> None:
        self._check_args(inner_check_every, max_inner_steps, window, patience, prune_ratio)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.inner_check_every, self.inner_threshold = inner_check_every, inner_threshold
        self.max_inner_steps, self.outer_threshold = max_inner_steps, outer_threshold
        self.window, self.patience, self.prune_ratio = window, patience, prune_ratio
        self.exact_reset, self.reset_step, self.seed = exact_reset, reset_step, seed
        self._rewarm = None if callable(getattr(scheduler, "rewarm", None)) else _Rewarm(optimizer, rewarm_steps)
        self.tracks = self._collect(model)
        self._check_optimizer(optimizer)
        self.since = self.outer = self.all_converged = self.steps = self.skipped_steps = self._idle = 0
        self._last_opt_step: float | None = None
        self.history: list[OuterStep] = []
        self.rollback_tolerance = rollback_tolerance
        self.rollback: Rollback | None = None
        self._losses: list[float] = []
        self._best: _Best | None = None
        update_model_state(model, controller=weakref.ref(self))  # model.state_dict() carries its state from now on

    @staticmethod
    def _check_args(check_every, max_inner, window, patience, prune_ratio) -> None:
        for name, value in (("inner_check_every", check_every), ("max_inner_steps", max_inner),
                            ("window", window), ("patience", patience)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio!r}; the paper uses 0.999")

    @staticmethod
    def _collect(model: nn.Module) -> list[_Track]:
        tracks = []
        for unit in iter_units(model):  # an expert site's experts one by one: each grows on its own
            adapter = unit.adapter
            if isinstance(adapter.config, AromaConfig):
                tracks.append(_Track(unit.site, unit.owner, adapter, unit.base_weight,
                                     _weff_norm2(adapter, unit.base_weight()), converged=adapter.frozen,
                                     merges=adapter.pieces))
        if not tracks:
            raise ValueError("AromaController needs AROMA adapters, and this model has none; call "
                             "aurora_fx.apply(model, pattern, method='aroma') first")
        return tracks

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [t.path for t in self.tracks if not t.converged and id(t.adapter.A) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the AROMA parameters of {missing[:3]} ...; build it from "
                             f"aurora_fx.trainable_parameters(model) after apply()")

    # -- the per-step entry point ------------------------------------------------------------
    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Advance the controller by one optimizer step (docs/methods.md §3.2 ``on_step_end``).

        Args:
            loss: This step's training loss: the rollback guarantee compares inner periods' means of it
                (``rollback_tolerance``). Optional (``observe_loss`` takes losses logged at other times).

        A call after which the optimizer did not step (``torch.amp.GradScaler`` skips steps whose
        gradients overflowed; HF Trainer calls ``on_step_end`` after those too) changes nothing:
        it is counted in ``skipped_steps``.
        """
        if not self._optimizer_stepped() or self.done:
            return
        if loss is not None:
            self.observe_loss(loss)
        self.steps += 1
        self.since += 1
        if self._rewarm is not None:
            self._rewarm.step()
        if self.since % self.inner_check_every == 0:
            self._inner_check()
        if all(t.stabilized or t.converged for t in self.tracks) or self.since >= self.max_inner_steps:
            self._outer_step()
            self.since = 0

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Record a training loss for the rollback guarantee (``AromaCallback`` feeds the Trainer's logged ones)."""
        self._losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))

    def _optimizer_stepped(self) -> bool:
        """Whether the optimizer stepped since the last call (its step count on an active piece moved)."""
        active = next((t.adapter.A for t in self.tracks if not t.converged), None)
        if active is None:
            return True
        state = self.optimizer.state.get(active, {})
        current = float(state["step"]) if "step" in state else None
        stepped = current is not None and current != self._last_opt_step
        self._last_opt_step = current
        self.skipped_steps += not stepped
        self._idle = 0 if stepped else self._idle + 1
        if self._idle == _IDLE_WARNING:
            logger.warning("AromaController.step() saw no optimizer step for %d calls in a row; call it once after "
                           "each optimizer.step() (GradScaler skipping overflowed steps is the other reason)",
                           self._idle)
        return stepped

    def _inner_check(self) -> None:
        open_tracks = [t for t in self.tracks if not (t.converged or t.stabilized)]
        rel = torch.full((len(open_tracks),), math.inf, dtype=torch.float64)
        for i, t in enumerate(open_tracks):  # visit every site; never short-circuit
            A, B = full(t.adapter.A), full(t.adapter.B)
            if t.snap is not None:
                denom = AF.lowrank_norm2(t.snap[1], t.snap[0]).sqrt()
                if denom > 0:
                    rel[i] = AF.lowrank_diff_norm2(B, A, t.snap[1], t.snap[0]).sqrt() / denom
            t.snap = (A.clone(), B.clone())
        rel = agree(rel)
        for t, r in zip(open_tracks, rel.tolist(), strict=False):
            t.stabilized = r < self.inner_threshold

    # -- outer step ---------------------------------------------------------------------------
    def _outer_step(self) -> None:
        if self._guard():
            return
        self.outer += 1
        ratios = agree(torch.tensor([self._outer_ratio(t) for t in self.tracks], dtype=torch.float64))
        converged, merging = [], []
        gen = torch.Generator().manual_seed(hash((self.seed, self.outer)) % (2**62))
        for t, ratio in zip(self.tracks, ratios.tolist(), strict=False):
            if t.converged:
                continue
            if t.merges >= 1:  # the first piece is always merged
                t.hist = (t.hist + [ratio])[-self.window:]
                if len(t.hist) == self.window and sum(t.hist) / self.window < self.outer_threshold:
                    self._converge(t)
                    converged.append(t.path)
                    continue
            merging.append(t)
        # Whether each site grows on is decided from rank 0's factors: a per-rank decision would freeze a
        # site on one rank only, and the ranks' collectives would no longer match.
        grow = agree(torch.tensor([float(self._merge(t, gen)) for t in merging], dtype=torch.float64))
        for t, keeps_growing in zip(merging, grow.tolist(), strict=True):
            if not keeps_growing:  # the piece added no new direction, or the site is at full rank
                self._converge(t)
                converged.append(t.path)
        merged = [t.path for t in merging]
        self._reset_moments(gen)
        if merged:  # a re-warm follows a merge only (an outer step may just stop sites)
            self.scheduler.rewarm() if self._rewarm is None else self._rewarm.start()
        self.all_converged = self.all_converged + 1 if all(t.converged for t in self.tracks) else 0
        self._log(merged, converged)

    # -- the rollback guarantee -------------------------------------------------------------------
    def _guard(self) -> bool:
        """Keep the best state by inner-period mean loss; roll back to it (and stop) on a rise beyond tolerance."""
        if self.rollback_tolerance is None or not self._losses:
            return False
        mean = agree(torch.tensor([sum(self._losses) / len(self._losses)], dtype=torch.float64)).item()
        self._losses = []
        if self._best is None or mean <= self._best.loss:
            self._best = _Best(mean, self.steps, self._snapshot())
            return False
        if mean <= self._best.loss + self.rollback_tolerance * abs(self._best.loss):
            return False
        self._restore(self._best.state)
        self.rollback = Rollback(self._best.loss, self._best.step, mean, self.steps)
        logger.warning("AROMA: the mean training loss rose from %.4g (step %d) to %.4g (step %d), beyond the %.0f%% "
                       "tolerance; every site went back to its step-%d state and stopped growing", self._best.loss,
                       self._best.step, mean, self.steps, 100 * self.rollback_tolerance, self._best.step)
        return True

    def _snapshot(self) -> dict[str, Any]:
        return {t.path: (t.adapter.state(), {n: full(getattr(t.adapter, n)).detach().clone() for n in "UVAB"},
                         t.converged, t.merges, t.wnorm2) for t in self.tracks}

    @torch.no_grad()
    def _restore(self, state: dict[str, Any]) -> None:
        """Every site back to ``state`` (a ``_snapshot``), then stopped with its function kept."""
        for t in self.tracks:
            adapter_state, tensors, _, t.merges, t.wnorm2 = state[t.path]
            t.adapter.load_state(adapter_state, tensors)
            t.adapter.U, t.adapter.V = tensors["U"].clone(), tensors["V"].clone()
            assign(t.adapter.A, tensors["A"])
            assign(t.adapter.B, tensors["B"])
            if not t.adapter.frozen:
                t.adapter.freeze(keep_active=t.adapter.piece_trained())
            self._release(t)
        self.all_converged = self.patience

    def _outer_ratio(self, t: _Track) -> float:
        if t.converged:
            return 0.0
        s, a, b = t.adapter.scale, full(t.adapter.A), full(t.adapter.B)
        return s * AF.lowrank_norm2(b, a).sqrt().item() / math.sqrt(max(t.wnorm2, 1e-300))

    def _merge(self, t: _Track, gen: torch.Generator) -> bool:
        """Merge and compact the active piece; False when the site should stop growing.

        It stops when the merge did not raise the effective rank (the piece's direction was
        already in the span) or the rank reached ``min(d_in, d_out)`` (docs/methods.md §3.9).
        """
        a = t.adapter
        merge = a.merge_active(gen)
        t.wnorm2 = _weff_norm2(a, t.weight())  # exact after the compaction (k matrix-vector products)
        t.merges += 1
        t.snap, t.stabilized = None, False
        return merge.new_direction and a.merged_rank < a.full_rank

    def _converge(self, t: _Track) -> None:
        """Stop the site: its active piece is discarded and its owner computes the frozen factors only."""
        t.adapter.freeze(keep_active=False)
        self._release(t)

    def _release(self, t: _Track) -> None:
        for p in (t.adapter.A, t.adapter.B):
            self.optimizer.state.pop(p, None)
        t.converged, t.snap = True, None
        rebuild_owner(self.model, t.owner)

    @torch.no_grad()
    def _reset_moments(self, gen: torch.Generator) -> None:
        """Zero ``prune_ratio`` of the active pieces' Adam moments (seeded masks); ``step`` too if asked.

        One mask per parameter, shared by all its moment buffers: an element keeps its first *and* second
        moment, or neither. Independent masks (the official code's, after ReLoRA) leave about 0.1% of elements
        with a kept first moment over an emptied second one, and Adam then moves each of them by
        ``lr·m/eps``, hundreds of times the rate, right after every merge (docs/methods.md §3.8).
        """
        for t in self.tracks:
            if t.converged:
                continue
            for p in (t.adapter.A, t.adapter.B):
                state = self.optimizer.state.get(p, {})
                if self.reset_step and "step" in state:
                    state["step"] = state["step"].zero_() if torch.is_tensor(state["step"]) else 0
                    self._last_opt_step = 0.0
                buffers = [key for key in ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")
                           if torch.is_tensor(state.get(key))]
                if not buffers:
                    continue
                shape = full(state[buffers[0]]).shape  # drawn on the CPU for the whole tensor: same on every rank
                keep = (torch.zeros(shape, dtype=torch.bool) if self.exact_reset
                        else torch.rand(shape, generator=gen) >= self.prune_ratio)
                for key in buffers:
                    whole = full(state[key])
                    assign(state[key], whole * keep.to(device=whole.device, dtype=whole.dtype))

    def _log(self, merged: list[str], converged: list[str]) -> None:
        trainable = sum(p.numel() for t in self.tracks for p in (t.adapter.A, t.adapter.B) if p.requires_grad)
        self.history.append(OuterStep(self.outer, self.steps, tuple(merged), tuple(converged), trainable))
        ranks = [r.rank for r in self.site_ranks()]
        logger.info("AROMA outer %d @ step %d: merged %d, newly converged %d, converged %d/%d; rank min/mean/max "
                    "%d/%.2f/%d; trainable %d", self.outer, self.steps, len(merged), len(converged),
                    sum(t.converged for t in self.tracks), len(self.tracks), min(ranks), sum(ranks) / len(ranks),
                    max(ranks), trainable)

    # -- resuming -----------------------------------------------------------------------------
    _COUNTERS = ("since", "outer", "all_converged", "steps", "skipped_steps", "_idle", "_last_opt_step")

    def state_dict(self) -> dict[str, Any]:
        """Everything the controller decides from, to resume a run (``save_adapters(..., controller=)``).

        JSON-able except ``snaps``: per site the (A, B) snapshot of the last inner check, or None. The
        optimizer's and a scheduler's own state are saved as usual (a Trainer checkpoint holds both).
        """
        rewarm = None if self._rewarm is None else {"k": self._rewarm.k, "underlying": self._rewarm.underlying,
                                                     "written": self._rewarm.written}
        return {"counters": {name: getattr(self, name) for name in self._COUNTERS},
                "history": [dataclasses.asdict(h) for h in self.history], "rewarm": rewarm,
                "tracks": {t.path: {"wnorm2": t.wnorm2, "stabilized": t.stabilized, "converged": t.converged,
                                    "merges": t.merges, "hist": list(t.hist)} for t in self.tracks},
                "snaps": {t.path: None if t.snap is None else tuple(x.detach().clone() for x in t.snap)
                          for t in self.tracks}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` (after ``load_adapters`` restored the adapters the same run saved).

        Raises:
            ValueError: The state names other sites than this controller's.
        """
        tracks = {t.path: t for t in self.tracks}
        if set(state["tracks"]) != set(tracks):
            raise ValueError(f"the controller state is for sites {sorted(state['tracks'])[:3]}..., this controller "
                             f"drives {sorted(tracks)[:3]}...; load the adapters saved with it first")
        for name, value in state["counters"].items():
            setattr(self, name, value)
        self.history = [OuterStep(**{**h, "merged": tuple(h["merged"]), "converged": tuple(h["converged"])})
                        for h in state["history"]]
        if self._rewarm is not None and state.get("rewarm") is not None:
            self._rewarm.restore(state["rewarm"])
        for path, saved in state["tracks"].items():
            t = tracks[path]
            t.wnorm2, t.stabilized, t.converged = saved["wnorm2"], saved["stabilized"], saved["converged"]
            t.merges, t.hist = saved["merges"], list(saved["hist"])
            snap = state.get("snaps", {}).get(path)
            t.snap = None if snap is None else tuple(x.to(t.adapter.A.device) for x in snap)

    # -- results ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once every site has converged for ``patience`` outer steps."""
        return self.all_converged >= self.patience

    def site_ranks(self) -> list[SiteRank]:
        """Per site: pieces merged, effective rank, the active piece's width, whether it stopped."""
        return [SiteRank(t.path, t.adapter.pieces, t.adapter.merged_rank,
                         0 if t.adapter.frozen else t.adapter.config.rank, t.converged) for t in self.tracks]

    def ranks(self) -> dict[str, int]:
        """Site path → effective rank (of the merged update, plus the active piece while it trains)."""
        return {s.path: s.rank for s in self.site_ranks()}

    def trainable_params(self) -> int:
        """Adapter parameters that still train."""
        return sum(p.numel() for t in self.tracks for p in (t.adapter.A, t.adapter.B) if p.requires_grad)

    def finalize(self) -> Finalized:
        """End of budget: every site stops.

        An active piece that trained is merged; one that never did (B still zero) is dropped.
        """
        if self._guard():  # the last inner period made things worse: its start's state came back, and stopped
            return Finalized((), (), tuple(t.path for t in self.tracks))
        kept, discarded, stopped = [], [], []
        for t in self.tracks:
            if t.converged:
                stopped.append(t.path)
                continue
            trained = t.adapter.piece_trained()
            t.adapter.freeze(keep_active=trained)
            (kept if trained else discarded).append(t.path)
            self._release(t)
        self.all_converged = self.patience
        return Finalized(tuple(kept), tuple(discarded), tuple(stopped))


def _apply_weight(weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W0·aᵀ`` (m×r) for a ``(d_out, d_in)`` weight view: a matrix-vector product."""
    w = full(weight)
    return (w @ a.to(device=w.device, dtype=w.dtype).t()).double()  # in W's dtype: no m×n float64 copy


def _weff_norm2(adapter: AromaAdapter, weight: torch.Tensor) -> float:
    """``‖W0 + U·V‖²_F`` once at start (``‖W0‖²`` plus Gram traces; U·V never formed)."""
    w2 = torch.linalg.vector_norm(full(weight), dtype=torch.float64).item() ** 2
    if adapter.merged_rank == 0:
        return w2
    U, V = adapter.U.double(), adapter.V.double()
    cross = torch.trace(U.t() @ _apply_weight(weight, V)).item()
    return w2 + 2 * cross + AF.lowrank_norm2(U, V).item()
