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
from aurora_fx.model_state import model_state, update_model_state
from aurora_fx.named import active_names, adapter_names
from aurora_fx.owners import base_weight, iter_bindings

__all__ = ["adapter_metadata", "install_record_hooks", "RECORD_KEY", "FORMAT", "FORMAT_VERSION", "controller_json",
           "controller_from_json"]

FORMAT = "aurora_fx.adapters"
FORMAT_VERSION = 1
RECORD_KEY = "aurora_fx.adapters"  # the state_dict key of the adapter record
_HOOKED = "_aurora_fx_record_hooks"


def _add_record(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    meta = adapter_metadata(module)
    controller = _live_controller(module)
    if controller is not None:
        meta["controller_state"] = controller_json(controller.state_dict())
    if meta["sites"]:
        data = bytearray(json.dumps(meta).encode())
        state_dict[prefix + RECORD_KEY] = torch.frombuffer(data, dtype=torch.uint8).clone()


def _drop_record(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Take the record out of an incoming state dict, and shape the adapters like the one it describes.

    A grown AROMA adapter's stored factors (U, V) change width during training; ``load_state`` gives each
    adapter the saved width, frozen flag and piece count, so ``model.load_state_dict`` of a saved state (a
    Trainer checkpoint being resumed) finds tensors of the shapes it holds.
    """
    record = state_dict.pop(prefix + RECORD_KEY, None)
    if record is not None:
        meta = json.loads(bytes(record.tolist()).decode())
        _prepare_adapters(module, meta, state_dict, prefix)
        if meta.get("controller_state") is not None:
            update_model_state(module, resumed_controller=meta["controller_state"])


def _live_controller(model: nn.Module) -> Any:
    state = model_state(model)
    ref = state.controller if state is not None else None
    return ref() if ref is not None else None


def controller_json(state: dict[str, Any]) -> dict[str, Any]:
    """An ``AromaController.state_dict()`` as pure JSON (the snapshot tensors as nested lists)."""
    snaps = {site: None if pair is None else [t.detach().cpu().double().tolist() for t in pair]
             for site, pair in state["snaps"].items()}
    return {**state, "snaps": snaps}


def controller_from_json(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``controller_json`` (snapshots back as float32 tensors)."""
    snaps = {site: None if pair is None else tuple(torch.tensor(t, dtype=torch.float32) for t in pair)
             for site, pair in state["snaps"].items()}
    return {**state, "snaps": snaps}


def _prepare_adapters(model: nn.Module, record: dict[str, Any], state_dict: dict, prefix: str) -> None:
    saved = {(site["path"], site.get("name", "default")): site for site in record.get("sites", ())}
    for owner, gm, b in iter_bindings(model):
        entry = saved.get((b.site, b.name))
        if entry is None or entry.get("config", {}).get("method") != gm.get_submodule(b.attr).method:
            continue
        adapter = gm.get_submodule(b.attr)
        base = f"{prefix}{owner}.{b.attr}." if owner else f"{prefix}{b.attr}."
        names = adapter.stored_tensors()
        keys = {n: _state_key(adapter, n) for n in names}
        tensors = {n: state_dict[base + k] for n, k in keys.items() if base + k in state_dict}
        adapter.load_state(entry.get("state", {}), tensors)


def _state_key(adapter: nn.Module, stored_name: str) -> str:
    """The module state-dict key of a stored tensor name (an expert family stores ``e.U`` as ``experts.e.U``)."""
    units = dict(adapter.units())
    head, _, rest = stored_name.partition(".")
    if rest and f".{head}" in units:
        unit = units[f".{head}"]
        path = next(n for n, m in adapter.named_modules() if m is unit)
        return f"{path}.{rest}"
    return stored_name


def install_record_hooks(model: nn.Module) -> None:
    """Make ``model.state_dict()`` carry the adapter record and ``load_state_dict`` drop it (once)."""
    if not model.__dict__.get(_HOOKED):
        model.register_state_dict_post_hook(_add_record)
        model.register_load_state_dict_pre_hook(_drop_record)
        model.__dict__[_HOOKED] = True


def adapter_metadata(model: nn.Module, extra: dict[str, Any] | None = None, name: str | None = None
                     ) -> dict[str, Any]:
    """The JSON record of ``model``'s adapters (what ``save_adapters`` writes in its header).

    It holds the format, the model class, per site its owner, parameter, adapter attribute, kind,
    layout, shape, config, state and base-weight fingerprint (and the adapter name, unless ``"default"``),
    and the trainable modules. ``name`` keeps the adapters of that name only.
    """
    sites = []
    for owner, gm, b in iter_bindings(model, name):
        adapter = gm.get_submodule(b.attr)
        base = fingerprint(base_weight(gm, b))
        sites.append({
            "path": b.site, "owner": owner, "param": b.param, "attr": b.attr, "kind": b.kind, "layout": b.layout,
            "quantization": b.quantization, "rows": list(b.rows) if b.rows else None,
            "in_features": adapter.in_features, "out_features": adapter.out_features,
            "config": adapter.config.to_dict(), "state": adapter.state(),
            "tensors": sorted(adapter.stored_tensors()),  # (a state dict also holds a frozen piece's dead A, B)
            "base": base.to_dict() if base is not None else None,
            **({"name": b.name} if b.name != "default" else {}),  # (a one-adapter file stays as it always was)
        })
    state = model_state(model)
    trainable = state.trainable_modules if state is not None else ()
    several = {"active": list(active_names(model))} if name is None and len(adapter_names(model)) > 1 else {}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_class": model_class(model).__name__,
            "sites": sites, "trainable_modules": list(trainable), "extra": extra or {}, **several}
