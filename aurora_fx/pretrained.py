"""Saved models come back whole: ``save_pretrained`` after ``apply``, then ``from_pretrained``.

An adapted model's ``state_dict`` holds the adapter tensors (they are its parameters and
buffers) and, under the key ``aurora_fx.adapters``, the adapter record: the JSON header that
``save_adapters`` writes (sites, configs, state, base fingerprints, trainable modules) as a uint8
tensor, computed when the state dict is taken, so it always describes the adapters as they are.
``load_state_dict`` drops that key again. So HF's own ``save_pretrained`` writes everything, and
``from_pretrained`` loads the base with the class's own ``from_pretrained``, reads the record and
the adapter tensors from the folder's safetensors files, then runs find → check → attach. The
class's own ``from_pretrained`` alone loads the base only (it reports the adapter tensors as
unexpected keys).

Example:
    >>> aurora_fx.apply(model, "q_proj|v_proj"); train(model)
    >>> model.save_pretrained("runs/llama")
    >>> again = aurora_fx.from_pretrained(LlamaForCausalLM, "runs/llama")   # adapters included
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from aurora_fx.adapter_record import RECORD_KEY
from aurora_fx.checkpoint import CheckpointError, load_checkpoint, parse_metadata
from aurora_fx.named import DEFAULT, set_adapters

__all__ = ["from_pretrained"]

def _read_folder(folder: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """The adapter record and every tensor of the folder's safetensors files that belongs to it."""
    files = sorted(folder.glob("*.safetensors"))
    meta = None
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            if RECORD_KEY in fh.keys():  # noqa: SIM118 - safe_open has no __contains__
                meta = json.loads(bytes(fh.get_tensor(RECORD_KEY).tolist()).decode())
    if meta is None:
        return None, {}
    wanted = {f"{s['owner']}.{s['attr']}." if s["owner"] else f"{s['attr']}.": s for s in meta["sites"]}
    tensors: dict[str, dict[str, torch.Tensor]] = {}  # adapter name → checkpoint tensors
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                prefix, _, name = key.rpartition(".")
                site = wanted.get(prefix + ".")
                if site is not None and name in site.get("tensors", (name,)):  # (older records list none)
                    group = tensors.setdefault(site.get("name", DEFAULT), {})
                    group[f"adapters/{site['path']}/{name}"] = fh.get_tensor(key)
    return meta, tensors


def from_pretrained(model_class, folder: str | os.PathLike, *, fuse: bool = True, check_base: bool = True,
                    **kwargs) -> nn.Module:
    """Load a folder written by ``save_pretrained`` after ``aurora_fx.apply``, adapters included.

    Steps: ``model_class.from_pretrained(folder, **kwargs)`` (the base) → read the adapter record
    and tensors from the folder → find → check → attach.

    Args:
        model_class: The HF class (``LlamaForCausalLM``, ``AutoModelForCausalLM``, ...).
        folder: The ``save_pretrained`` folder.
        fuse: Use fused ops where the method has one.
        check_base: Check the loaded base weights against the fingerprints saved with the adapters.
        **kwargs: Passed to ``model_class.from_pretrained`` (e.g. ``dtype``).

    Raises:
        CheckpointError: The folder holds no aurora_fx adapter record (it was saved without
            adapters: load it with the class's own ``from_pretrained``), or the adapters do not fit.
    """
    folder = Path(folder)
    meta, tensors = _read_folder(folder)
    if meta is None:
        raise CheckpointError(f"{str(folder)!r} holds no aurora_fx adapters (no {RECORD_KEY!r} tensor in its "
                              f"safetensors files); it was saved without adapters, so "
                              f"{model_class.__name__}.from_pretrained loads it as it is")
    hf_logger = logging.getLogger("transformers.modeling_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # the adapter tensors are "unexpected" to the base class
    try:
        model = model_class.from_pretrained(folder, **kwargs)
    finally:
        hf_logger.setLevel(level)
    names = list(dict.fromkeys(site.get("name", DEFAULT) for site in meta["sites"]))
    for name in names:  # one attach per adapter name, in the saved order
        part = {**meta, "sites": [site for site in meta["sites"] if site.get("name", DEFAULT) == name]}
        load_checkpoint(model, parse_metadata(folder, part, tensors.get(name, {})), fuse=fuse, check_base=check_base,
                        name=name)
    if len(names) > 1 and meta.get("active"):
        set_adapters(model, meta["active"])
    return model
