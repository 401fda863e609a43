"""Many adapters on one base: names, the active set, per-row routing and deletion.

``apply(model, pattern, ..., name="support")`` adds adapters under a name (``"default"`` without one; sites and
methods may differ between names). A model with one name works exactly as before; with several, each adapted slot
holds an ``AdapterSet`` (``aurora_fx.adapter_set``) and:

* ``set_adapters(model, ["a", "b"])`` chooses the active names: their outputs add up (as in PEFT), and
  ``trainable_parameters(model)`` lists their parameters (``requires_grad`` stays as it is: toggling it would make
  a compiled model recompile). Switching writes buffers in place, so a compiled model does not recompile.
* ``with adapter_rows(model, ids): model(...)`` runs row ``i`` of the batch with adapter ``ids[i]`` (a name, or
  None for the base alone), for forward, backward and ``generate`` alike; the rows override the active set.
  One gathered op per site over stacked factors (LoRA, AuroRA and AROMA alike): a row's loss reaches only its
  own adapter's parameters.
* ``delete_adapter(model, "a")`` (``aurora_fx.surgery``) removes a name; ``unload`` removes them all.

Example:
    >>> aurora_fx.apply(model, "q_proj|v_proj", method="lora", name="support")
    >>> aurora_fx.apply(model, "q_proj|v_proj", name="legal")               # AuroRA on the same sites
    >>> aurora_fx.set_adapters(model, ["legal"])
    >>> with aurora_fx.adapter_rows(model, ["support", "legal", None]):
    ...     logits = model(**batch).logits                                   # three rows, three functions
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from aurora_fx.adapter_set import AdapterSet
from aurora_fx.model_state import model_state, update_model_state
from aurora_fx.owners import iter_bindings, iter_owners

__all__ = ["adapter_names", "set_adapters", "set_trainable", "adapter_rows", "resolve_name", "check_name",
           "row_index", "sync_sets", "active_names", "inactive_parameters", "DEFAULT"]

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED = frozenset(dir(AdapterSet)) | {"gate", "lookup", "rows", "active", "in_features", "out_features"}


def check_name(name: object) -> str:
    """``name`` if it can name an adapter (an identifier, not an ``AdapterSet`` attribute), else a ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        reserved = sorted(n for n in _RESERVED if not n.startswith("_"))[:6]
        raise ValueError(f"adapter name {name!r} is not usable: give a Python identifier (letters, digits, '_', "
                         f"e.g. 'support_v2') that is not one of {reserved}...")
    return name


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The model's adapter names, in the order they were added (``()`` for a model without adapters)."""
    state = model_state(model)
    if state is not None and state.names:
        return state.names
    return tuple(dict.fromkeys(b.name for _, _, b in iter_bindings(model)))


def active_names(model: nn.Module) -> tuple[str, ...]:
    """The active names (``set_adapters``); every name of a model with one."""
    state = model_state(model)
    names = adapter_names(model)
    return state.active if state is not None and state.active and len(names) > 1 else names


def resolve_name(model: nn.Module, name: str | None) -> str | None:
    """The name a per-name call (save, merge, to_peft) acts on: ``name``, or the model's only one.

    Raises:
        ValueError: ``name`` is not one of the model's names, or None while the model has several.
    """
    names = adapter_names(model)
    if name is None:
        if len(names) > 1:
            raise ValueError(f"the model holds {len(names)} named adapters {list(names)}; pass name=... to choose one")
        return names[0] if names else None
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; the model holds {list(names) or 'none'} "
                         f"(aurora_fx.adapter_names(model))")
    return name


def sync_sets(model: nn.Module) -> None:
    """Give every ``AdapterSet`` the model's names (for ``adapter_rows``) and active set."""
    names, active = adapter_names(model), active_names(model)
    for _, owner in iter_owners(model):
        for module in owner._modules.values():
            if isinstance(module, AdapterSet):
                module.set_names(names)
                module.set_active(active)


def set_adapters(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters: their outputs add up, and ``trainable_parameters(model)`` lists theirs.

    No module is rebuilt and no ``requires_grad`` changes (the sets' ``gate`` buffers change in place), so
    ``torch.compile``d models do not recompile. An inactive adapter gets no gradient eagerly (it does not run);
    compiled, it runs gated by 0 and gets zeros, so build optimizers from ``trainable_parameters``.

    Example:
        >>> aurora_fx.set_adapters(model, ["support", "legal"])   # both, summed
        >>> aurora_fx.set_adapters(model, "support")

    Raises:
        ValueError: An unknown name (the message lists the model's names).
    """
    chosen = (names,) if isinstance(names, str) else tuple(names)
    known = adapter_names(model)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; the model holds {list(known)}")
    update_model_state(model, names=known, active=tuple(n for n in known if n in chosen))
    sync_sets(model)
    return model


def set_trainable(model: nn.Module) -> None:
    """Adapter parameters require grad when their adapter trains (whatever its name's state)."""
    for _, gm, b in iter_bindings(model):
        for _, adapter in gm.get_submodule(b.attr).units():
            for pname in adapter.adapter_params():
                adapter.get_parameter(pname).requires_grad_(adapter.trains)


def inactive_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters of adapters whose name is not active (``trainable_parameters`` leaves them out)."""
    active = set(active_names(model))
    return {id(p) for _, gm, b in iter_bindings(model) if b.name not in active
            for p in gm.get_submodule(b.attr).parameters()}


def row_index(model: nn.Module, ids: Sequence[str | None] | Tensor) -> Tensor:
    """``ids`` (names, None for no adapter, or a tensor of indices into ``adapter_names``) as an int64 tensor."""
    names = adapter_names(model)
    if isinstance(ids, Tensor):
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
            raise ValueError(f"adapter row ids must be a 1-D integer tensor (indices into {list(names)}, -1 for "
                             f"none), got {ids.dtype} of shape {tuple(ids.shape)}")
        return ids.to(torch.int64)
    unknown = sorted({i for i in ids if i is not None and i not in names})
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown} in adapter_rows; the model holds {list(names)}")
    return torch.tensor([-1 if i is None else names.index(i) for i in ids], dtype=torch.int64)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, ids: Sequence[str | None] | Tensor) -> Iterator[nn.Module]:
    """Run row ``i`` of every batch with adapter ``ids[i]`` inside the block (forward, backward, ``generate``).

    Args:
        model: A model with several named adapters.
        ids: One entry per batch row: a name, or None for the base alone; or an int64 tensor of indices into
            ``adapter_names(model)`` (-1 for none), which is what an exported graph takes as its input.

    Example:
        >>> with aurora_fx.adapter_rows(model, ["support", "legal"]):
        ...     out = model.generate(**tok(["hi", "hello"], return_tensors="pt", padding=True))
    """
    rows = row_index(model, ids)
    sets = [m for _, owner in iter_owners(model) for m in owner._modules.values() if isinstance(m, AdapterSet)]
    if not sets:
        raise ValueError("adapter_rows needs a model with named adapters on its sites (apply(..., name=...)); "
                         "this model has none, or a single unnamed adapter")
    previous = [s.rows for s in sets]
    for s in sets:
        s.rows = rows
    try:
        yield model
    finally:
        for s, old in zip(sets, previous, strict=True):
            s.rows = old
