"""Read-only views of an adapted model: its adapters and its trainable parameters."""

from __future__ import annotations

from torch import nn

from aurora_fx.named import active_names, inactive_parameters, resolve_name
from aurora_fx.owners import iter_bindings
from aurora_fx.passes.fuse import is_fused
from aurora_fx.records import AdapterInfo

__all__ = ["adapters", "trainable_parameters", "adapter_modules"]


def adapter_modules(model: nn.Module, method: str | None = None, name: str | None = None
                    ) -> list[tuple[str, str, nn.Module]]:
    """``(site path, kind, adapter module)`` for every adapter in ``model``.

    Only those of ``method`` and named ``name``, where given.
    """
    out = []
    for _, gm, binding in iter_bindings(model, name):
        adapter = gm.get_submodule(binding.attr)
        if method is None or adapter.method == method:
            out.append((binding.site, binding.kind, adapter))
    return out


def adapters(model: nn.Module) -> list[AdapterInfo]:
    """One ``AdapterInfo`` per adapted site.

    Example:
        >>> [(a.path, a.method, a.rank, a.num_params) for a in aurora_fx.adapters(model)][:1]
        [('encoder.layer.0.attention.self.query', 'aurora', 2, 1556)]
    """
    infos = []
    active = set(active_names(model))
    for _, gm, b in iter_bindings(model):
        adapter = gm.get_submodule(b.attr)
        infos.append(AdapterInfo(
            path=b.site, method=adapter.method, rank=adapter.rank,
            num_params=sum(t.numel() for t in adapter.stored_tensors().values()),
            trainable_params=sum(p.numel() for p in adapter.parameters() if p.requires_grad),
            in_features=adapter.in_features, out_features=adapter.out_features, kind=b.kind,
            fused=is_fused(gm, b.attr), config=adapter.config.to_dict(), details=adapter.describe(),
            name=b.name, active=b.name in active,
        ))
    return infos


def trainable_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Parameters that require grad: the active adapters' (``set_adapters``), plus any ``trainable_modules``.

    With ``name``: the parameters of that named adapter that train (``aurora_fx.named``), whether active or not.

    Example:
        >>> optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=2e-3)
    """
    if name is not None:
        resolve_name(model, name)
        return [adapter.get_parameter(p) for _, gm, b in iter_bindings(model, name)
                for _, adapter in gm.get_submodule(b.attr).units() if adapter.trains for p in adapter.adapter_params()]
    inactive = inactive_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in inactive]
    if any(p.is_meta for p in params):
        raise ValueError("the model's trainable parameters are on the meta device (they hold no data), so they "
                         "cannot be trained; load real weights first (model.to_empty(device='cpu') then "
                         "load_state_dict, or from_pretrained without device='meta'), then call apply")
    return params
