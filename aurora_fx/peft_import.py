r"""Import an HF PEFT LoRA checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``).

The LoRA factors become aurora_fx ``LoraAdapter``\\s with identical outputs (PEFT's
``lora_A.weight`` is our A ``(r, d_in)``, ``lora_B.weight`` our B ``(d_out, r)``, scale
``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA; ``alpha_pattern`` and ``rank_pattern`` are
honoured through the factor shapes). ``modules_to_save`` weights are loaded into the model and
stay trainable. Everything is validated before the model changes. Migrated fine-tunes export with ``aurora_fx.export``.

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

from aurora_fx.checkpoint import CheckpointError
from aurora_fx.config import LoraConfig
from aurora_fx.passes.match import find_sites
from aurora_fx.surgery import SiteRequest, commit, plan_owners, resolve_trainable

__all__ = ["load_peft_lora"]

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "lora_bias": "LoRA bias"}


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
    for key, name in _UNSUPPORTED.items():
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


def load_peft_lora(model: nn.Module, folder: str | os.PathLike, *, fuse: bool = True) -> nn.Module:
    """Load a PEFT LoRA checkpoint folder into ``model`` as aurora_fx LoRA adapters.

    Raises:
        CheckpointError: Not a (supported) PEFT LoRA checkpoint, or it does not fit the model
            (the message names the module or tensor).
    """
    config, tensors = _read(Path(folder))
    lora = _lora_tensors(tensors)
    if not lora:
        raise CheckpointError(f"{str(folder)!r} holds no lora_A/lora_B tensors")
    table = find_sites(model, lambda p, m: p in lora)
    found = {s.path: s for s in table.matched}
    requests = []
    for path, pair in lora.items():
        site = found.get(path)
        if site is None or site.reason or site.adapted:
            why = "does not exist" if site is None else (site.reason or f"already has an adapter ({site.adapted})")
            raise CheckpointError(f"PEFT module {path!r} {why} in this {type(model).__name__}")
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"PEFT module {path!r} lacks lora_{'A' if 'A' not in pair else 'B'}.weight")
        rank = int(pair["A"].shape[0])
        want = {"A": (rank, site.in_features), "B": (site.out_features, rank)}
        for which, shape in want.items():
            if tuple(pair[which].shape) != shape:
                raise CheckpointError(f"PEFT tensor {path}.lora_{which}.weight has shape {tuple(pair[which].shape)} "
                                      f"but site {path!r} needs {shape}")
        requests.append(SiteRequest(site, _site_config(config, path, rank)))
    extra = _module_tensors(model, tensors)
    plans = plan_owners(model, requests, fuse)
    with torch.no_grad():
        for plan in plans:
            for b in plan.new_bindings:
                adapter = plan.module.get_submodule(b.attr)
                adapter.A.copy_(lora[b.site]["A"].to(adapter.A.dtype))
                adapter.B.copy_(lora[b.site]["B"].to(adapter.B.dtype))
    saved = config.get("modules_to_save") or []
    trainable = resolve_trainable(model, [rf"(^|\.){re.escape(m)}$" for m in saved] or None) if saved else \
        resolve_trainable(model, None)
    commit(model, plans, trainable)
    with torch.no_grad():
        for param, value in extra:
            param.copy_(value)
    return model


def _module_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    out = []
    for key, value in tensors.items():
        if _LORA_KEY.match(key):
            continue
        name = key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        param = params.get(name)
        if param is None or param.shape != value.shape:
            why = (f"no parameter {name!r}" if param is None
                   else f"shape {tuple(value.shape)} vs {tuple(param.shape)}")
            raise CheckpointError(f"PEFT tensor {key!r} does not fit this {type(model).__name__} ({why})")
        out.append((param, value.to(dtype=param.dtype)))
    return out
