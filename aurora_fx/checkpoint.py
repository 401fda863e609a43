"""Adapter checkpoints: one safetensors file whose header carries the adapter config as JSON.

Layout of ``adapters.safetensors``:

* tensors ``adapters/<site path>/<name>`` (A, B, H, Ws; U, V for AROMA) and
  ``modules/<parameter name>`` for the extra ``trainable_modules`` (e.g. a new head);
* ``__metadata__["aurora_fx"]``: JSON with the format version, the model class, and per site
  its owner, parameter, kind, layout, shape, config and state.

Never pickle. The write is atomic (``aurora_fx.atomic``). Loading validates the whole file
against the model (every site and tensor shape) before anything in the model changes, so a
failed load leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

import aurora_fx.methods  # noqa: F401, I001  (the built-in methods register themselves)
from aurora_fx.adapter_record import FORMAT, FORMAT_VERSION, adapter_metadata
from aurora_fx.atomic import atomic_write_bytes
from aurora_fx.attach import attach, resolve_trainable
from aurora_fx.config import AdapterConfig
from aurora_fx.distributed import full, is_main, model_class, world_size
from aurora_fx.fingerprint import Fingerprint, differs, fingerprint
from aurora_fx.named import DEFAULT, adapter_names, check_name, resolve_name
from aurora_fx.owners import Binding, base_weight, iter_bindings
from aurora_fx.passes.check import require
from aurora_fx.passes.match import find_sites
from aurora_fx.records import Site, SiteRequest
from aurora_fx.registry import config_from_dict
from aurora_fx.tracing import get_submodule

__all__ = ["save_adapters", "load_adapters", "read_controller_state", "load_checkpoint", "read_checkpoint",
           "adapter_metadata", "parse_metadata", "Checkpoint", "CheckpointError", "FORMAT", "load_module_tensors",
           "copy_values"]

DEFAULT_NAME = "adapters.safetensors"
_META_KEY = "aurora_fx"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


@dataclass(frozen=True)
class SiteEntry:
    """One adapted site as recorded in a checkpoint."""

    path: str
    owner: str
    param: str
    kind: str
    layout: str
    in_features: int
    out_features: int
    config: AdapterConfig
    state: dict[str, Any] = field(default_factory=dict)
    attr: str = ""  # the adapter's attribute in its owner (state_dict keys: <owner>.<attr>.<tensor>)
    base: dict[str, Any] | None = None  # fingerprint of the base weight when saved
    tensors: tuple[str, ...] = ()  # the adapter's stored tensor names (empty in older checkpoints)
    quantization: str | None = None  # the base weight's quantization when saved (Site.quantization)
    rows: tuple[int, int] | None = None  # a slice site's output rows (Site.rows)
    name: str = "default"  # the adapter's name when saved (apply(..., name=...))


@dataclass(frozen=True)
class Checkpoint:
    """A parsed checkpoint: metadata plus tensors."""

    path: Path
    model_class: str
    sites: tuple[SiteEntry, ...]
    trainable_modules: tuple[str, ...]
    tensors: Mapping[str, torch.Tensor]
    extra: dict[str, Any]


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / DEFAULT_NAME if path.is_dir() or path.suffix == "" else path


def save_adapters(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None,
                  controller: Any = None, name: str | None = None) -> Path:
    """Write the adapters (and ``trainable_modules`` parameters) of ``model`` to ``path``.

    Args:
        model: A model with adapters.
        path: A ``.safetensors`` file, or a folder (then ``<folder>/adapters.safetensors``).
        extra: JSON-serialisable notes stored with the checkpoint (e.g. the base model name).
        controller: An ``AromaController`` whose state is saved too, so a run resumes where it stopped
            (``read_controller_state(path)`` → ``controller.load_state_dict``).
        name: Which named adapter to write (``aurora_fx.named``); needed only when the model holds several.
            A ``"default"`` adapter's file is exactly a one-adapter file.

    Returns:
        The file written.

    Under DDP or FSDP2 call it on every rank: sharded tensors are gathered, rank 0 writes.

    Example:
        >>> aurora_fx.save_adapters(model, "runs/bbc")     # runs/bbc/adapters.safetensors
    """
    target = _resolve(path)
    name = resolve_name(model, name)
    meta = adapter_metadata(model, extra, name)
    if not meta["sites"]:
        raise ValueError("model has no aurora_fx adapters to save; call aurora_fx.apply(model, pattern) first")
    tensors = {}
    for _, gm, b in iter_bindings(model, name):
        for name, t in gm.get_submodule(b.attr).stored_tensors().items():
            tensors[f"adapters/{b.site}/{name}"] = t
    for module_path in meta["trainable_modules"]:
        for name, p in get_submodule(model, module_path).named_parameters():
            tensors[f"modules/{module_path}.{name}"] = p
    if controller is not None:
        meta["controller"], snaps = _controller_state(controller)
        tensors.update(snaps)
    data = safetensors_save({k: full(v).contiguous().cpu() for k, v in tensors.items()},
                            metadata={_META_KEY: json.dumps(meta)})
    if is_main():  # the whole adapter once, from rank 0 (every rank gathered its shards above)
        atomic_write_bytes(target, data)
    if world_size() > 1:
        torch.distributed.barrier()
    return target


def _controller_state(controller: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The controller's JSON state, and its snapshot tensors under ``controller/<site>/snap_A|snap_B``."""
    state = controller.state_dict()
    snaps = state.pop("snaps")
    tensors = {f"controller/{site}/snap_{name}": t for site, pair in snaps.items() if pair is not None
               for name, t in zip("AB", pair, strict=True)}
    return state, tensors


