"""The one check: whether a site can take an adapter, with the reason when it cannot.

Pattern → **check** → rewrite: ``match`` records facts about each site (parameter or buffer,
dtype, shape, whether a parent bypasses its owner); ``check`` alone decides. Every entry point
asks it: ``apply`` (through ``select_requests``), ``load_adapters``, ``load_peft_lora``,
``from_pretrained`` and the exporters (through ``require``), and ``sites()`` shows its answer for
any adapter in ``Site.reason``.

Example:
    >>> site = aurora_fx.sites(model).get("encoder.layer.0.attention.self.query")
    >>> check(site, AuroraConfig()) is None
    True
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable

import torch
from torch import nn

import aurora_fx.methods  # noqa: F401, I001  (the built-in methods register themselves)
from aurora_fx.config import AdapterConfig
from aurora_fx.passes.pattern import Matcher
from aurora_fx.quantized import quantization
from aurora_fx.records import Site, SiteRequest, SiteTable
from aurora_fx.registry import adapter_class
from aurora_fx.tracing import get_submodule

__all__ = ["check", "select_requests", "require", "check_modules", "check_export"]


def _parameter(site: Site) -> str | None:
    return None if site.is_parameter else "the weight is a buffer, not an nn.Parameter"


def _floating(site: Site) -> str | None:
    if site.floating or site.quantization is not None:
        return None
    return (f"weight dtype {site.dtype} is not floating point; integer or quantized bases are not supported, "
            f"dequantize the layer first")


def _two_d(site: Site) -> str | None:
    if site.ndim == 2 or (site.kind == "expert" and site.ndim == 3):
        return None
    return f"the weight is {site.ndim}-D; only 2-D weights (and 3-D expert weights) are linear sites"


def _not_root(site: Site) -> str | None:
    if site.owner:
        return None
    return (f"the root module ({site.owner_type}) computes {site.param} in its own forward; aurora_fx rewrites an "
            f"owner by swapping it inside its parent, and the root has none, so an adapter here would never run. "
            f"Wrap the model in a parent (e.g. torch.nn.Sequential(model)) or move {site.param} into an nn.Linear "
            f"child")


def _not_bypassed(site: Site) -> str | None:
    return site.bypass


def _free(site: Site, name: str) -> str | None:
    if site.adapted is None or (site.adapted_names and name not in site.adapted_names):
        return None
    if site.adapted_names in ((), ("default",)) and name == "default":
        return (f"already has an adapter ({site.adapted}); call aurora_fx.unload(model) first, or add a second one "
                f"under a name: apply(..., name='other')")
    return (f"already has an adapter named {name!r} ({site.adapted}); remove it first "
            f"(aurora_fx.delete_adapter(model, {name!r})) or apply under another name")


def _rank_fits(site: Site, config: AdapterConfig) -> str | None:
    if config.rank <= min(site.in_features, site.out_features):
        return None
    return f"rank {config.rank} > min(in_features={site.in_features}, out_features={site.out_features})"


def _method_accepts(site: Site, config: AdapterConfig) -> str | None:
    return adapter_class(config).check_site(site, config)


def _supported_layout(site: Site) -> str | None:
    return site.unsupported


_SITE_RULES: tuple[Callable[[Site], str | None], ...] = (_parameter, _floating, _two_d, _not_root, _not_bypassed,
                                                         _supported_layout)
_REQUEST_RULES: tuple[Callable[[Site, AdapterConfig], str | None], ...] = (_rank_fits, _method_accepts)


def check(site: Site, config: AdapterConfig | None = None, name: str = "default") -> str | None:
    """Why ``site`` cannot take an adapter of ``config``, or None if it can.

    With ``config=None`` only the rules that hold for every adapter apply (what ``sites()``
    shows); with a config, also: the site is free, the rank fits, and the method accepts it
    (``AdapterBase.check_site``).
    """
    for rule in _SITE_RULES:
        reason = rule(site)
        if reason:
            return reason
    if config is None:
        return None
    reason = _free(site, name)  # (no adapter of this name here yet)
    if reason:
        return reason
    for request_rule in _REQUEST_RULES:
        reason = request_rule(site, config)
        if reason:
            return reason
    return None


def check_export(kind: str, target: str) -> str | None:
    """Why an adapted site of ``kind`` cannot be written for ``target`` (e.g. "PEFT LoRA"), or None.

    PEFT's LoRA targets modules (``nn.Linear``, HF ``Conv1D``): a functional site, a weight a
    module's own forward uses through ``F.linear``/``@``, has no module PEFT could wrap.
    """
    if kind in ("linear", "conv1d", "conv"):
        return None
    return (f"it is a {kind} site (a weight used inside a module's own forward), and {target} can only "
            f"target nn.Linear / Conv1D modules; export it with aurora_fx.export.to_onnx, or adapt a Linear child")


def _problems(requests: list[SiteRequest]) -> tuple[int, list[str]]:
    """How many requests ``check`` refuses, and one line per distinct reason with the sites it names."""
    by_reason: dict[str, list[str]] = {}
    for r in requests:
        reason = check(r.site, r.config, r.name)
        if reason:
            by_reason.setdefault(reason, []).append(r.site.path or "<root>")
    lines = []
    for reason, paths in by_reason.items():
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        lines.append(f"{', '.join(paths[:3])}{more}: {reason}")
    return sum(map(len, by_reason.values())), lines


def require(requests: list[SiteRequest], error: type[Exception] = ValueError, context: str = "") -> None:
    """Raise ``error`` naming every request that ``check`` refuses (nothing is changed)."""
    count, lines = _problems(requests)
    if count:
        lead = f"{context} " if context else ""
        raise error(f"{lead}{count} site(s) cannot take the adapter:\n  " + "\n  ".join(lines))


def select_requests(model: nn.Module, table: SiteTable, matcher: Matcher, config: AdapterConfig,
                    name: str = "default") -> list[SiteRequest]:
    """``apply``'s requests: every matched site with ``config`` under ``name``, or a ValueError that says what to do."""
    matched = table.matched
    check_modules(model, table, matcher, bool(matched))
    if not matched:
        raise ValueError(_nothing_matched(table, matcher))
    requests = [SiteRequest(site, config, name) for site in matched]
    count, lines = _problems(requests)
    if count:
        raise ValueError(
            f"pattern {matcher.describe()} matched {count} site(s) that cannot take this adapter:\n  "
            + "\n  ".join(lines) + "\nNarrow the pattern (aurora_fx.sites(model, pattern) shows every match)."
        )
    return requests


