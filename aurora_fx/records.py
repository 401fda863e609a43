"""Typed records passed between the steps of the pipeline (no dicts, no bare tuples)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

    from aurora_fx.config import AdapterConfig

__all__ = ["Site", "SiteRequest", "SiteKind", "Layout", "weight_out_in", "Untraceable", "SiteTable", "AdapterInfo",
           "format_table"]

SiteKind = Literal["linear", "conv1d", "functional", "expert", "conv"]
"""``linear`` (nn.Linear), ``conv1d`` (HF Conv1D), ``functional`` (``F.linear``/``@``/``addmm`` on a
parameter in a module's own forward) or ``expert`` (a 3-D ``(E, ·, ·)`` parameter of a mixture-of-experts
module: one linear map per expert, ``aurora_fx.expert_sites``) or ``conv`` (``nn.Conv1d``/``nn.Conv2d``, a linear map
on input patches, ``aurora_fx.conv_sites``)."""

Layout = Literal["out_in", "in_out", "conv"]
"""How a site's weight is stored: ``out_in`` = ``(d_out, d_in)`` like nn.Linear, ``in_out`` = ``(d_in, d_out)``
like HF Conv1D and ``x @ W``, ``conv`` = ``(C_out, C_in, k…)`` (read as ``(C_out, C_in·∏k)``)."""


def weight_out_in(weight: Tensor, layout: Layout) -> Tensor:
    """The weight as ``(d_out, d_in)`` (``(E, d_out, d_in)`` for experts) whatever its layout (a view, never a copy)."""
    if layout == "conv":
        return weight.view(weight.shape[0], -1)
    return weight if layout == "out_in" else weight.transpose(-2, -1)


@dataclass(frozen=True)
class Site:
    """One linear-like computation ``y = W·x (+ b)`` on a parameter, found by tracing its owner.

    Attributes:
        path: Site name: the owner's module path, plus ``.<param>`` when the parameter is not
            called ``weight`` (``encoder.layer.0.attention.self.query``, ``mlp.w_in``).
        owner: Module path of the module whose own forward computes it ("" is the root).
        param: Name of the weight parameter inside the owner.
        kind: A ``SiteKind``: ``"linear"``, ``"conv1d"`` or ``"functional"``.
        op: The traced call: ``"linear"``, ``"addmm"`` or ``"matmul"``.
        layout: A ``Layout``: ``"out_in"`` (stored ``(d_out, d_in)``) or ``"in_out"``.
        in_features: d_in.
        out_features: d_out.
        dtype: The weight's dtype, e.g. ``"torch.float32"``.
        calls: How many times the owner's forward computes it.
        matched: Whether the pattern selects it (always False without a pattern).
        reason: Why it cannot be adapted, or None if it can (decided by ``passes.check.check``).
        adapted: The method already applied here ("aurora", "lora", "aroma"), or None.
        adapted_names: The names of the adapters already here (``apply(..., name=...)``; ``("default",)`` for one
            adapter applied without a name), in the order they were added.
        owner_type: Class name of the owner (the original class for a rewritten owner).
        is_parameter: The weight is an ``nn.Parameter`` (not a buffer or a plain tensor).
        floating: The weight is floating point and not quantized.
        ndim: Number of dimensions of the weight.
        bypass: How a parent skips this site's owner (it reads the weight directly), or None.
        experts: For an ``expert`` site, how many experts the parameter holds (one adapter each); else 0.
        rows: For a slice site (``qkv[q]``, ``aurora_fx.slice_sites``), the layer's output rows ``(start, stop)`` it
            covers (``out_features`` is their count); else None.
        unsupported: Why this layer's layout cannot take an adapter (a grouped convolution, ...), or None.
        quantization: How the base weight is stored when quantized (``"bitsandbytes.nf4"``, ``"torchao.Int8Tensor"``,
            ``aurora_fx.quantized``), or None for a float weight.
    """

    path: str
    owner: str
    param: str
    kind: SiteKind
    op: str
    layout: Layout
    in_features: int
    out_features: int
    dtype: str
    calls: int = 1
    matched: bool = False
    reason: str | None = None
    adapted: str | None = None
    owner_type: str = ""
    is_parameter: bool = True
    floating: bool = True
    ndim: int = 2
    bypass: str | None = None
    experts: int = 0
    quantization: str | None = None
    unsupported: str | None = None
    rows: tuple[int, int] | None = None
    adapted_names: tuple[str, ...] = ()

    @property
    def adaptable(self) -> bool:
        """True when the site can receive an adapter now."""
        return self.reason is None and self.adapted is None


@dataclass(frozen=True)
class SiteRequest:
    """Put an adapter of ``config`` on ``site`` (made by ``passes.check``, carried out by ``attach``)."""

    site: Site
    config: AdapterConfig
    name: str = "default"


@dataclass(frozen=True)
class Untraceable:
    """A module that owns parameters but whose forward torch.fx cannot trace on its own."""

    path: str
    module_type: str
    params: tuple[str, ...]
    error: str
    linear_like: bool = True  # owns a 2-D floating weight (could hide a linear site)


@dataclass(frozen=True)
class SiteTable:
    """The dry run of ``aurora_fx.sites``: every site found, with match flags and reasons.

    Iterates, indexes and measures like a tuple of ``Site``; ``str()`` gives a printable table,
    listing untraceable owners only when they own a linear-like weight (all of them with
    ``include_all``).
    """

    sites: tuple[Site, ...]
    untraceable: tuple[Untraceable, ...] = ()
    pattern: str | None = None
    include_all: bool = False

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, index: int) -> Site:
        return self.sites[index]

    @property
    def matched(self) -> tuple[Site, ...]:
        """Sites the pattern selects."""
        return tuple(s for s in self.sites if s.matched)

    def get(self, path: str) -> Site | None:
        """The site called ``path``, or None."""
        return next((s for s in self.sites if s.path == path), None)

    def __str__(self) -> str:
        rows = [
            (s.path or "<root>", s.kind if s.quantization is None else f"{s.kind} ({s.quantization})", _shape(s),
             "yes" if s.matched else "", s.adapted or "", s.reason or "")
            for s in self.sites
        ]
        text = format_table(("site", "kind", "shape", "matched", "adapted", "note"), rows)
        shown = [u for u in self.untraceable if u.linear_like or self.include_all]
        for u in shown:
            text += f"\nnot traced: {u.path or '<root>'} ({u.module_type}, owns {', '.join(u.params)}): {u.error}"
        hidden = len(self.untraceable) - len(shown)
        if hidden:
            text += (f"\n({hidden} untraceable module(s) without a linear-like weight not shown, e.g. norms; "
                     f"include_all=True lists them)")
        return text


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter living in a model (``aurora_fx.adapters``).

    Attributes:
        path: Site path (see ``Site.path``).
        method: The registered method name ("aurora", "lora", "aroma", ...).
        rank: r̃ / r; for AROMA the effective rank of the merged update plus the active piece's
            width while it trains.
        num_params: Adapter parameters and stored factors (trainable or not).
        trainable_params: How many of them currently require grad.
        in_features: d_in of the site.
        out_features: d_out of the site.
        kind: Site kind (linear, conv1d, functional, expert).
        fused: Whether the owner graph calls the fused op.
        config: The adapter config as a dict.
        details: Method-specific facts (AROMA: pieces merged, effective rank, active piece).
        name: The adapter's name (``apply(..., name=...)``; ``"default"`` without one).
        active: Whether it is active (``set_adapters``); always True for a model with one name.
    """

    path: str
    method: str
    rank: int
    num_params: int
    trainable_params: int
    in_features: int
    out_features: int
    kind: str
    fused: bool
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    name: str = "default"
    active: bool = True


def _shape(site: Site) -> str:
    shape = f"{site.in_features}→{site.out_features}"
    return f"{site.experts}×{shape}" if site.experts else shape


def format_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """Plain-text table with aligned columns."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
