"""Read-only views of an adapted model: its adapters and its trainable parameters."""

from __future__ import annotations

from torch import nn

from aurora_fx.modules import AromaAdapter
from aurora_fx.owners import iter_owners
from aurora_fx.passes.match import ADAPTER_TAG
from aurora_fx.records import AdapterInfo
from aurora_fx.tracing import owner_state

__all__ = ["adapters", "trainable_parameters", "adapter_modules"]


def adapter_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(site path, kind, adapter module)`` for every adapter in ``model``, in module order."""
    out = []
    for _, gm in iter_owners(model):
        for binding in owner_state(gm).bindings:
            out.append((binding.site, binding.kind, gm.get_submodule(binding.attr)))
    return out


def _rank(adapter: nn.Module) -> int:
    if isinstance(adapter, AromaAdapter):
        return adapter.merged_rank + (0 if adapter.frozen else adapter.config.rank)
    return adapter.config.rank


def _is_fused(model: nn.Module, site: str) -> bool:
    for _, gm in iter_owners(model):
        for b in owner_state(gm).bindings:
            if b.site == site:
                return any(n.meta.get(ADAPTER_TAG) == b.attr and n.meta.get("aurora_fx_role") == "fused"
                           for n in gm.graph.nodes)
    return False


def adapters(model: nn.Module) -> list[AdapterInfo]:
    """One ``AdapterInfo`` per adapted site.

    Example:
        >>> [(a.path, a.method, a.rank, a.num_params) for a in aurora_fx.adapters(model)][:1]
        [('encoder.layer.0.attention.self.query', 'aurora', 2, 1556)]
    """
    infos = []
    for site, kind, adapter in adapter_modules(model):
        tensors = list(adapter.parameters()) + [b for n, b in adapter.named_buffers() if n in ("U", "V")]
        infos.append(AdapterInfo(
            path=site, method=adapter.config.method, rank=_rank(adapter),
            num_params=sum(t.numel() for t in tensors),
            trainable_params=sum(p.numel() for p in adapter.parameters() if p.requires_grad),
            in_features=adapter.in_features, out_features=adapter.out_features, kind=kind,
            fused=_is_fused(model, site), config=adapter.config.to_dict(),
        ))
    return infos


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad: the adapters, plus any ``trainable_modules``.

    Example:
        >>> optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=2e-3)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.is_meta for p in params):
        raise ValueError("the model's trainable parameters are on the meta device (they hold no data), so they "
                         "cannot be trained; load real weights first (model.to_empty(device='cpu') then "
                         "load_state_dict, or from_pretrained without device='meta'), then call apply")
    return params