def _is_quantized(module: nn.Module) -> bool:
    """A quantized module aurora_fx cannot adapt (the supported quantized linears are sites: ``quantized.py``)."""
    if quantization(module) is not None:
        return False
    name = f"{type(module).__module__}.{type(module).__name__}".lower()
    weight = getattr(module, "weight", None)
    unsupported_bnb = "bitsandbytes" in name and isinstance(weight, torch.Tensor) and not weight.is_floating_point()
    return ".quantized" in name or unsupported_bnb or "linear8bit" in name or "linear4bit" in name


def check_modules(model: nn.Module, table: SiteTable, matcher: Matcher, any_site: bool) -> None:
    """Refuse, with the reason, patterns that reach quantized or untraceable modules (no site there)."""
    quantized = [path for path, m in model.named_modules() if path and _is_quantized(m) and matcher(path, m)]
    if quantized:
        kind = type(get_submodule(model, quantized[0])).__name__
        raise ValueError(f"pattern {matcher.describe()} matches quantized module(s) {quantized[:5]} of a layout "
                         f"aurora_fx does not adapt ({kind}); supported quantized bases: bitsandbytes Linear4bit "
                         f"(nf4/fp4) and Linear8bitLt (int8), torchao weight-only "
                         f"(quantize_ on nn.Linear). Quantize with one of those, or dequantize these layers first")
    for u in table.untraceable:
        owner = get_submodule(model, u.path)
        names = [u.path] + [f"{u.path}.{p}" if u.path else p for p in u.params]
        if any(matcher(n, owner) for n in names):
            msg = (f"pattern {matcher.describe()} reaches {u.path or '<root>'} ({u.module_type}), whose own forward "
                   f"torch.fx cannot trace alone ({u.error}); a linear map on its parameters ({', '.join(u.params)}) "
                   f"cannot be rewritten. Make that forward traceable, or target the nn.Linear children instead")
            if not any_site:
                raise ValueError(msg)
            warnings.warn(msg + " (the other matched sites are adapted)", stacklevel=5)


def _nothing_matched(table: SiteTable, matcher: Matcher) -> str:
    paths = [s.path for s in table if s.adaptable]
    near = difflib.get_close_matches(matcher.text, paths, n=5, cutoff=0.3) if matcher.text else []
    shown = ", ".join(paths[:40]) + (f", ... ({len(paths)} in all)" if len(paths) > 40 else "")
    msg = (f"pattern {matcher.describe()} matched no site (a regex is searched in each site path with re.search). "
           f"Sites that could match: {shown or 'none'}.")
    if near:
        msg += f" Nearest names: {', '.join(near)}."
    if table.untraceable:
        names = ", ".join(f"{u.path} ({u.module_type})" for u in table.untraceable)
        msg += f" Not searched because torch.fx cannot trace them alone: {names}."
    return msg + " See aurora_fx.sites(model) for the full table."
