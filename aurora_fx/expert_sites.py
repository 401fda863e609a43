"""Expert sites: the 3-D parameters of a mixture-of-experts module, one linear map per expert.

transformers 5 stores a MoE layer's experts as 3-D parameters of one module (``@use_experts_implementation``,
``transformers/integrations/moe.py``): ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, or
``(E, in, out)`` when the class declares ``is_transposed`` (gpt-oss), plus 2-D per-expert biases. The forward
is data-dependent (a loop over the experts hit, a gather, or grouped matmuls), so torch.fx cannot trace it;
such a module is recognised by what it declares instead of by tracing:

* an integer ``num_experts`` attribute, and
* floating 3-D parameters whose first dimension is ``num_experts``; each one is a site of kind ``expert``
  (``mlp.experts.gate_up_proj``), stored ``(E, d_out, d_in)`` unless ``is_transposed`` is true.

Nothing here depends on a model's name: any module with that contract (an HF experts class or a user's
own) qualifies. The adapters reach the executed computation through ``aurora_fx.expert_routing``.

Example:
    >>> [s.path for s in aurora_fx.sites(qwen3_moe, "experts").matched]
    ['model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.experts.down_proj']
"""

from __future__ import annotations

from torch import nn

from aurora_fx.owners import owner_state
from aurora_fx.records import Site
from aurora_fx.tracing import join_path, param_dtype_ok

__all__ = ["expert_count", "expert_params", "expert_sites"]


def expert_count(module: nn.Module) -> int | None:
    """``num_experts`` when ``module`` holds expert parameters (see the module docstring), else None."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return None
    return count if expert_params(module, count) else None


def expert_params(module: nn.Module, count: int) -> list[str]:
    """Names of ``module``'s own floating 3-D parameters with ``count`` experts on dimension 0."""
    return [name for name, p in module._parameters.items()
            if p is not None and p.dim() == 3 and p.shape[0] == count and param_dtype_ok(p)]


def expert_sites(path: str, module: nn.Module, adapted: dict[str, str]) -> list[Site]:
    """The expert sites of one experts module at ``path`` (``adapted``: parameter → method already there)."""
    count = expert_count(module)
    if count is None:
        return []
    transposed = bool(getattr(module, "is_transposed", False))
    sites = []
    for name in expert_params(module, count):
        param = module._parameters[name]
        _, d0, d1 = param.shape
        d_out, d_in = (d1, d0) if transposed else (d0, d1)
        sites.append(Site(
            path=join_path(path, name), owner=path, param=name, kind="expert", op="experts",
            layout="in_out" if transposed else "out_in", in_features=d_in, out_features=d_out,
            dtype=str(param.dtype), adapted=adapted.get(name), owner_type=_original_type(module),
            is_parameter=isinstance(param, nn.Parameter), floating=True, ndim=3, experts=count,
        ))
    return sites


def _original_type(module: nn.Module) -> str:
    state = owner_state(module)
    return type(state.original if state is not None else module).__name__
