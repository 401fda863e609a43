"""Frozen, validated adapter configs: one small dataclass per method.

Each config is validated once in ``__post_init__``, never mutated, and round-trips through JSON
(``to_dict`` / ``aurora_fx.registry.config_from_dict``) so that checkpoints can rebuild their
adapters. The name → config → adapter table lives in ``aurora_fx.registry``.

Example:
    >>> from aurora_fx.config import AuroraConfig
    >>> AuroraConfig().scale          # α / r̃ = 4 / 2
    2.0
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["AdapterConfig", "LoraConfig", "AuroraConfig", "AromaConfig"]


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}; use e.g. rank=2 (AuroRA) or rank=8 (LoRA)")


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}; the scale is alpha / rank, e.g. alpha=4.0")


def _check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}; use 0.0 to disable it")


@dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by every method: rank r, alpha α and input dropout p.

    The adapter output is scaled by ``s = α / r`` after the up-projection; dropout acts on the
    adapter input only (the base path sees the undropped x).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        _check_alpha(self.alpha)
        _check_dropout(self.dropout)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """``s = α / r``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, including ``method``."""
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA (arXiv 2106.09685): ``Δ(x) = (α/r)·B·A·drop(x)``. Baseline defaults r 8, α 16."""

    rank: int = 8
    alpha: float = 16.0
    method: ClassVar[str] = "lora"


@dataclass(frozen=True)
class AuroraConfig(AdapterConfig):
    """AuroRA (arXiv 2505.18738): ``Δ(x) = (α/r̃)·B·σ(A·drop(x))`` with the ANL σ (docs/methods.md §2).

    Attributes:
        rank: Compressed width r̃ (2 in every experiment of the paper).
        alpha: α; the scale is α/r̃ (UNCONFIRMED against the official code, docs/methods.md §2.3).
        dropout: Input dropout probability, 0.0 by default (docs/methods.md §2). The recipe study of
            ``benchmarks/bench_quality.py`` (3 fresh seeds per candidate, validation, both data sets)
            found no candidate (0.05, s = α, both) better by more than the seed spread, and 0 is the
            cheaper path (the paper gives 0.05 for LLaMA only). On every linear layer (not only q/v)
            0.05 measured better on the harder data set (+1.4 points over 6 paired seeds; README).
        grid_size: Spline grid intervals G on ``grid_range``.
        spline_order: Spline order K (3 = cubic; the fused op supports only 3).
        grid_range: Range covered by the grid; the basis is zero beyond ``K`` extra knots each side.
        spline_init: Ws starts as U(-spline_init, spline_init) ("scale_noise" 0.1).
        a_init: A's init: ``"kaiming_uniform"`` (U(±1/√d_in), LoRA's), ``"xavier_normal"``
            (aurora-peft's) or ``"normal"`` (N(0, 1/d_in), MyTransformers'); docs/methods.md §2.4.
        scale_by_rank: Scale ``s = α/r̃`` (True, the LoRA convention) or ``s = α`` (False).
    """

    rank: int = 2
    alpha: float = 4.0
    dropout: float = 0.0
    grid_size: int = 5
    spline_order: int = 3
    grid_range: tuple[float, float] = (-1.0, 1.0)
    spline_init: float = 0.1
    a_init: str = "kaiming_uniform"
    scale_by_rank: bool = True
    method: ClassVar[str] = "aurora"
    A_INITS: ClassVar[tuple[str, ...]] = ("kaiming_uniform", "xavier_normal", "normal")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.grid_size, int) or self.grid_size < 1:
            raise ValueError(f"grid_size must be an integer >= 1, got {self.grid_size!r}; the paper's grid is 5")
        if not isinstance(self.spline_order, int) or not 1 <= self.spline_order <= 5:
            raise ValueError(f"spline_order must be an integer in 1..5, got {self.spline_order!r}; cubic is 3")
        lo, hi = (float(v) for v in self.grid_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"grid_range must be (lo, hi) with lo < hi, got {self.grid_range!r}; default (-1.0, 1.0)")
        object.__setattr__(self, "grid_range", (lo, hi))
        if not 0.0 <= self.spline_init < math.inf:
            raise ValueError(f"spline_init must be >= 0, got {self.spline_init!r}")
        if self.a_init not in self.A_INITS:
            raise ValueError(f"a_init must be one of {list(self.A_INITS)}, got {self.a_init!r}")
        if not isinstance(self.scale_by_rank, bool):
            raise ValueError(f"scale_by_rank must be True (s = α/r̃) or False (s = α), got {self.scale_by_rank!r}")

    @property
    def scale(self) -> float:
        """``s = α / r̃`` (``scale_by_rank``, the default) or ``s = α``."""
        return self.alpha / self.rank if self.scale_by_rank else self.alpha

    @property
    def num_bases(self) -> int:
        """Number of spline bases per channel, ``G + K``."""
        return self.grid_size + self.spline_order

    @property
    def grid_step(self) -> float:
        """Knot spacing ``h = (hi - lo) / G``."""
        lo, hi = self.grid_range
        return (hi - lo) / self.grid_size


@dataclass(frozen=True)
class AromaConfig(AdapterConfig):
    """AROMA (arXiv 2504.05343): a growing sum of rank-``rank`` pieces (docs/methods.md §3).

    Attributes:
        rank: Width r of each piece (1 in the paper's main runs).
        alpha: α; the scale is α/r.
        dropout: Dropout on the active piece's input (0.1 in the official code).

        compact_tol: After each merge the stored factors are re-compressed to their effective rank,
            keeping the singular values above ``compact_tol·σ₁`` (docs/methods.md §3.9); 0 keeps
            every non-zero one (exact).

    Merged pieces are kept as frozen low-rank factors ``U``, ``V`` beside the base weight
    (docs/methods.md §3.3 default), so the grown adapter stays small, detachable and saveable, and
    ``unload`` gives the exact base back; ``aurora_fx.merge`` folds everything into W exactly
    at the end. Folding each piece into W during training (the official code) is not offered.
    """

    rank: int = 1
    alpha: float = 4.0
    dropout: float = 0.1
    compact_tol: float = 0.05
    method: ClassVar[str] = "aroma"

    def __post_init__(self) -> None:
        super().__post_init__()
        tol = self.compact_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
            raise ValueError(f"compact_tol must be a relative tolerance in [0, 1), got {tol!r}; default 0.05")
        object.__setattr__(self, "compact_tol", float(tol))
