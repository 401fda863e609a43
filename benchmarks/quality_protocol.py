"""The protocol of ``bench_quality.py``, kept free of training so its logic is tested on its own.

* **Splits** (``make_splits``): texts de-duplicated (``aurora_fx.data.text_key``: case and spacing
  ignored) before anything else; a fixed stratified test split (seed 0, exact count), then a fixed
  stratified validation split from the rest; the training set is what remains (optionally
  capped). No text is in two splits (checked here, and tested).
* **Learning rates** (``GridPlan``): each method has a log-spaced grid ``center·factor^k`` of at least
  five rates, trained with seed 0 and scored on *validation* (accuracy, ties broken by the lower
  validation loss). When the best rate sits at an edge of the grid the grid grows one step that
  way, until the best is interior (at most ``max_extra`` steps each way; a best still at the edge
  then is reported as such).
* **Seeds**: the chosen rate is trained again with seeds 1 and 2; seed 0's run counts as the first
  seed. Nothing is ever chosen on test; every reported run is the final checkpoint.
* **Scheduling** (``next_runs``): a method's runs become ready as its grid and its seeds need them,
  so several workers can train independent runs at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aurora_fx.data import TextDataset, deduplicate, split, text_key

__all__ = ["Splits", "make_splits", "check_disjoint", "GridPlan", "RunKey", "Score", "next_runs", "MethodPlan"]


@dataclass(frozen=True)
class Splits:
    """Train / validation / test texts of one data set, with what de-duplication removed."""

    train: TextDataset
    val: TextDataset
    test: TextDataset
    duplicates_removed: int
    total_before: int

    def sizes(self) -> dict[str, int]:
        """Split sizes, for the JSON."""
        return {"total": self.total_before, "duplicates_removed": self.duplicates_removed,
                "train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_splits(data: TextDataset, test: int, val: int, train_cap: int | None = None) -> Splits:
    """De-duplicate, then fixed stratified test and validation splits (seed 0), the rest to train."""
    unique, removed = deduplicate(data)
    rest, test_set = split(unique, test, seed=0)
    train, val_set = split(rest, val, seed=0)
    if train_cap is not None and len(train) > train_cap:
        train = train.subset(list(range(train_cap)))
    splits = Splits(train, val_set, test_set, removed, len(data))
    check_disjoint(splits)
    return splits


def check_disjoint(splits: Splits) -> None:
    """Raise if any text (up to case and spacing) is in two splits."""
    keys = {name: {text_key(t) for t in getattr(splits, name).texts} for name in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = keys[a] & keys[b]
        if shared:
            raise AssertionError(f"{len(shared)} text(s) are in both the {a} and the {b} split")


@dataclass(frozen=True)
class GridPlan:
    """A log-spaced learning-rate grid: rate ``k`` is ``center·factor^k``, ``k`` in ``[-half, half]``."""

    center: float
    factor: float = 2.0
    half: int = 2  # 2·half + 1 rates
    max_extra: int = 3  # growth steps allowed each way

    def rate(self, k: int) -> float:
        """The learning rate of grid index ``k``."""
        return self.center * self.factor**k

    def base(self) -> tuple[int, ...]:
        """The grid indices always trained."""
        return tuple(range(-self.half, self.half + 1))

    def grow(self, done: Iterable[int], best: int) -> int | None:
        """The index to add when ``best`` sits at an edge of ``done`` (None once it is interior)."""
        ks = sorted(done)
        if best == ks[0] and ks[0] > -self.half - self.max_extra:
            return ks[0] - 1
        if best == ks[-1] and ks[-1] < self.half + self.max_extra:
            return ks[-1] + 1
        return None


@dataclass(frozen=True)
class Score:
    """What a run is judged by on validation: accuracy, then the lower loss."""

    val_accuracy: float
    val_loss: float

    def key(self) -> tuple[float, float]:
        """Sort key: higher is better."""
        return (self.val_accuracy, -self.val_loss)


@dataclass(frozen=True)
class RunKey:
    """One training run: data set, method (a row of the table), grid index, seed."""

    dataset: str
    method: str
    k: int
    seed: int

    @property
    def id(self) -> str:
        """Stable text id (the key in the runs file)."""
        return f"{self.dataset}/{self.method}/k={self.k}/seed={self.seed}"


@dataclass(frozen=True)
class MethodPlan:
    """Where one (data set, method) stands: its grid runs, the chosen index, its seeds."""

    dataset: str
    method: str
    grid: GridPlan
    seeds: tuple[int, ...] = (0, 1, 2)
    scores: Mapping[int, Score] = field(default_factory=dict)  # seed-0 runs by grid index

    def best(self) -> int | None:
        """The best finished grid index so far (None before any)."""
        return max(self.scores, key=lambda k: (self.scores[k].key(), -k)) if self.scores else None

    def grid_needs(self) -> list[int]:
        """Grid indices still to train before the choice is final (empty once it is)."""
        missing = [k for k in self.grid.base() if k not in self.scores]
        if missing:
            return missing
        grown = self.grid.grow(self.scores, self.best())
        return [] if grown is None else [grown]

    def chosen(self) -> int | None:
        """The chosen grid index once the grid is final, else None."""
        return None if self.grid_needs() else self.best()

    def at_edge(self) -> bool:
        """True if the final choice still sits at an edge (growth limit reached)."""
        k = self.chosen()
        return k is not None and k in (min(self.scores), max(self.scores))


def next_runs(plan: MethodPlan, done: set[str]) -> list[RunKey]:
    """The runs of ``plan`` that can start now (grid first, then the seeds at the chosen rate)."""
    needs = plan.grid_needs()
    if needs:
        return [RunKey(plan.dataset, plan.method, k, plan.seeds[0]) for k in needs]
    k = plan.chosen()
    keys = [RunKey(plan.dataset, plan.method, k, s) for s in plan.seeds[1:]]
    return [key for key in keys if key.id not in done]
