r"""``nn.MultiheadAttention`` sites: its q/k/v projections and ``out_proj``, adapted where they really compute.

``nn.MultiheadAttention`` never calls its ``out_proj`` module and keeps q, k and v in one ``in_proj_weight``
``(3E, E)``: both reach ``F.multi_head_attention_forward`` as plain tensors. An adapted MHA runs its own forward
inside ``RowRouting``, a torch-function mode that takes over that one call: it projects q, k and v itself (each row
block of the packed weight, plus that block's adapter), hands them on with identity projections, and applies
``out_proj`` plus its adapter to the attention output (exact; it costs four extra E×E matmuls per call). Sites:
``<mha>.in_proj_weight[q]``, ``[k]``, ``[v]`` (slice sites of the packed weight) and
``<mha>.out_proj``, all owned by the MHA. Running under a torch-function mode also keeps the fused fast path
(``torch._native_multi_head_attention``, which would bypass the adapters) off, exactly while adapters are present.
Separate q/k/v weights (``kdim != embed_dim``) are refused with the reason.

Example:
    >>> [s.path for s in aurora_fx.sites(encoder, r"self_attn\.(in_proj_weight\[[qv]\]|out_proj)").matched][:3]
    ['layers.0.self_attn.in_proj_weight[q]', 'layers.0.self_attn.in_proj_weight[v]', 'layers.0.self_attn.out_proj']
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from aurora_fx.records import Site
from aurora_fx.tracing import join_path

__all__ = ["mha_sites", "RowRouting"]


def mha_sites(path: str, mha: nn.MultiheadAttention, adapted: dict[str, str], owner_type: str) -> list[Site]:
    """The sites of an ``nn.MultiheadAttention`` at ``path`` (``adapted``: site path → method already there)."""
    e = mha.embed_dim
    packed = mha.in_proj_weight
    bad = None if mha._qkv_same_embed_dim else (
        "nn.MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v weights; only the packed "
        "in_proj_weight is supported")
    common = {"owner": path, "kind": "functional", "op": "linear", "layout": "out_in", "in_features": e,
              "owner_type": owner_type, "dtype": str(mha.out_proj.weight.dtype)}
    sites = [Site(path=join_path(path, "out_proj"), param="out_proj.weight", out_features=e,
                  adapted=adapted.get(join_path(path, "out_proj")), **common)]
    for i, name in enumerate("qkv"):
        site_path = join_path(path, f"in_proj_weight[{name}]")
        sites.insert(i, Site(path=site_path, param="in_proj_weight", out_features=e, rows=(i * e, (i + 1) * e),
                             adapted=adapted.get(site_path), unsupported=bad,
                             is_parameter=isinstance(packed, nn.Parameter), **common))
    return sites


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class RowRouting(TorchFunctionMode):
    """Adds the MHA's adapters inside ``F.multi_head_attention_forward`` (module docstring).

    The call is rewritten, exactly: q, k and v are projected here with the packed weight's row blocks (plus each
    block's adapter), then passed on with identity projection weights; the attention output gets ``out_proj`` (plus
    its adapter) here, after an identity output projection inside. Masks, dropout, ``bias_k``/``bias_v``,
    ``add_zero_attn`` and the returned attention weights are the function's own.

    Args:
        targets: ``(weight, rows or None, adapter)``: ``in_proj_weight`` with a q/k/v row block, or
            ``out_proj.weight`` with None.
    """

    def __init__(self, targets: list[tuple[Tensor, tuple[int, int] | None, nn.Module]]) -> None:
        super().__init__()
        self.targets = targets

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self._attention(func, _MHA_SIGNATURE.bind(*args, **kwargs).arguments)
        return func(*args, **kwargs)

    def _adapters(self, weight: Tensor) -> dict[tuple[int, int] | None, nn.Module]:
        return {rows: adapter for w, rows, adapter in self.targets if w is weight}

    def _attention(self, func, a: dict):
        weight, bias, e = a["in_proj_weight"], a.get("in_proj_bias"), a["embed_dim_to_check"]
        adapters = self._adapters(weight)
        projected = []
        for i, x in enumerate((a["query"], a["key"], a["value"])):
            rows = (i * e, (i + 1) * e)
            y = F.linear(x, weight[rows[0]:rows[1]], None if bias is None else bias[rows[0]:rows[1]])
            projected.append(y + adapters[rows](x).to(y.dtype) if rows in adapters else y)
        eye = torch.eye(e, dtype=weight.dtype, device=weight.device)
        out_weight, out_bias = a["out_proj_weight"], a.get("out_proj_bias")
        inner = {**a, "query": projected[0], "key": projected[1], "value": projected[2], "in_proj_weight": None,
                 "in_proj_bias": None, "out_proj_weight": eye, "out_proj_bias": None,
                 "use_separate_proj_weight": True, "q_proj_weight": eye, "k_proj_weight": eye, "v_proj_weight": eye}
        attn, weights = func(**inner)
        out = F.linear(attn, out_weight, out_bias)
        out_adapter = self._adapters(out_weight).get(None)
        return (out + out_adapter(attn).to(out.dtype) if out_adapter is not None else out), weights
