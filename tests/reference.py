"""A whole-model reference built from the functional oracle only.

``reference_model(adapted)`` deep-copies the model, takes its adapters, unloads (the original
modules come back) and adds each adapter's ``oracle_delta`` (``aurora_fx.functional`` only) at every
site with forward hooks. For ``FunctionalMLP`` (sites inside a module's own forward) the forward
is rewritten by hand.
"""

from __future__ import annotations

import copy
import types

import torch.nn.functional as F
from torch import nn

import aurora_fx
from aurora_fx.inventory import adapter_modules
from tests.models import FunctionalMLP


def oracle_delta(adapter: nn.Module, x):
    """Δ(x) from aurora_fx.functional only (eval mode: no dropout)."""
    return adapter.oracle_delta(x)


def _functional_forward(deltas: dict[str, nn.Module]):
    def forward(self, x):
        pre = F.linear(x, self.w_in, self.b_in)
        if "w_in" in deltas:
            pre = pre + oracle_delta(deltas["w_in"], x)
        h = F.gelu(pre)
        out = h @ self.w_out.T
        if "w_out" in deltas:
            out = out + oracle_delta(deltas["w_out"], h)
        return self.norm(x + out)

    return forward


def reference_model(adapted: nn.Module) -> nn.Module:
    """The adapted model's function, computed with the oracle on the restored base."""
    ref = copy.deepcopy(adapted)
    sites = [(site, adapter) for site, _, adapter in adapter_modules(ref)]
    aurora_fx.unload(ref)
    per_owner: dict[str, dict[str, nn.Module]] = {}
    for site, adapter in sites:
        module = _module_or_none(ref, site)
        if module is not None and not isinstance(module, FunctionalMLP):
            module.register_forward_hook(lambda m, inp, out, a=adapter: out + oracle_delta(a, inp[0]))
        else:
            owner, _, param = site.rpartition(".")
            per_owner.setdefault(owner, {})[param] = adapter
    for owner, deltas in per_owner.items():
        module = ref.get_submodule(owner)
        module.forward = types.MethodType(_functional_forward(deltas), module)
    return ref


def _module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def experts_reference(owner: nn.Module, hidden, top_k_index, top_k_weights):
    """An adapted experts module's output from the oracle: a loop over experts on the base weights.

    For each expert e and the rows routed to it: ``W_e·x (+ b_e) + Δ_e(x)`` (``Δ_e`` the expert's
    ``oracle_delta``), the class's gate, the same for the down projection, weighted and summed. Reads the
    ``use_experts_implementation`` contract (``is_transposed``, ``has_bias``, ``_apply_gate``).
    """
    import torch

    from aurora_fx.owners import owner_state

    families = {b.param: owner.get_submodule(b.attr) for b in owner_state(owner).bindings}
    out = torch.zeros_like(hidden)

    def project(name, e, x):
        w = getattr(owner, name)[e]
        y = x @ w if owner.is_transposed else x @ w.T
        if owner.has_bias:
            y = y + getattr(owner, f"{name}_bias")[e]
        if name in families:
            y = y + families[name].experts[e].oracle_delta(x)
        return y

    for e in range(owner.num_experts):
        token, slot = (top_k_index == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = owner._apply_gate(project("gate_up_proj", e, hidden[token]))
        y = project("down_proj", e, h)
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out
