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
