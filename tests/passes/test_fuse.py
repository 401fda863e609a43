"""fuse_adapters: one op call per AuroRA or LoRA site, numerics preserved, the rest left alone."""

from __future__ import annotations

import operator

import torch
from torch import nn

import aurora_fx
from aurora_fx.config import AuroraConfig
from aurora_fx.ops.fused import aurora_delta, lora_delta
from aurora_fx.passes.fuse import can_fuse, fuse_adapters
from tests.conftest import assert_close
from tests.models import randomize_adapters


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_fuse_replaces_the_subgraph_by_one_op_and_keeps_numerics():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0", fuse=False)
    randomize_adapters(model)
    x = torch.randn(3, 6)
    before = model(x)
    n_before = len(model[0].graph.nodes)
    result = fuse_adapters(model[0])
    assert result.modified
    gm = result.graph_module
    gm.graph.lint()
    assert _ops(gm).count(aurora_delta) == 1 and operator.add not in _ops(gm)
    assert len(gm.graph.nodes) < n_before
    assert_close(gm(x), before)


def test_dropout_stays_in_front_of_the_fused_op():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0", dropout=0.2)
    gm = model[0]
    fused = next(n for n in gm.graph.nodes if n.target is aurora_delta)
    assert fused.args[1].op == "call_module" and fused.args[1].target == "adapter.dropout"


def test_lora_fuses_and_keeps_numerics():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0", method="lora", rank=2, fuse=False)
    randomize_adapters(model)
    x = torch.randn(3, 6)
    before = model(x)
    gm = fuse_adapters(model[0]).graph_module
    assert _ops(gm).count(lora_delta) == 1 and operator.add not in _ops(gm)
    assert_close(gm(x), before)


def test_aroma_and_non_cubic_aurora_are_not_fused():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 5))
    aurora_fx.apply(model, "0", method="aroma")
    aurora_fx.apply(model, "1", config=AuroraConfig(spline_order=2))
    assert not fuse_adapters(model[0]).modified
    assert not fuse_adapters(model[1]).modified
    assert "cubic splines only" in can_fuse(model[1].adapter)
    assert [a.fused for a in aurora_fx.adapters(model)] == [False, False]
