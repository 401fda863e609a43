"""One adapter per expert: the adapter family an ``expert`` site holds.

An expert site (``mlp.experts.gate_up_proj``, a ``(E, ·, ·)`` parameter) gets an ``ExpertAdapters``: E ordinary
adapters of the site's method (LoRA, AuroRA, AROMA, ...), ``experts.0`` … ``experts.{E-1}``, each a
``(d_in → d_out)`` adapter exactly like a linear site's. Everything works in activation space: the tokens
routed to expert e get ``Δ_e(x_e)`` from expert e's adapter, and no ``E × d_in × d_out`` tensor is formed
(only ``merge``, a weight-space operation, builds the per-expert updates).

The family answers the adapter contract (``methods/base.py``) by delegation: stored tensors are the
experts' under ``"<e>.<name>"``, the JSON state is a list per expert, ``units()`` lists the experts (what
the AROMA controller, ``to_peft`` and the parameter freezing walk), ``delta_weight`` stacks the experts'
updates. ``aurora_fx.expert_routing`` calls the three ways an experts forward computes:

* ``add_expert(out, e, x)``: one expert's tokens (the ``eager`` loop, ``F.linear(x, W[e])``);
* ``add_rows(out, x, ids)``: rows each with its own expert (``batched_mm``'s gathered weights);
* ``add_grouped(out, x, offs)``: rows sorted by expert with cumulative offsets (``grouped_mm``).

Each adds into the base output in place (one expert's rows at a time, so the extra memory is one expert's
``(n_e, d_out)``). ``add_rows`` runs each expert's adapter on its rows (one host synchronisation for the
counts, like transformers' own grouped fallback); ``add_grouped`` uses the method's ``grouped_delta`` (LoRA and
AuroRA: grouped matmuls over all experts at once, one ``(S, d_out)`` delta) and loops like ``add_rows``
otherwise (AROMA, whose experts differ in rank; float64). Under ``torch.compile``
and ``torch.export`` the counts are data-dependent, so there they run every expert's adapter on every
row and keep each row's own (a static loop: E× the adapter work, no graph break; exact, the other
experts' outputs are masked out).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from aurora_fx.config import AdapterConfig
from aurora_fx.methods.base import AdapterBase

__all__ = ["ExpertAdapters"]


class ExpertAdapters(AdapterBase):
    """E adapters of one method on the E linear maps of an expert parameter.

    Args:
        adapters: One freshly built adapter per expert (all of ``config``'s method and shape).
        config: The method's config (shared by every expert).

    Example:
        >>> family = model.model.layers[0].mlp.experts.adapter_gate_up_proj
        >>> family.num_experts, type(family.experts[0]).__name__
        (8, 'LoraAdapter')
    """

    def __init__(self, adapters: list[AdapterBase], config: AdapterConfig) -> None:
        first = adapters[0]
        super().__init__(first.in_features, first.out_features, config)
        self.dropout = None  # each expert's adapter applies its own
        self.experts = nn.ModuleList(adapters)

    @property
    def num_experts(self) -> int:
        """E."""
        return len(self.experts)

    # -- contract, by delegation -----------------------------------------------------------------
    def units(self) -> tuple[tuple[str, AdapterBase], ...]:
        """``(".<e>", adapter)`` per expert: the adapters one by one (see ``AdapterBase.units``)."""
        return tuple((f".{e}", a) for e, a in enumerate(self.experts))

    @property
    def method(self) -> str:
        """The experts' method."""
        return self.experts[0].method

    @property
    def rank(self) -> int:
        """The largest rank among the experts (they differ for AROMA)."""
        return max(a.rank for a in self.experts)

    @property
    def trains(self) -> bool:
        """Whether any expert's adapter still trains."""
        return any(a.trains for a in self.experts)

    def adapter_params(self) -> list[str]:
        """``experts.<e>.<name>`` for every expert's own parameters."""
        return [f"experts.{e}.{n}" for e, a in enumerate(self.experts) for n in a.adapter_params()]

    def stored_tensors(self) -> dict[str, Tensor]:
        """Every expert's stored tensors, as ``"<e>.<name>"``."""
        return {f"{e}.{n}": t for e, a in enumerate(self.experts) for n, t in a.stored_tensors().items()}

    def state(self) -> dict[str, Any]:
        """``{"experts": [state of expert 0, ...]}``."""
        return {"experts": [a.state() for a in self.experts]}

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Hand each expert its state and its ``"<e>.<name>"`` tensors."""
        states = state.get("experts") or [{}] * self.num_experts
        for e, a in enumerate(self.experts):
            prefix = f"{e}."
            a.load_state(states[e], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def describe(self) -> dict[str, Any]:
        """The expert count and the per-expert ranks (min / max)."""
        ranks = [a.rank for a in self.experts]
        return {"experts": self.num_experts, "rank_min": min(ranks), "rank_max": max(ranks)}

    def fusion(self) -> str:
        """Expert sites are not in an fx graph: the routing calls each expert's adapter."""
        return "expert sites run through aurora_fx.expert_routing, not an fx graph"

    def delta_weight(self, lossy: bool = False) -> Tensor:
        """The ``(E, d_out, d_in)`` update (each expert's ``delta_weight``; raises where the method does)."""
        return torch.stack([a.delta_weight(lossy=lossy) for a in self.experts])

    @property
    def lora_exact(self) -> bool:  # type: ignore[override]
        """Whether every expert's update is exactly LoRA."""
        return self.experts[0].lora_exact

    # -- the three ways an experts forward computes ---------------------------------------------
    # Each adds into the base output in place: the base ops (linear, bmm, grouped mm) do not keep their
    # output for backward, and no (S, d_out) delta for all rows at once is ever held.
    def add_expert(self, out: Tensor, expert: int | Tensor, x: Tensor) -> Tensor:
        """``out += Δ_e(x)`` for expert ``expert``'s tokens ``x`` (``(..., d_in)``); returns ``out``."""
        return out.add_(self.experts[int(expert)](x))

    def add_rows(self, out: Tensor, x: Tensor, ids: Tensor) -> Tensor:
        """``out[i] += Δ_{ids[i]}(x[i])`` for ``x`` ``(S, d_in)``, ``ids`` ``(S,)`` (ids outside ``[0, E)``: none)."""
        if torch.compiler.is_compiling():
            return self._add_masked(out, x, ids)
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids.clamp(0, self.num_experts), minlength=self.num_experts + 1).tolist()
        for e, rows in enumerate(order.split(counts)[: self.num_experts]):
            if counts[e]:
                out.index_add_(0, rows, self.experts[e](x[rows]).to(out.dtype))
        return out

    def add_grouped(self, out: Tensor, x: Tensor, offs: Tensor) -> Tensor:
        """``out += Δ`` for ``x`` ``(S, d_in)`` sorted by expert, expert e's rows ending at ``offs[e]`` (cumulative).

        Rows past the last offset (expert-parallel sentinels) get no update.
        """
        if torch.compiler.is_compiling():
            ids = torch.searchsorted(offs.to(torch.int64), torch.arange(x.shape[0], device=x.device), right=True)
            return self._add_masked(out, x, ids)
        if int(offs[-1]) == x.shape[0]:  # (no sentinel rows: the grouped kernel leaves rows past offs[-1] unset)
            delta = type(self.experts[0]).grouped_delta(list(self.experts), x, offs)
            if delta is not None:
                return out.add_(delta)
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] += self.experts[e](x[start:end]).to(out.dtype)
            start = end
        return out

    def _add_masked(self, out: Tensor, x: Tensor, ids: Tensor) -> Tensor:
        """Every expert's adapter on every row, each row keeping its own expert's (compile-friendly)."""
        for e, adapter in enumerate(self.experts):
            keep = (ids == e).unsqueeze(-1)
            out = out + torch.where(keep, adapter(x), 0.0).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        """Expert count and shape."""
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"
