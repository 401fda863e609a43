"""Property tests over random nested module trees of Linear / Conv1D / functional-linear modules.

Invariants for a random tree, a random subset of its sites (as a pattern) and a random method:
the output at init equals the base, parameter counts follow the formulas, ``unload`` restores the
base exactly, and save → load onto a fresh copy is exact.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import aurora_fx
from tests.models import randomize_adapters


class FuncLinear(nn.Module):
    """``F.linear`` on its own parameter ``w`` (a functional site named ``<path>.w``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return F.linear(x, self.w)


class Block(nn.Module):
    """Children applied in turn with a residual tanh."""

    def __init__(self, children: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(children)

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


LEAVES = st.sampled_from(["linear", "conv1d", "func"])
TREES = st.recursive(LEAVES, lambda inner: st.lists(inner, min_size=1, max_size=3), max_leaves=6)


def build(spec, d: int) -> nn.Module:
    if spec == "linear":
        return nn.Linear(d, d)
    if spec == "conv1d":
        conv = Conv1D(d, d)
        nn.init.normal_(conv.weight, std=d**-0.5)
        return conv
    if spec == "func":
        return FuncLinear(d)
    return Block([build(s, d) for s in spec])


def expected_params(method: str, rank: int, d: int) -> int:
    return {"aurora": rank * 2 * d + rank * rank + rank * 8, "lora": rank * 2 * d, "aroma": rank * 2 * d}[method]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(TREES, min_size=1, max_size=3), d=st.integers(3, 6), data=st.data(),
       method=st.sampled_from(["aurora", "lora", "aroma"]), fuse=st.booleans())
def test_random_trees_keep_every_invariant(spec, d, data, method, fuse):
    torch.manual_seed(0)
    base = Block([build(s, d) for s in spec]).eval()
    sites = [s.path for s in aurora_fx.sites(base)]
    chosen = data.draw(st.lists(st.sampled_from(sites), min_size=1, unique=True), label="sites")
    rank = data.draw(st.integers(1, min(3, d)), label="rank")
    pattern = [f"^{re.escape(p)}$" for p in chosen]
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        reference = base(x)
    model = copy.deepcopy(base)
    aurora_fx.apply(model, pattern, method=method, rank=rank, fuse=fuse,
                    **({"dropout": 0.0} if method == "aroma" else {}))
    infos = aurora_fx.adapters(model)
    assert sorted(a.path for a in infos) == sorted(chosen)
    assert all(a.num_params == expected_params(method, rank, d) for a in infos)
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # at init: exactly the base
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        assert torch.equal(aurora_fx.unload(copy.deepcopy(model))(x), reference)
        with tempfile.TemporaryDirectory() as tmp:
            path = aurora_fx.save_adapters(model, Path(tmp) / "a.safetensors")
            reloaded = aurora_fx.load_adapters(copy.deepcopy(base), path, fuse=fuse)
            assert torch.equal(reloaded(x), adapted)
