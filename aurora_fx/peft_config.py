"""A ``peft.LoraConfig`` passed to ``apply``: every setting honoured, or refused by name.

``aurora_fx.apply(model, config=peft.LoraConfig(...))`` reads:

* ``r``, ``lora_alpha`` (``use_rslora``: PEFT's α/√r is our α'/r), ``lora_dropout`` → ``LoraConfig``;
* ``target_modules`` (names matched at the end of the module path, a string full-matched as a regex,
  or ``"all-linear"``: every linear site but the output layer), ``exclude_modules`` (the same rules),
  ``layers_to_transform`` with ``layers_pattern`` (only those layer indices) → the site selection;
* ``modules_to_save`` → ``trainable_modules`` (the named modules train and are saved with the adapters).

Settings with no aurora_fx equivalent raise a ``ValueError`` that names them (DoRA, LoRA bias, base
biases, rank/alpha patterns, an ``init_lora_weights`` other than PEFT's default ``True``, ...), instead of
being ignored. A model already wrapped by PEFT is refused (``refuse_peft_model``).

Example:
    >>> aurora_fx.apply(llama, config=peft.LoraConfig(r=8, target_modules="all-linear", layers_to_transform=[0]))
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from aurora_fx.config import LoraConfig
from aurora_fx.passes.pattern import Pattern, compile_pattern

__all__ = ["UNSUPPORTED", "is_peft_lora_config", "lora_config_from_peft", "as_aurora_config", "PeftSelection",
           "peft_selection", "refuse_peft_model"]

# Boolean PEFT options with no aurora_fx equivalent, and their names.
UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "lora_bias": "LoRA bias"}
# Options that must be empty/None: their value would change what is adapted or how.
_MUST_BE_EMPTY = ("rank_pattern", "alpha_pattern", "layer_replication", "target_parameters",
                  "trainable_token_indices", "megatron_config")


def is_peft_lora_config(config: object) -> bool:
    """A ``peft.LoraConfig`` (recognised by name: PEFT is imported only by its user)."""
    return type(config).__name__ == "LoraConfig" and type(config).__module__.startswith("peft")


def _unsupported(config: object) -> list[str]:
    used = [f"{key}=True ({name})" for key, name in UNSUPPORTED.items() if getattr(config, key, False)]
    used += [f"{key}={getattr(config, key)!r}" for key in _MUST_BE_EMPTY if getattr(config, key, None)]
    if getattr(config, "bias", "none") != "none":
        used.append(f"bias={config.bias!r}")
    init = getattr(config, "init_lora_weights", True)
    if init is not True:
        used.append(f"init_lora_weights={init!r} (aurora_fx initialises LoRA as PEFT's default, True)")
    return used


def lora_config_from_peft(config: object) -> LoraConfig | None:
    """An aurora_fx ``LoraConfig`` equal to a ``peft.LoraConfig`` (None for other objects).

    Raises:
        ValueError: The PEFT config uses a setting aurora_fx does not implement (named in the message).
    """
    if not is_peft_lora_config(config):
        return None
    used = _unsupported(config)
    if used:
        raise ValueError(f"peft.LoraConfig with {', '.join(used)} has no aurora_fx equivalent; leave it at PEFT's "
                         f"default, or use aurora_fx.LoraConfig(rank=..., alpha=..., dropout=...) with a pattern "
                         f"per group of sites")
    rank, alpha = int(config.r), float(config.lora_alpha)
    return LoraConfig(rank=rank, alpha=alpha * math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha,
                      dropout=float(config.lora_dropout))


def as_aurora_config(config: object) -> object:
    """``config`` with a ``peft.LoraConfig`` replaced by its aurora_fx ``LoraConfig``; anything else unchanged."""
    converted = lora_config_from_peft(config)
    return config if converted is None else converted


@dataclass(frozen=True)
class PeftSelection:
    """What a ``peft.LoraConfig`` selects: the sites (a pattern) and the modules that train besides."""

    pattern: Callable[[str, nn.Module], bool]
    trainable_modules: Pattern


def _names_rule(spec: str | list[str] | tuple[str, ...]) -> Callable[[str], bool]:
    """PEFT's rule: a string is full-matched as a regex; a list matches names at the end of the path."""
    if isinstance(spec, str):
        regex = re.compile(spec)
        return lambda path: regex.fullmatch(path) is not None
    names = tuple(spec)
    return lambda path: any(path == n or path.endswith("." + n) for n in names)


def _layer_rule(config: object) -> Callable[[str], bool]:
    """``layers_to_transform`` / ``layers_pattern``: the path's layer index must be listed."""
    wanted = config.layers_to_transform
    if wanted is None:
        return lambda path: True
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [r"[^.]*"])
    regexes = [re.compile(rf"(?:^|.*\.){p}\.(\d+)\.") for p in patterns]

    def rule(path: str) -> bool:
        found = next((m for r in regexes if (m := r.match(path))), None)
        return found is not None and int(found.group(1)) in wanted

    return rule


def _output_layer(model: nn.Module) -> str | None:
    """The path of the model's output layer (what ``"all-linear"`` leaves out), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((path for path, m in model.named_modules() if m is head), None) if head is not None else None


def peft_selection(config: object, model: nn.Module, pattern: Pattern = None) -> PeftSelection:
    """The sites and trainable modules a ``peft.LoraConfig`` selects on ``model``.

    ``pattern``, when given, replaces ``target_modules``; ``exclude_modules`` and ``layers_to_transform``
    still apply.
    """
    targets = config.target_modules
    if pattern is not None:
        chosen = compile_pattern(pattern)
        target = lambda path, module: chosen(path, module)  # noqa: E731
    elif targets == "all-linear":
        output = _output_layer(model)
        target = lambda path, module: path != output  # noqa: E731  (every site but the output layer)
    elif targets:
        names = _names_rule(targets)
        target = lambda path, module: names(path)  # noqa: E731
    else:
        raise ValueError("peft.LoraConfig has no target_modules; set them, or pass pattern= to apply")
    excluded = _names_rule(config.exclude_modules) if getattr(config, "exclude_modules", None) else (lambda p: False)
    layer_ok = _layer_rule(config)
    saved = getattr(config, "modules_to_save", None)
    trainable = rf"(^|\.)({'|'.join(re.escape(m) for m in saved)})$" if saved else None
    return PeftSelection(lambda path, module: target(path, module) and layer_ok(path) and not excluded(path),
                         trainable)


def refuse_peft_model(model: nn.Module) -> None:
    """Raise when ``model`` is already wrapped by PEFT (its LoRA layers would become aurora_fx sites).

    Raises:
        ValueError: The model, or one of its modules, is a PEFT class.
    """
    if not isinstance(model, nn.Module):
        return  # (apply names a non-module itself)
    found = next(((path or "the model", m) for path, m in model.named_modules()
                  if type(m).__module__.startswith("peft.")), None)
    if found is not None:
        raise ValueError(f"the model is wrapped by PEFT ({found[0]!r} is a {type(found[1]).__module__}."
                         f"{type(found[1]).__name__}): aurora_fx would adapt PEFT's own lora_A/lora_B layers. Either "
                         f"peft_model.merge_and_unload() first, or save it (peft_model.save_pretrained(folder)) and "
                         f"import its LoRA into the base with aurora_fx.load_peft_lora(base_model, folder)")
