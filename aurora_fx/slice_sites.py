r"""Slice sites: a row block of a fused projection's output (``attn.qkv[q]``, ``c_attn[v]``) as a site of its own.

A fused q/k/v projection computes three linear maps in one weight; adapting "the query" means adding an update to
its rows only. A slice site ``<layer>[<name>]`` covers output rows ``[start, stop)`` of the layer: its adapter maps
``d_in → stop - start`` and the rewritten layer adds it to those rows (``owners.WrappedOwner``). Where the rows come
from:

* **the layer's known layout**: an ``nn.Linear`` or HF ``Conv1D`` named ``qkv`` (timm ViT), ``c_attn`` (GPT-2) or
  ``qkv_proj`` (Phi-3) whose output is three times its input holds ``q``, ``k`` and ``v`` as equal consecutive
  thirds (interleaved layouts such as Falcon's ``query_key_value`` are not guessed);
* **the user**: ``slices={"qkv": {"q": (0, 768), "v": (1536, 2304)}}`` (a layer name or path → name → rows) in
  ``sites`` / ``apply``, for any ``nn.Linear`` / ``Conv1D`` (grouped-query layouts, other names).

A pattern matches a slice when it matches the slice's path but not the whole layer's: ``"qkv"`` adapts the whole
layer, ``r"qkv\[[qv]\]"`` its q and v blocks.

Example:
    >>> [s.path for s in aurora_fx.sites(vit, r"blocks\.0\.attn\.qkv\[").matched]
    ['blocks.0.attn.qkv[q]', 'blocks.0.attn.qkv[k]', 'blocks.0.attn.qkv[v]']
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from aurora_fx.records import Site
from aurora_fx.tracing import hf_conv1d

__all__ = ["Slices", "KNOWN_FUSED", "layer_slices", "slice_sites", "is_fused_layer"]

Slices = dict[str, dict[str, tuple[int, int]]]
"""Layer name or path → slice name → output rows ``(start, stop)``."""

KNOWN_FUSED = ("qkv", "c_attn", "qkv_proj")


def layer_slices(site: Site, slices: Slices | None) -> dict[str, tuple[int, int]]:
    """The slices of a whole-layer site: the user's (by path, then by name), else its known layout, else none."""
    if site.kind not in ("linear", "conv1d") or site.param != "weight" or site.quantization is not None:
        return {}
    name = site.path.rpartition(".")[2]
    given = (slices or {}).get(site.path, (slices or {}).get(name))
    if given is not None:
        return dict(given)
    if name in KNOWN_FUSED and site.out_features == 3 * site.in_features:
        third = site.in_features
        return {"q": (0, third), "k": (third, 2 * third), "v": (2 * third, 3 * third)}
    return {}


def slice_sites(site: Site, slices: Slices | None, adapted: dict[str, str]) -> list[Site]:
    """The slice sites of ``site`` (``adapted``: slice path → method already there)."""
    out = []
    for name, (start, stop) in layer_slices(site, slices).items():
        path = f"{site.path}[{name}]"
        bad = None if 0 <= start < stop <= site.out_features else (
            f"slice {name!r} rows ({start}, {stop}) are outside the layer's {site.out_features} outputs")
        out.append(replace(site, path=path, out_features=stop - start, rows=(start, stop), adapted=adapted.get(path),
                           unsupported=bad or site.unsupported, matched=False, reason=None))
    return out


def is_fused_layer(module: nn.Module) -> bool:
    """Whether ``module`` can carry slice adapters (an ``nn.Linear`` or HF ``Conv1D``)."""
    conv1d = hf_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
