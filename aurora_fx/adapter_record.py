"""The adapter record: the JSON description of a model's adapters, and the hooks that carry it.

The record (format, model class, per site its owner, parameter, adapter attribute, kind, layout,
shape, config, state, stored tensor names and base-weight fingerprint, and the trainable modules) is the header of an
``adapters.safetensors`` checkpoint (``aurora_fx.checkpoint``), and ``attach`` installs state-dict
hooks so that ``model.state_dict()`` carries it under ``RECORD_KEY`` too: HF's ``save_pretrained``
then writes it, and ``aurora_fx.from_pretrained`` reads it back (``aurora_fx.pretrained``).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from aurora_fx.distributed import model_class
from aurora_fx.fingerprint import fingerprint
from aurora_fx.model_state import model_state
from aurora_fx.owners import iter_bindings
from aurora_fx.records import weight_out_in

__all__ = ["adapter_metadata", "install_record_hooks", "RECORD_KEY", "FORMAT", "FORMAT_VERSION"]

FORMAT = "aurora_fx.adapters"
FORMAT_VERSION = 1
RECORD_KEY = "aurora_fx.adapters"  # the state_dict key of the adapter record
_HOOKED = "_aurora_fx_record_hooks"


def _add_record(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    meta = adapter_metadata(module)
    if meta["sites"]:
        data = bytearray(json.dumps(meta).encode())
        state_dict[prefix + RECORD_KEY] = torch.frombuffer(data, dtype=torch.uint8).clone()


def _drop_record(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    state_dict.pop(prefix + RECORD_KEY, None)


def install_record_hooks(model: nn.Module) -> None:
    """Make ``model.state_dict()`` carry the adapter record and ``load_state_dict`` drop it (once)."""
    if not model.__dict__.get(_HOOKED):
        model.register_state_dict_post_hook(_add_record)
        model.register_load_state_dict_pre_hook(_drop_record)
        model.__dict__[_HOOKED] = True


def adapter_metadata(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of ``model``'s adapters (what ``save_adapters`` writes in its header).

    It holds the format, the model class, per site its owner, parameter, adapter attribute, kind,
    layout, shape, config, state and base-weight fingerprint, and the trainable modules.
    """
    sites = []
    for owner, gm, b in iter_bindings(model):
        adapter = gm.get_submodule(b.attr)
        base = fingerprint(weight_out_in(gm._parameters[b.param], b.layout))
        sites.append({
            "path": b.site, "owner": owner, "param": b.param, "attr": b.attr, "kind": b.kind, "layout": b.layout,
            "in_features": adapter.in_features, "out_features": adapter.out_features,
            "config": adapter.config.to_dict(), "state": adapter.state(),
            "tensors": sorted(adapter.stored_tensors()),  # (a state dict also holds a frozen piece's dead A, B)
            "base": base.to_dict() if base is not None else None,
        })
    state = model_state(model)
    trainable = state.trainable_modules if state is not None else ()
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_class": model_class(model).__name__,
            "sites": sites, "trainable_modules": list(trainable), "extra": extra or {}}
