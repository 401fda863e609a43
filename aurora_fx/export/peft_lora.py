"""Train nonlinear, serve as LoRA: write any adapted model as a standard HF PEFT LoRA folder.

``to_peft(model, folder, mode=...)`` writes ``adapter_config.json`` and ``adapter_model.safetensors``
under PEFT's names, which vLLM, SGLang, TGI, onnxruntime-genai (through Olive) and PEFT load.

* ``mode="exact"`` (the default for LoRA and AROMA): each adapter's update written as LoRA factors
  with no change at all. LoRA keeps its r; AROMA writes its compacted stored factors (and a trained
  active piece) with a per-site rank (``rank_pattern``).

**One scale rule every server reads the same way.** The folder has one ``lora_alpha`` and never an
``alpha_pattern``: llama.cpp's converter keeps only the global ``lora_alpha`` and silently scales every
site by it. A site whose own scale ``s_i`` differs from ``lora_alpha / r_i`` has the ratio folded into
its ``lora_B`` (``lora_alpha`` is the most common per-site ``s_i·r_i``, so most ``lora_B`` are written as
they are), and PEFT, vLLM and llama.cpp all compute ``s_i·B_i·A_i``. ``bias=True`` (PEFT's ``lora_bias``)
and ``modules_to_save`` other than a classification head make a folder that only PEFT serves: vLLM
refuses both, and llama.cpp's converter refuses the bias; ``to_peft`` warns and names them.
* ``mode="static"`` (AuroRA): the paper's static merge ``ΔW = s·B·σ(Aᵀ)ᵀ`` (docs/methods.md §2.6), rank
  ≤ r̃, as ``lora_B = s·B``, ``lora_A = σ(Aᵀ)ᵀ``. It drops σ's dependence on the input (σ is applied to
  A's columns, not to A·x) and the input-independent bias ``B·σ(0)``; ``aurora_fx.merge(lossy=True)``
  computes the same weights.
* ``mode="fit"`` (any method): a calibrated linearization. Each site's inputs are collected over the
  ``calibration`` batches (forward hooks), and the rank-``rank`` linear map that best reproduces the
  adapter's output on them is fitted by reduced-rank regression on the activations (least squares,
  then the top principal directions of the fitted outputs), with a bias in PEFT's ``lora_bias``
  when ``bias=True``. One batch in four is held out; the per-site relative errors on it are
  returned (``PeftExport.sites``). A site whose fit does worse than the static merge on the
  calibration batches gets the static merge, so ``fit`` is never worse than ``static`` there.

Only module sites can be LoRA targets in PEFT (``nn.Linear``, HF ``Conv1D`` with ``fan_in_fan_out``);
a functional site gets an error that names it. ``trainable_modules`` (a new head) go to
``modules_to_save``. Both files are written atomically; ``aurora_fx.load_peft_lora`` reads them
back (exactly, for LoRA and AROMA).

Example:
    >>> result = aurora_fx.export.to_peft(model, "serve/", mode="fit", calibration=batches)
    >>> print(result)                        # per-site rank and held-out relative error
    >>> peft.PeftModel.from_pretrained(base, "serve/")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from aurora_fx.atomic import atomic_write_bytes
from aurora_fx.distributed import full, model_class
from aurora_fx.methods.base import LoraFactors
from aurora_fx.model_state import model_state
from aurora_fx.named import active_names, adapter_names, resolve_name, set_adapters
from aurora_fx.owners import iter_bindings
from aurora_fx.passes.check import check_export
from aurora_fx.records import format_table
from aurora_fx.tracing import get_submodule

__all__ = ["to_peft", "PeftExport", "SiteExport", "PEFT_PREFIX"]

logger = logging.getLogger("aurora_fx.export")
PEFT_PREFIX = "base_model.model."
MODES = ("exact", "static", "fit")


@dataclass(frozen=True)
class SiteExport:
    """One site as written: its LoRA rank and, for fitted sites, how well the linear map fits."""

    path: str
    method: str
    rank: int
    how: str  # exact | static | fit | static (fit was worse)
    calibration_error: float | None = None  # relative error on the calibration batches used to fit
    heldout_error: float | None = None  # on the held-out calibration batches
    static_calibration_error: float | None = None  # the static merge's, for comparison
    static_heldout_error: float | None = None


@dataclass(frozen=True)
class PeftExport:
    """What ``to_peft`` wrote."""

    folder: Path
    mode: str
    sites: tuple[SiteExport, ...]
    config: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        def pct(v):
            return "" if v is None else f"{100 * v:.2f}%"

        rows = [(s.path, s.method, s.how, s.rank, pct(s.calibration_error), pct(s.heldout_error),
                 pct(s.static_heldout_error)) for s in self.sites]
        header = ("site", "method", "written as", "rank", "calib. error", "held-out error", "static held-out")
        return f"PEFT LoRA folder {self.folder} ({self.mode}):\n" + format_table(header, rows)


@dataclass
class _Stats:
    """Sufficient statistics of one site's (x, Δ(x)) pairs, in float64."""

    xtx: torch.Tensor
    xty: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    yy: float = 0.0
    n: int = 0

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> _Stats:
        z = torch.zeros
        return cls(z(d_in, d_in, dtype=torch.float64), z(d_in, d_out, dtype=torch.float64),
                   z(d_in, dtype=torch.float64), z(d_out, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double().cpu(), y.reshape(-1, y.shape[-1]).double().cpu()
        self.xtx += x.t() @ x
        self.xty += x.t() @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.yy += float((y * y).sum())
        self.n += x.shape[0]

    def error(self, mt: torch.Tensor, c: torch.Tensor | None) -> float:
        """Relative error ``‖Y − X·Mt − c‖_F / ‖Y‖_F`` from the statistics alone."""
        e = self.yy - 2 * float((mt * self.xty).sum()) + float((mt * (self.xtx @ mt)).sum())
        if c is not None:
            e += -2 * float(c @ (self.sy - mt.t() @ self.sx)) + self.n * float(c @ c)
        return max(e, 0.0) ** 0.5 / max(self.yy, 1e-300) ** 0.5


def _reduced_rank_fit(stats: _Stats, rank: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Least squares ``Y ≈ X·Mt (+ c)`` restricted to rank ``rank``; returns lora_A, lora_B, bias."""
    xtx, xty = stats.xtx, stats.xty
    if bias:
        mx, my = stats.sx / max(stats.n, 1), stats.sy / max(stats.n, 1)
        xtx, xty = xtx - stats.n * torch.outer(mx, mx), xty - stats.n * torch.outer(mx, my)
    ridge = 1e-8 * float(torch.diagonal(xtx).mean()) + 1e-12
    mt = torch.linalg.solve(xtx + ridge * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty)  # (d_in, d_out)
    _, vecs = torch.linalg.eigh(mt.t() @ xtx @ mt)  # fitted outputs' covariance, ascending
    vk = vecs[:, -rank:]  # (d_out, k): top principal directions of the fitted outputs
    lora_a, lora_b = (mt @ vk).t(), vk  # ΔW = lora_b @ lora_a = Vkᵀ-projected M
    c = (my - (lora_b @ lora_a) @ mx) if bias else None
    return lora_a, lora_b, c


@contextlib.contextmanager
def _only(model: nn.Module, name: str | None):
    """``name`` alone active inside the block (a model with several names), the active set restored after."""
    before = active_names(model)
    several = len(adapter_names(model)) > 1
    if several:
        set_adapters(model, name)
    try:
        yield
    finally:
        if several:
            set_adapters(model, before)


def _collect(model: nn.Module, bindings, calibration: Iterable) -> dict[str, tuple[_Stats, _Stats]]:
    """Run the calibration batches with forward pre-hooks on the sites' owners: (fit, held-out) stats."""
    stats = {b.site: (_Stats.empty(a.in_features, a.out_features), _Stats.empty(a.in_features, a.out_features))
             for _, a, b in bindings}
    state = {"batch": 0}

    def hook_for(site: str, adapter: nn.Module):
        def hook(module, args):
            part = 1 if state["batch"] % 4 == 3 else 0
            stats[site][part].add(args[0], adapter.oracle_delta(args[0].to(adapter.A.dtype)))
        return hook

    handles = [owner.register_forward_pre_hook(hook_for(b.site, a)) for owner, a, b in bindings]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration:
                _call(model, batch)
                state["batch"] += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if state["batch"] == 0:
        raise ValueError("calibration is empty; pass a list of batches or a DataLoader that yields some")
    return stats


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _fit_site(a: nn.Module, fit: _Stats, held: _Stats, rank: int, bias: bool):
    """The fitted factors (or the static merge when it fits the calibration batches better)."""
    held = held if held.n else fit
    static = a.lora_factors(lossy=True)
    static_mt = (static.B @ static.A).t().double() * static.scale
    lora_a, lora_b, c = _reduced_rank_fit(fit, min(rank, a.in_features, a.out_features), bias)
    mt = (lora_b @ lora_a).t()
    record = dict(calibration_error=fit.error(mt, c), heldout_error=held.error(mt, c),
                  static_calibration_error=fit.error(static_mt, None),
                  static_heldout_error=held.error(static_mt, None))
    if record["static_calibration_error"] < record["calibration_error"]:
        record.update(calibration_error=record["static_calibration_error"],
                      heldout_error=record["static_heldout_error"])
        return static, None, "static (fit was worse)", record
    return LoraFactors(lora_a.float(), lora_b.float(), 1.0), c, "fit", record


def _default_mode(adapters) -> str:
    lossy = sorted({a.method for _, a, _ in adapters if not a.lora_exact})
    if lossy:
        raise ValueError(f"{', '.join(lossy)} adapters are nonlinear and have no exact LoRA form; pass "
                         f"mode='static' (the paper's static merge) or mode='fit' with calibration batches "
                         f"(a calibrated linearization), as aurora_fx.merge needs lossy=True")
    return "exact"


def _bindings(model: nn.Module, name: str | None = None):
    out = []
    for owner, gm, b in iter_bindings(model, name):
        reason = None if b.kind == "expert" else check_export(b.kind, "PEFT LoRA")
        if reason:
            raise ValueError(f"site {b.site!r} cannot be written as standard LoRA: {reason}")
        out.append((get_submodule(model, owner), gm.get_submodule(b.attr), b))
    if not out:
        raise ValueError("the model has no aurora_fx adapters; call aurora_fx.apply(model, pattern) first")
    return out


def _factors(model, adapters, mode, calibration, rank, bias):
    """Per site: (factors, bias or None, how, fit record)."""
    experts = [b.site for _, _, b in adapters if b.kind == "expert"]
    if experts and mode != "exact":
        raise ValueError(f"expert sites ({experts[0]}{' and more' if len(experts) > 1 else ''}) are written exactly "
                         f"only (mode='exact', LoRA and AROMA); mode={mode!r} is not implemented for them. Adapt the "
                         f"experts with method='lora' or 'aroma' to serve them as PEFT LoRA")
    if mode == "fit":
        if calibration is None:
            raise ValueError("mode='fit' needs calibration=[batch, ...] (model inputs: dicts, tuples or tensors)")
        stats = _collect(model, adapters, calibration)
        return {b.site: _fit_site(a, *stats[b.site], rank or a.rank, bias) for _, a, b in adapters}
    lossy = mode == "static"
    return {b.site: (_lora_factors(a, b, lossy), None, "static" if lossy and not a.lora_exact else "exact", {})
            for _, a, b in adapters}


def _lora_factors(adapter: nn.Module, b, lossy: bool) -> LoraFactors:
    """The site's LoRA factors; an expert site's in PEFT's ``target_parameters`` layout (``_expert_factors``)."""
    return _expert_factors(adapter) if b.kind == "expert" else adapter.lora_factors(lossy=lossy)


def _expert_factors(family: nn.Module) -> LoraFactors:
    """E experts' factors as one PEFT ``ParamWrapper`` pair: ``lora_A`` ``(k·E, d_in)``, ``lora_B`` ``(d_out, k·E)``.

    PEFT reads ``lora_A`` as ``(E, k, d_in)`` and ``lora_B`` as ``(d_out, k, E)`` (``lora.ParamWrapper``), so
    expert e's ``A_e`` is rows ``e·k … e·k+k-1`` and its ``B_e`` column j is ``lora_B[:, j·E + e]``. Experts of
    lower rank (AROMA) are padded with zero rows/columns to the largest k: the update stays exact.
    """
    factors = [a.lora_factors() for _, a in family.units()]
    if len({f.scale for f in factors}) > 1:
        raise ValueError("the experts of one site have different scales; PEFT's ParamWrapper has one per site")
    k = max(f.A.shape[0] for f in factors)
    a = torch.stack([_pad_rows(full(f.A).float(), k) for f in factors])  # (E, k, d_in)
    b = torch.stack([_pad_rows(full(f.B).float().t(), k).t() for f in factors])  # (E, d_out, k)
    return LoraFactors(a.reshape(-1, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], -1), factors[0].scale)


def _conv_factors(conv: nn.Module, factors: LoraFactors) -> LoraFactors:
    """A convolution site's factors as PEFT's conv LoRA.

    ``lora_A`` is a ``(k, C_in, kernel…)`` convolution (the layer's kernel, stride and padding), ``lora_B`` a
    ``(C_out, k, 1…)`` pointwise one.
    """
    if any(d != 1 for d in conv.dilation):
        raise ValueError(f"convolution {conv} has dilation {conv.dilation}: PEFT's conv LoRA builds lora_A without "
                         f"dilation, so the folder would compute something else; serve it through ONNX or aurora_fx")
    k, ones = factors.A.shape[0], (1,) * (conv.weight.dim() - 2)
    return LoraFactors(factors.A.reshape(k, *conv.weight.shape[1:]), factors.B.reshape(factors.B.shape[0], k, *ones),
                       factors.scale)


def _pad_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(k - t.shape[0], t.shape[1])]) if t.shape[0] < k else t


