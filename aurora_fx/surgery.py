"""The surgery verbs: ``apply``, ``unload``, ``merge`` and ``disable_adapters``.

``apply`` reads as its steps: config → find sites → check (select the requests) → attach.
Nothing in the user's model changes until every owner has been planned (``aurora_fx.attach``),
so a failure leaves the model exactly as it was; the commit only swaps modules.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from aurora_fx.adapter_set import AdapterSet
from aurora_fx.attach import attach, rebuild_owner, resolve_trainable
from aurora_fx.config import AdapterConfig
from aurora_fx.fastpaths import guard_fast_paths, release_fast_paths
from aurora_fx.model_state import clear_model_state, update_model_state
from aurora_fx.named import DEFAULT, active_names, adapter_names, check_name, resolve_name, sync_sets
from aurora_fx.owners import (
    OwnerState,
    WrappedOwner,
    base_weight,
    iter_bindings,
    iter_owners,
    owner_state,
    restore_original,
    set_owner_state,
    swap_module,
)
from aurora_fx.passes.check import select_requests
from aurora_fx.passes.match import find_sites
from aurora_fx.passes.pattern import Pattern, compile_pattern
from aurora_fx.peft_config import as_aurora_config, is_peft_lora_config, peft_selection, refuse_peft_model
from aurora_fx.quantized import dequantized_weight, float_linear
from aurora_fx.registry import make_config
from aurora_fx.slice_sites import Slices

__all__ = ["apply", "unload", "merge", "disable_adapters", "delete_adapter"]

logger = logging.getLogger("aurora_fx")


def apply(
    model: nn.Module,
    pattern: Pattern = None,
    method: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    *,
    config: AdapterConfig | object | None = None,
    trainable_modules: Pattern = None,
    fuse: bool = True,
    dtype: torch.dtype | None = None,
    slices: Slices | None = None,
    name: str = DEFAULT,
) -> nn.Module:
    """Put adapters on every linear-like site whose path matches ``pattern``.

    Each matched site's owner (the ``nn.Linear``/``Conv1D``, or the module whose own forward calls
    ``F.linear``/``@`` on its parameter) becomes a GraphModule computing ``base(x) + adapter(x)``;
    the model keeps its class and methods. Base parameters freeze; adapters and
    ``trainable_modules`` train.

    Args:
        model: Any ``nn.Module``; modified in place and returned.
        pattern: Regex **searched** (``re.search``) in site paths, a list of regexes, or a
            callable ``(path, owner_module) -> bool``. Dry-run with ``aurora_fx.sites``. May be
            left out with a ``peft.LoraConfig``: its ``target_modules`` become the pattern.
        method: A registered method: ``"aurora"`` (the default without ``config``), ``"lora"``, ``"aroma"``, ...;
            one that contradicts ``config`` is refused.
        rank: r̃ / r. Default: 2 (AuroRA), 8 (LoRA), 1 (AROMA).
        alpha: α; scale α/rank. Default: 4 (AuroRA), 16 (LoRA), 4 (AROMA).
        dropout: Adapter-input dropout. Default: 0.0 (AuroRA, LoRA), 0.1 (AROMA).
        config: A ready ``AuroraConfig``/``LoraConfig``/``AromaConfig`` (or any registered
            config) instead of the above, or a ``peft.LoraConfig`` (converted: r, lora_alpha,
            lora_dropout, use_rslora; target_modules as the pattern).
        trainable_modules: Pattern over module paths whose parameters also train (e.g. a new
            classification head: ``"classifier"``).
        fuse: Replace each fusable adapter subgraph by its fused op (AuroRA's ``aurora_delta_add``).
        dtype: Adapter dtype; default float32 on a bf16/fp16 base (PEFT's ``autocast_adapter_dtype``),
            else the base's. Adapters compute in it and add into the base output in the base's.
        slices: Output-row blocks of fused projections as sites (``{"qkv": {"q": (0, 768)}}``); the known layouts
            (``qkv``, ``c_attn``, ``qkv_proj``: q/k/v thirds) need none. See ``aurora_fx.slice_sites``.
        name: The adapters' name (an identifier). A second name adds a second adapter beside the first (on the
            same or other sites, of any method; ``aurora_fx.named``): the new name becomes the active one and the
            one that trains (``set_adapters`` chooses others; ``adapter_rows`` mixes them per batch row).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: Nothing matched (the message lists candidates), or a matched site cannot take it.

    Example:
        >>> model = aurora_fx.apply(bert, pattern="query|value")   # AuroRA r̃=2, α=4
        >>> print(model.encoder.layer[0].attention.self.query.code)  # doctest: +SKIP
            linear = torch._C._nn.linear(input, weight, bias)
            aurora_delta_add = torch.ops.aurora_fx.aurora_delta_add.default(linear, input, adapter_a, ...)
            return aurora_delta_add[0]
    """
    refuse_peft_model(model)
    pattern, trainable_modules = _selection(model, config, pattern, trainable_modules)
    config = make_config(method, rank, alpha, dropout, as_aurora_config(config))
    matcher = compile_pattern(pattern)
    table = find_sites(model, matcher, slices=slices)
    requests = select_requests(model, table, matcher, config, check_name(name))
    trainable = resolve_trainable(model, trainable_modules)
    return attach(model, requests, trainable=trainable, fuse=fuse, dtype=dtype)


def _selection(model: nn.Module, config: object, pattern: Pattern, trainable_modules: Pattern
               ) -> tuple[Pattern, Pattern]:
    """The pattern and trainable modules: given ones, or a ``peft.LoraConfig``'s (``aurora_fx.peft_config``)."""
    if is_peft_lora_config(config):
        chosen = peft_selection(config, model, pattern)
        return chosen.pattern, trainable_modules if trainable_modules is not None else chosen.trainable_modules
    if pattern is None:
        raise ValueError("apply needs a pattern: a regex searched in site paths, e.g. pattern='query|value'; "
                         "aurora_fx.sites(model) lists every site")
    return pattern, trainable_modules


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter: the exact original modules come back (adapter weights are dropped).

    Parameters regain the ``requires_grad`` flags they had before the first ``apply``.
    """
    for path, gm in iter_owners(model):
        swap_module(model, path, restore_original(gm))
    release_fast_paths(model, _holds_adapter)
    state = clear_model_state(model)
    if state is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    return model


def _holds_adapter(module: nn.Module) -> bool:
    return any(owner_state(m) is not None for m in module.modules())


@torch.no_grad()
def merge(model: nn.Module, lossy: bool = False, *, dequantize: bool = False, name: str | None = None) -> nn.Module:
    """Fold every adapter into its base weight, then ``unload``.

    With several named adapters, ``name`` chooses the one folded into the base weights; it is then deleted and
    the others stay (on the changed base). A model with one name needs none.

    Exact for LoRA and AROMA (``W ← W + ΔW``, computed in float32 or wider). AuroRA is
    nonlinear in x and refuses unless ``lossy=True``, which applies the paper's static merge
    ``W ← W + s·B·σ(Aᵀ)ᵀ`` (drops ``B·σ(0)``; outputs change). All adapters are checked before
    any weight changes.

    A quantized base (``Site.quantization``) cannot take ``W + ΔW`` in its own storage without a new
    quantization error; it is refused unless ``dequantize=True``, which replaces each adapted quantized layer
    by a float ``nn.Linear`` holding ``dequant(W) + ΔW`` (exactly the adapted layer's function, in float32), and
    logs the largest change of a merged weight relative to the dequantized base.

    Example:
        >>> aurora_fx.merge(qlora_model, dequantize=True)   # 4-bit base + LoRA → float32 linears
    """
    name = resolve_name(model, name)
    several = len(adapter_names(model)) > 1
    _refuse_quantized(model, dequantize, several)
    updates = []
    for owner, gm, binding in iter_bindings(model, name):
        delta = gm.get_submodule(binding.attr).delta_weight(lossy=lossy)  # raises for AuroRA
        updates.append((owner, gm, binding, delta))
    for owner, gm, binding, delta in updates:
        if binding.quantization is not None:
            _replace_with_float(model, owner, gm, delta)
            continue
        weight = base_weight(gm, binding)  # (a view: a slice site's rows of it)
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
    return delete_adapter(model, name) if several else unload(model)


def _refuse_quantized(model: nn.Module, dequantize: bool, several: bool = False) -> None:
    quantized = [b.site for _, _, b in iter_bindings(model) if b.quantization is not None]
    if quantized and several:
        raise ValueError(f"merging one of several named adapters into a quantized base ({quantized[0]}) would "
                         f"replace the layer the others sit on; delete the other names first "
                         f"(aurora_fx.delete_adapter), or keep the adapters unmerged")
    if quantized and not dequantize:
        raise ValueError(f"{len(quantized)} adapted site(s) have a quantized base (e.g. {quantized[0]}); W + ΔW cannot "
                         f"be stored back quantized without a new rounding error. Pass dequantize=True to get float "
                         f"nn.Linear layers holding dequant(W) + ΔW (the adapted function, to float32 rounding), or "
                         f"keep the adapters unmerged (aurora_fx.save_adapters / export.to_peft)")


def _replace_with_float(model: nn.Module, owner: str, gm: nn.Module, delta: torch.Tensor) -> None:
    """Swap the quantized layer for an ``nn.Linear`` with ``dequant(W) + ΔW`` (float32), logging the change."""
    merged = float_linear(gm, delta)
    exact = dequantized_weight(gm).double() + delta.double()
    error = (merged.weight.double() - exact).abs().max().item()
    logger.warning("merged the quantized %s into a float32 nn.Linear: dequant(W) + ΔW stored with a largest error of "
                   "%.3g (float32 rounding); the layer is no longer quantized", owner, error)
    swap_module(model, owner, merged)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model for the duration of the block (the original modules are swapped in).

    Example:
        >>> with aurora_fx.disable_adapters(model):
        ...     base_logits = model(**batch).logits
    """
    owners = iter_owners(model)
    for path, gm in owners:
        swap_module(model, path, restore_original(gm))
    release_fast_paths(model, _holds_adapter)
    try:
        yield model
    finally:
        for path, gm in owners:
            swap_module(model, path, gm)
        guard_fast_paths(model, [p for p, _ in owners])


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from every site; owners left without adapters get their original back.

    The other names stay, each in its ``AdapterSet``; the active names lose ``name`` (the first remaining name
    becomes active if none is left). Deleting the last name is ``unload``.

    Raises:
        ValueError: No adapter of that name (the message lists the model's names).
    """
    resolve_name(model, name)
    names = tuple(n for n in adapter_names(model) if n != name)
    if not names:
        return unload(model)
    for path, owner in iter_owners(model):
        state = owner_state(owner)
        kept = tuple(b for b in state.bindings if b.name != name)
        if not kept:
            swap_module(model, path, restore_original(owner))
        elif len(kept) < len(state.bindings):
            _drop_from_sets(model, path, owner, kept, name)
    active = tuple(n for n in active_names(model) if n != name) or names[:1]
    update_model_state(model, names=names, active=active)
    sync_sets(model)
    return model


def _drop_from_sets(model: nn.Module, path: str, owner: nn.Module, kept: tuple, name: str) -> None:
    """The owner's sets without ``name`` (a slot left empty is removed; a graph owner's code is regenerated)."""
    state = owner_state(owner)
    live = {b.slot for b in kept}
    for slot in {b.slot for b in state.bindings if b.name == name}:
        old = owner._modules[slot]
        if slot in live:
            owner._modules[slot] = AdapterSet({n: a for n, a in old.named_children() if n != name}, old.names)
        else:
            del owner._modules[slot]
    set_owner_state(owner, OwnerState(original=state.original, bindings=kept))
    if not isinstance(owner, WrappedOwner):
        rebuild_owner(model, path)