def read_controller_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``AromaController`` state saved with ``save_adapters(..., controller=)``, or None."""
    target = _resolve(path)
    with safe_open(str(target), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(_META_KEY, "{}"))
        state = meta.get("controller")
        if state is None:
            return None
        state["snaps"] = {site: None for site in state["tracks"]}
        for site in state["tracks"]:
            keys = [f"controller/{site}/snap_{n}" for n in "AB"]
            if all(k in fh.keys() for k in keys):  # noqa: SIM118
                state["snaps"][site] = tuple(fh.get_tensor(k) for k in keys)
    return state


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse and validate a checkpoint file (no model needed).

    Raises:
        CheckpointError: Missing, truncated or corrupted file, or metadata of another format.
    """
    target = _resolve(path)
    if not target.is_file():
        raise CheckpointError(f"no checkpoint at {str(target)!r}; save one with aurora_fx.save_adapters(model, path)")
    try:
        with safe_open(str(target), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise CheckpointError(
            f"{str(target)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may be truncated "
            f"or corrupted: save it again with aurora_fx.save_adapters"
        ) from None
    if _META_KEY not in metadata:
        raise CheckpointError(f"{str(target)!r} has no aurora_fx metadata; it is not an aurora_fx adapter checkpoint "
                              f"(for HF PEFT folders use aurora_fx.load_peft_lora)")
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(target)!r} has corrupted aurora_fx metadata: {exc}") from None
    return parse_metadata(target, meta, tensors)


