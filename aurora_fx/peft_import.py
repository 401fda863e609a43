r"""Import an HF PEFT LoRA checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``).

The LoRA factors become aurora_fx ``LoraAdapter``\\s with identical outputs (PEFT's
``lora_A.weight`` is our A ``(r, d_in)``, ``lora_B.weight`` our B ``(d_out, r)``, scale
``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA; ``alpha_pattern`` and ``rank_pattern`` are
honoured through the factor shapes). ``modules_to_save`` weights are loaded into the model and
stay trainable. Like every entry point this is find → check → attach: everything is validated
before the model changes. Migrated fine-tunes export with ``aurora_fx.export``.

A ``peft.LoraConfig`` object passed to ``apply`` is read by ``aurora_fx.peft_config``.

Example:
    >>> model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)
    >>> aurora_fx.load_peft_lora(model, "peft_run/")          # then train, merge, export ...
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from aurora_fx.attach import attach, resolve_trainable
from aurora_fx.checkpoint import CheckpointError, copy_values, load_module_tensors
from aurora_fx.config import LoraConfig
from aurora_fx.passes.check import require
from aurora_fx.passes.match import find_sites
from aurora_fx.peft_config import UNSUPPORTED
from aurora_fx.records import SiteRequest

__all__ = ["load_peft_lora"]

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no adapter_config.json; pass the folder written by PEFT's "
                              f"save_pretrained")
    if not weights.is_file():
        pickle = " (adapter_model.bin is a pickle and is never loaded; re-save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{str(folder)!r} has no adapter_model.safetensors{pickle}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"PEFT type {config.get('peft_type')!r} is not LoRA; only LoRA checkpoints import")
    for key, name in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"this PEFT checkpoint uses {name} ({key}=True), which aurora_fx does not import")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"PEFT bias={config['bias']!r} trains base biases; only bias='none' imports")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from None
    return config, {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in tensors.items()}


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank/alpha patterns: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.search(rf"(^|\.){key}$", path) or re.fullmatch(key, path):
            return value
    return default


def _site_config(config: dict[str, Any], path: str, rank: int) -> LoraConfig:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # PEFT scale α/√r == our scale α'/r with α' = α·√r
    return LoraConfig(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)))


def _lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(match["path"], {})[match["which"]] = value
    return found


def _requests(model: nn.Module, config: dict[str, Any], lora: dict[str, dict[str, torch.Tensor]]) -> list[SiteRequest]:
    """Find every PEFT module's site; one LoRA request per site with its own rank and alpha."""
    found = {s.path: s for s in find_sites(model, lambda p, m: p in lora).matched}
    requests = []
    for path, pair in lora.items():
        site = found.get(path)
        if site is None:
            raise CheckpointError(f"PEFT module {path!r} does not exist in this {type(model).__name__}")
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"PEFT module {path!r} lacks lora_{'A' if 'A' not in pair else 'B'}.weight")
        requests.append(SiteRequest(site, _site_config(config, path, int(pair["A"].shape[0]))))
    return requests


def _fill_from(lora: dict[str, dict[str, torch.Tensor]]):
    def fill(site: str, adapter: nn.Module) -> None:
        for which in ("A", "B"):
            target, value = getattr(adapter, which), lora[site][which]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"PEFT tensor {site}.lora_{which}.weight has shape {tuple(value.shape)} "
                                      f"but site {site!r} needs {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    return fill


def load_peft_lora(model: nn.Module, folder: str | os.PathLike, *, fuse: bool = True) -> nn.Module:
    """Load a PEFT LoRA checkpoint folder into ``model`` as aurora_fx LoRA adapters.

    Steps: read → find the sites → check → attach (fill A and B) → load ``modules_to_save``.

    Raises:
        CheckpointError: Not a (supported) PEFT LoRA checkpoint, or it does not fit the model
            (the message names the module or tensor).
    """
    config, tensors = _read(Path(folder))
    lora = _lora_tensors(tensors)
    if not lora:
        raise CheckpointError(f"{str(folder)!r} holds no lora_A/lora_B tensors")
    requests = _requests(model, config, lora)
    require(requests, CheckpointError, f"PEFT checkpoint {str(folder)!r}:")
    module_values = load_module_tensors(model, _module_tensors(tensors), "PEFT tensor ")
    saved = config.get("modules_to_save") or []
    trainable = resolve_trainable(model, [rf"(^|\.){re.escape(m)}$" for m in saved] if saved else None)
    attach(model, requests, _fill_from(lora), trainable, fuse=fuse)
    copy_values(module_values)
    return model


def _module_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Non-LoRA tensors (``modules_to_save``) by the base model's parameter names."""
    return {k.replace(".modules_to_save.default.", ".").replace(".original_module.", "."): v
            for k, v in tensors.items() if not _LORA_KEY.match(k)}