def to_peft(model: nn.Module, folder: str | os.PathLike, mode: str | None = None, calibration: Iterable | None = None,
            rank: int | None = None, *, bias: bool = False, name: str | None = None) -> PeftExport:
    """Write ``model``'s adapters as a PEFT LoRA folder (see the module docstring for the modes).

    Args:
        model: An adapted model (unchanged by the export).
        folder: The PEFT folder to write (created; both files replaced atomically).
        mode: ``"exact"`` (default when every adapter is linear: LoRA, AROMA), ``"static"`` or
            ``"fit"``; AuroRA needs one of the last two.
        calibration: Model inputs for ``"fit"``: a list of batches or a DataLoader of dicts
            (keyword inputs), tuples (positional) or tensors.
        rank: LoRA rank k of fitted sites (default the adapter's rank, r̃ for AuroRA: its update
            ``s·B·σ(A·x)`` lies in the span of B's r̃ columns, so no linear map of higher rank fits
            it better; ``benchmarks/bench_serve_as_lora.py`` measures k = 2, 4, 8 alike).
        bias: ``"fit"`` only: also fit a bias, written as PEFT's ``lora_bias``.
        name: Which named adapter to write (``aurora_fx.named``), needed when the model holds several; the fit's
            calibration then runs with that name alone active.

    Returns:
        A ``PeftExport`` (``str()`` gives the per-site table).
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    name = resolve_name(model, name)
    adapters = _bindings(model, name)
    mode = mode or _default_mode(adapters)
    with _only(model, name):
        written = _factors(model, adapters, mode, calibration, rank, bias)
    adapters = _join_slices(adapters, written)
    kept = [(a, b) for _, a, b in adapters if written[b.site][0] is not None and written[b.site][0].A.shape[0] > 0]
    ranks = {b.site: written[b.site][0].A.shape[0] // _experts(a) for a, b in kept}  # (an AROMA site that never grew
    # is no target; an expert site's rank is per expert)
    keys = _peft_keys(model, [b for _, b in kept])
    alpha = _common({site: written[site][0].scale * r for site, r in ranks.items()})
    tensors, sites = {}, []
    for a, b in kept:
        factors, c, how, record = written[b.site]
        if b.kind == "conv":
            factors = _conv_factors(get_submodule(model, b.site), factors)
        tensors.update(_site_tensors(keys[b.site], factors, c, alpha / ranks[b.site]))
        sites.append(SiteExport(b.site, a.method, ranks[b.site], how, **record))
    tensors.update(_saved_modules(model))
    config = _config(model, adapters, ranks, alpha, bias and mode == "fit")
    _warn_peft_only(config)
    _warn_bad_fits(sites)
    _write(Path(folder), config, tensors)
    result = PeftExport(Path(folder), mode, tuple(sites), config)
    logger.info("%s", result)
    return result


def _join_slices(adapters, written: dict) -> list:
    """Slice sites of one layer written as one full-width LoRA on the layer (exact).

    PEFT has one LoRA per module: the slices' factors are stacked (``A = [A_q; A_v]``) and each ``B_i`` (scale
    folded in) fills its own output rows and its own rank columns of a zero ``B``; the other rows stay zero.
    """
    groups: dict[str, list] = {}
    for entry in adapters:
        if entry[2].rows is not None and written[entry[2].site][0] is not None:
            groups.setdefault(entry[2].site.partition("[")[0], []).append(entry)
    out = [e for e in adapters if e[2].rows is None]
    for whole, entries in groups.items():
        owner, first, b0 = entries[0]
        width = owner.weight.shape[1] if b0.kind == "conv1d" else owner.weight.shape[0]
        parts = [written.pop(b.site)[0] for _, _, b in entries]
        a = torch.cat([f.A.float() for f in parts])
        big = torch.zeros(width, a.shape[0])
        col = 0
        for (_, _, b), f in zip(entries, parts, strict=True):
            big[b.rows[0]:b.rows[1], col:col + f.A.shape[0]] = f.B.float() * f.scale
            col += f.A.shape[0]
        binding = replace(b0, site=whole, attr="", rows=None)
        written[whole] = (LoraFactors(a, big, 1.0), None, "exact", {})
        out.append((owner, first, binding))
    return out


def _experts(adapter: nn.Module) -> int:
    return len(adapter.units())


def _peft_keys(model: nn.Module, bindings) -> dict[str, str]:
    """The state-dict key prefix PEFT gives each site.

    A module site: ``base_model.model.<site>``. Expert parameters: PEFT wraps them one ``ParamWrapper`` around
    another in the owner's parameter order, so the j-th of k targeted parameters of one owner sits under
    ``<owner>`` + ``.base_layer`` × (k-1-j).
    """
    keys = {b.site: PEFT_PREFIX + b.site for b in bindings if b.kind != "expert"}
    by_owner: dict[str, list] = {}
    for b in bindings:
        if b.kind == "expert":
            by_owner.setdefault(b.site[: -len(b.param) - 1], []).append(b)
    for owner, group in by_owner.items():
        order = [n for n in get_submodule(model, owner)._parameters if n in {b.param for b in group}]
        for b in group:
            keys[b.site] = PEFT_PREFIX + owner + ".base_layer" * (len(order) - 1 - order.index(b.param))
    return keys


def _site_tensors(key: str, factors: LoraFactors, c: torch.Tensor | None, peft_scale: float) -> dict[str, torch.Tensor]:
    """One site's ``lora_A``/``lora_B`` (and ``lora_B.bias``) under PEFT's scale ``lora_alpha / r``.

    The site's own scale is folded into ``lora_B`` where it differs, so ``peft_scale·B'·A = s·B·A``.
    """
    fold = factors.scale / peft_scale
    lora_b = full(factors.B).float() if fold == 1.0 else full(factors.B).double().mul(fold).float()
    out = {f"{key}.lora_A.weight": full(factors.A).float().contiguous().cpu(),
           f"{key}.lora_B.weight": lora_b.contiguous().cpu()}
    if c is not None:
        out[f"{key}.lora_B.bias"] = (c.double() / peft_scale).float().contiguous()
    return out


# A classification head is the one module vLLM's LoRA loader takes from modules_to_save.
_HEAD_NAMES = ("classifier", "score")


def _warn_peft_only(config: dict) -> None:
    """Warn when the folder holds what only PEFT serves (a LoRA bias, a saved module that is not a head)."""
    reasons = []
    if config["lora_bias"]:
        reasons.append("lora_bias (bias=True): vLLM refuses it ('vLLM does not support LoRA bias') and llama.cpp's "
                       "convert_lora_to_gguf.py cannot convert it")
    others = [m for m in config["modules_to_save"] or () if m.split(".")[-1] not in _HEAD_NAMES]
    if others:
        reasons.append(f"modules_to_save {others}: vLLM takes only a classifier/score head from modules_to_save")
    if reasons:
        warnings.warn("this PEFT folder serves in PEFT only: " + "; ".join(reasons) + ". Export with bias=False "
                      "and without those trainable modules for vLLM and llama.cpp", UserWarning, stacklevel=3)


def _warn_bad_fits(sites: list[SiteExport]) -> None:
    """Warn about fitted sites whose held-out relative error exceeds 100% (worse than no adapter there)."""
    bad = [s for s in sites if s.heldout_error is not None and s.heldout_error > 1.0]
    if bad:
        worst = max(bad, key=lambda s: s.heldout_error)
        warnings.warn(f"{len(bad)} fitted site(s) have a held-out relative error above 100% (worst "
                      f"{worst.path}: {worst.heldout_error:.0%}): served there, the LoRA does worse than no adapter "
                      f"at all. Calibrate on more, or more representative, batches, or use mode='static'",
                      UserWarning, stacklevel=3)


def _saved_modules(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model_state(model)
    out = {}
    for path in state.trainable_modules if state is not None else ():
        for name, p in get_submodule(model, path).named_parameters():
            out[f"{PEFT_PREFIX}{path}.{name}"] = full(p).contiguous().cpu()
    return out


def _common(values: dict[str, float]) -> float:
    """The most frequent value (the default; the others go in a pattern)."""
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -v))


def _config(model: nn.Module, adapters, ranks: dict[str, int], alpha: float, lora_bias: bool) -> dict:
    r = _common(ranks)
    kinds = {b.kind for _, _, b in adapters if b.site in ranks}
    experts = sorted(b.site for _, _, b in adapters if b.site in ranks and b.kind == "expert")
    state = model_state(model)
    cls = model_class(model)
    return {
        "peft_type": "LORA", "task_type": None, "r": int(r), "lora_alpha": float(alpha),
        "target_modules": _target_modules(model, sorted(set(ranks) - set(experts))),
        "target_parameters": experts or None,
        "lora_dropout": 0.0, "bias": "none", "lora_bias": lora_bias,
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": "conv1d" in kinds, "init_lora_weights": True,
        "rank_pattern": {re.escape(s): int(v) for s, v in ranks.items() if v != r},
        "modules_to_save": list(state.trainable_modules) if state is not None and state.trainable_modules else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True, "revision": None,
        "auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__},
    }


def _target_modules(model: nn.Module, sites: list[str]) -> list[str] | str:
    """The site paths, or one full-match regex of them when a path is also the tail of another module's path.

    PEFT takes a list entry as a suffix (``"conv1"`` targets every ``*.conv1``), so a root-level ``conv1`` would
    put (zero) adapters on every block's ``conv1``; a string is matched with ``re.fullmatch`` instead.
    """
    names = [n for n, _ in model.named_modules() if n]
    ambiguous = any(other != site and other.endswith("." + site) for site in sites for other in names)
    return "(" + "|".join(re.escape(site) for site in sites) + ")" if ambiguous else sites


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "adapter_model.safetensors", safetensors_save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(folder / "adapter_config.json", json.dumps(config, indent=2).encode())