def parse_metadata(target: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """A ``Checkpoint`` from an ``adapter_metadata`` record and its tensors (validated)."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(target)!r} has format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}; this aurora_fx reads {FORMAT!r} "
                              f"version {FORMAT_VERSION}")
    try:
        sites = tuple(SiteEntry(**{**s, "config": config_from_dict(s["config"]),
                                   "tensors": tuple(s.get("tensors", ())),
                                   "rows": tuple(s["rows"]) if s.get("rows") else None}) for s in meta["sites"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(target)!r} has an invalid site record: {exc}") from None
    return Checkpoint(path=target, model_class=str(meta.get("model_class", "")), sites=sites,
                      trainable_modules=tuple(meta.get("trainable_modules", ())), tensors=tensors,
                      extra=dict(meta.get("extra", {})))


def load_adapters(model: nn.Module, path: str | os.PathLike, *, fuse: bool = True,
                  check_base: bool = True, name: str | None = None) -> nn.Module:
    """Rebuild the checkpoint's adapters on ``model`` (a fresh base model; no prior ``apply``).

    With ``name`` (default: the name it was saved under, ``"default"`` for a one-adapter file) the adapters join
    the model under that name (``aurora_fx.named``). Loading into a name the model already holds (given explicitly
    as ``name=``; without it such a load is refused, as for every earlier release) replaces its weights in place
    (same sites, method and shapes; a LoRA of a smaller rank is zero-padded into the slot, its scale carried into
    B): no module is rebuilt, so a ``torch.compile``d model does not recompile.

    Steps: read → find the checkpoint's sites → check (sites free, shapes and base weights as
    saved) → attach (fill each adapter from the file) → load the ``trainable_modules`` weights.
    Everything is validated before the model changes.

    Args:
        model: The base model the adapters were trained on.
        path: The checkpoint file, or its folder.
        fuse: Use fused ops where the method has one.
        check_base: Refuse a base whose class or adapted weights differ from those the
            checkpoint was saved with (a norm and sampled values per site); False loads anyway.
        name: The adapter name to load under (default: the one the file was saved with).

    Raises:
        CheckpointError: The file is unreadable, or a site, tensor or base weight does not fit
            the model (the message names it).

    Example:
        >>> model = BertForSequenceClassification.from_pretrained(path, num_labels=5)
        >>> aurora_fx.load_adapters(model, "runs/bbc")
    """
    return load_checkpoint(model, read_checkpoint(path), fuse=fuse, check_base=check_base, name=name)


def load_checkpoint(model: nn.Module, ckpt: Checkpoint, *, fuse: bool = True, check_base: bool = True,
                    name: str | None = None) -> nn.Module:
    """``load_adapters`` on a parsed ``Checkpoint`` (also used by ``aurora_fx.from_pretrained``)."""
    explicit = name is not None
    name = check_name(name if explicit else _saved_name(ckpt))
    if name in adapter_names(model):
        if not explicit:
            _, gm, b = iter_bindings(model, name)[0]
            raise CheckpointError(f"the model already has an adapter ({gm.get_submodule(b.attr).method}); call "
                                  f"aurora_fx.unload(model) first, pass name={name!r} to replace its weights in "
                                  f"place, or another name to add it beside")
        return load_in_place(model, ckpt, name)
    requests = [replace(r, name=name) for r in _requests(model, ckpt)]
    require(requests, CheckpointError, f"checkpoint {str(ckpt.path)!r}:")
    if check_base:
        _check_base(model, ckpt, {r.site.path: r.site for r in requests})
    modules = {k[len("modules/"):]: v for k, v in ckpt.tensors.items() if k.startswith("modules/")}
    values = load_module_tensors(model, modules, "checkpoint tensor modules/")
    trainable = resolve_trainable(model, [f"^{re.escape(m)}$" for m in ckpt.trainable_modules] or None)
    attach(model, requests, lambda site, adapter: _fill_adapter(adapter, site, ckpt), trainable, fuse=fuse)
    copy_values(values)
    return model


def _saved_name(ckpt: Checkpoint) -> str:
    names = {e.name for e in ckpt.sites}
    return names.pop() if len(names) == 1 else DEFAULT


def load_in_place(model: nn.Module, ckpt: Checkpoint, name: str) -> nn.Module:
    """Write ``ckpt``'s weights into the model's adapters named ``name`` (validated first, then copied)."""
    bound = {b.site: gm.get_submodule(b.attr) for _, gm, b in iter_bindings(model, name)}
    saved = {e.path for e in ckpt.sites}
    if saved != set(bound):
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} adapts {len(saved)} site(s) and the adapter {name!r} "
                              f"{len(bound)}; a load into an existing name needs the same sites (differing: "
                              f"{sorted(saved ^ set(bound))[:4]}). Load it under a new name, or delete {name!r} first")
    copies = [pair for e in ckpt.sites for pair in _slot_values(bound[e.path], e, ckpt)]
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    return model


def _slot_values(adapter: nn.Module, entry: SiteEntry, ckpt: Checkpoint) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(slot tensor, value)`` pairs for one site: equal shapes, or a smaller LoRA padded (scale moved into B)."""
    prefix = f"adapters/{entry.path}/"
    given = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    slot = adapter.stored_tensors()
    why = f"the slot holds {adapter.method} rank {adapter.rank}, the checkpoint {entry.config.method} rank " \
          f"{entry.config.rank}"
    if entry.config == adapter.config and all(tuple(given[n].shape) == tuple(t.shape) for n, t in slot.items()
                                               if n in given) and set(given) == set(slot):
        return [(t, given[n].to(t.dtype)) for n, t in slot.items()]
    if entry.config.method == adapter.method == "lora" and entry.config.rank <= adapter.rank \
            and entry.config.dropout == adapter.config.dropout:
        r = entry.config.rank
        a = torch.zeros_like(slot["A"])
        a[:r] = given["A"]
        b = torch.zeros_like(slot["B"])
        b[:, :r] = given["B"] * (entry.config.scale / adapter.config.scale)
        return [(slot["A"], a), (slot["B"], b)]
    raise CheckpointError(f"site {entry.path!r}: cannot load into the existing slot in place ({why}); a slot takes "
                          f"the same method and config, or a LoRA of a rank up to its own. Load it under a new name")


