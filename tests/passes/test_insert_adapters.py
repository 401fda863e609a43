"""insert_adapters: lint, golden generated code, parity vs the oracle with non-zero B."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx import functional as AF
from aurora_fx.passes.base import ADAPTER_TAG
from tests.conftest import assert_close
from tests.models import FunctionalMLP, randomize_adapters

LORA_CODE = """
def forward(self, input : torch.Tensor) -> torch.Tensor:
    input_1 = input
    weight = self.weight
    bias = self.bias
    linear = torch._C._nn.linear(input_1, weight, bias);  weight = bias = None
    adapter_a = self.adapter.A
    adapter_getattr_1 = adapter_a.dtype
    adapter_to = input_1.to(adapter_getattr_1);  input_1 = adapter_getattr_1 = None
    adapter_b = self.adapter.B
    adapter_linear = torch._C._nn.linear(adapter_to, adapter_a);  adapter_to = adapter_a = None
    adapter_linear_1 = torch._C._nn.linear(adapter_linear, adapter_b);  adapter_linear = adapter_b = None
    adapter_mul = adapter_linear_1 * 8.0;  adapter_linear_1 = None
    type_as = adapter_mul.type_as(linear);  adapter_mul = None
    add = linear + type_as;  linear = type_as = None
    return add
"""


def test_lora_on_a_linear_gives_the_golden_graph():
    model = nn.Sequential(nn.Linear(4, 3))
    aurora_fx.apply(model, "0", method="lora", rank=2, fuse=False)  # scale 16/2 = 8; the pass before fusion
    gm = model[0]
    gm.graph.lint()
    assert gm.code.strip() == LORA_CODE.strip()
    assert gm.weight is not None and gm.in_features == 4 and gm.out_features == 3  # still reads like a Linear


def test_unfused_aurora_subgraph_shows_the_anl_branches():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0", fuse=False)
    gm = model[0]
    gm.graph.lint()
    tagged = [n for n in gm.graph.nodes if n.meta.get(ADAPTER_TAG) == "adapter"]
    targets = [getattr(n.target, "__name__", n.target) for n in tagged if n.op != "get_attr"]
    assert targets.count("tanh") == 2 and "bspline_basis" in targets and targets.count("linear") == 4
    assert [n.target for n in gm.graph.nodes if n.target is operator.add][-1:] == [operator.add]
    randomize_adapters(model)
    model.eval()  # AuroRA's default input dropout (0.05) is the identity in eval
    x = torch.randn(3, 6)
    a = gm.adapter
    knots = AF.spline_knots(dtype=torch.float64)
    expected = nn.functional.linear(x, gm.weight, gm.bias) + AF.aurora_delta(x, a.A, a.B, a.H, a.Ws, knots, 2.0)
    assert_close(model(x), expected)


def test_functional_sites_get_one_adapter_each_inside_their_owner():
    model = nn.Sequential(FunctionalMLP())
    aurora_fx.apply(model, "w_in|w_out", method="lora", rank=2)
    gm = model[0]
    assert [n for n, _ in gm.named_children()] == ["norm", "adapter_w_in", "adapter_w_out"]
    assert sorted(k for k in gm.state_dict() if "adapter" in k) == [
        "adapter_w_in.A", "adapter_w_in.B", "adapter_w_out.A", "adapter_w_out.B"]
    assert set(gm.state_dict()) >= {"w_in", "b_in", "w_out", "norm.weight", "norm.bias"}


def test_applying_twice_on_one_owner_adds_the_second_site():
    model = nn.Sequential(FunctionalMLP())
    aurora_fx.apply(model, "w_in", method="lora", rank=2)
    aurora_fx.apply(model, "w_out", method="aurora")
    assert [(a.path, a.method) for a in aurora_fx.adapters(model)] == [("0.w_in", "lora"), ("0.w_out", "aurora")]
    aurora_fx.unload(model)
    assert type(model[0]) is FunctionalMLP


def test_a_linear_called_twice_gets_the_adapter_on_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w.T @ self.w.T

    model = nn.Sequential(Twice())
    site = aurora_fx.sites(model, "w").matched[0]
    assert site.calls == 2
    aurora_fx.apply(model, "w", method="lora", rank=1)
    adds = [n for n in model[0].graph.nodes if n.meta.get("aurora_fx_role") == "sum"]
    assert len(adds) == 2


@pytest.mark.parametrize("method", ["aroma", "aurora", "lora"])
def test_a_graph_traced_in_one_dtype_is_not_reused_for_another(method):
    """The traced adapter graph is cached per trace key; a dtype read while tracing (AROMA's
    ``x.to(self.U.dtype)``) must not leak from a float64 model into a float32 one."""
    outputs = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)
        x = torch.randn(3, 8).to(dtype)
        aurora_fx.apply(model, r"^0$", method=method, rank=2)  # B = 0: the base model's outputs
        outputs[dtype] = model(x)
        assert outputs[dtype].dtype == dtype
    torch.testing.assert_close(outputs[torch.float32], outputs[torch.float64].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["aroma", "aurora", "lora"])
def test_an_adapted_model_cast_to_another_dtype_runs_in_it(method):
    """``model.to(dtype)`` after ``apply``: the adapter graph reads its tensors' dtypes at run time
    (AROMA's merged factors are buffers: traced as constants they kept the old dtype)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    aurora_fx.apply(model, r"^0$", method=method, rank=2)
    randomize_adapters(model)
    model.eval()  # AROMA's default input dropout
    x = torch.randn(3, 8)
    expected = model(x).double()
    model.to(torch.float64)
    out = model(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