def _check_base(model: nn.Module, ckpt: Checkpoint, sites: dict[str, Site]) -> None:
    """The model is of the saved class and every adapted weight matches its saved fingerprint."""
    override = "pass check_base=False to load anyway"
    name = model_class(model).__name__
    if ckpt.model_class and ckpt.model_class != name:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} was saved from a {ckpt.model_class}, but this model "
                              f"is a {name}; load it onto the base it was trained on, or {override}")
    for entry in ckpt.sites:
        site = sites.get(entry.path)
        if site is not None and site.quantization != entry.quantization:
            raise CheckpointError(f"site {entry.path!r}: the checkpoint was trained on a base quantized as "
                                  f"{entry.quantization or 'float (not quantized)'}, but this base is "
                                  f"{site.quantization or 'float (not quantized)'}; the base weights differ. Quantize "
                                  f"the base the same way (or load the same float model), or {override}")
        if not entry.base:
            continue
        owner = get_submodule(model, entry.owner)
        binding = Binding(entry.path, entry.param, entry.attr, entry.kind, entry.layout, entry.quantization,
                          entry.rows)
        weight = base_weight(owner, binding)
        now = fingerprint(weight)
        why = now and differs(Fingerprint.from_dict(entry.base), now, weight.numel())
        if why:
            raise CheckpointError(f"site {entry.path!r}: the base weight differs from the one the checkpoint was "
                                  f"trained on ({why}); this is another base model or other weights. Load it "
                                  f"onto the base it was trained on, or {override}")


def _requests(model: nn.Module, ckpt: Checkpoint) -> list[SiteRequest]:
    wanted = {e.path: e for e in ckpt.sites}
    table = find_sites(model, lambda p, m: p in wanted, slices=_slices(ckpt))
    found = {s.path: s for s in table.matched}
    requests = []
    for entry in ckpt.sites:
        site = found.get(entry.path)
        if site is None:
            some = ", ".join(s.path for s in list(table)[:12])
            raise CheckpointError(f"checkpoint site {entry.path!r} does not exist in this {type(model).__name__} "
                                  f"(saved from {ckpt.model_class}); its sites include: {some}")
        _check_shape(entry, site)
        requests.append(SiteRequest(site, entry.config))
    return requests


def _slices(ckpt: Checkpoint) -> dict[str, dict[str, tuple[int, int]]]:
    """The checkpoint's slice sites as ``find_sites``' ``slices`` (whole layer path → name → rows)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for e in ckpt.sites:
        if e.rows is not None:
            whole, _, name = e.path.partition("[")
            out.setdefault(whole, {})[name.rstrip("]")] = e.rows
    return out


def _check_shape(entry: SiteEntry, site: Site) -> None:
    if (entry.in_features, entry.out_features) != (site.in_features, site.out_features):
        raise CheckpointError(
            f"checkpoint site {entry.path!r} was saved for in_features={entry.in_features}, "
            f"out_features={entry.out_features}, but the model's site has in_features={site.in_features}, "
            f"out_features={site.out_features}; the checkpoint belongs to a different base model")


def _fill_adapter(adapter: nn.Module, site: str, ckpt: Checkpoint) -> None:
    prefix = f"adapters/{site}/"
    entry = next(e for e in ckpt.sites if e.path == site)
    given = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    adapter.load_state(entry.state, given)
    expected = adapter.stored_tensors()
    missing = sorted(set(expected) - set(given))
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor(s) {[prefix + m for m in missing]} for site {site!r}")
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensor(s) {[prefix + u for u in unexpected]} that a "
                              f"{entry.config.method} adapter does not have; its site record and its tensors "
                              f"disagree (the method in the record is wrong, or the file was edited)")
    with torch.no_grad():
        for name, target in expected.items():
            value = given[name]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"checkpoint tensor {prefix + name!r} has shape {tuple(value.shape)} but site {site!r} needs "
                    f"{tuple(target.shape)} ({entry.config.method} rank {entry.config.rank}, "
                    f"in_features={adapter.in_features}, out_features={adapter.out_features})")
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def load_module_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                        what: str = "tensor") -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Match ``name → tensor`` to ``model``'s parameters, checking names and shapes (no copy yet).

    Raises:
        CheckpointError: A name the model lacks, or a shape it does not have (named).
    """
    params = dict(model.named_parameters())
    out = []
    for name, value in tensors.items():
        param = params.get(name)
        if param is None:
            raise CheckpointError(f"{what}{name!r} has no parameter {name!r} in this {type(model).__name__}")
        if param.shape != value.shape:
            raise CheckpointError(f"{what}{name!r} has shape {tuple(value.shape)} but the model's {name!r} has "
                                  f"shape {tuple(param.shape)}; e.g. a head with another number of labels")
        out.append((param, value.to(dtype=param.dtype, device=param.device)))
    return out


@torch.no_grad()
def copy_values(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Write the values matched by ``load_module_tensors`` into their parameters."""
    for param, value in pairs:
        param.copy_(value)
