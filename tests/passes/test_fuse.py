"""fuse_adapters: one op call per AuroRA or LoRA site, numerics preserved, the rest left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.config import AuroraConfig
from aurora_fx.ops.fused import aurora_linear, lora_linear
from aurora_fx.passes.fuse import can_fuse, fuse_adapters
from tests.conftest import assert_close
from tests.models import randomize_adapters


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_fuse_replaces_the_subgraph_by_one_op_and_keeps_numerics():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0", fuse=False)
    randomize_adapters(model)
    model.eval()  # adapter dropout is the identity in eval: outputs compare exactly
    x = torch.randn(3, 6)
    before = model(x)
    n_before = len(model[0].graph.nodes)
    result = fuse_adapters(model[0])
    assert result.modified
    gm = result.graph_module
    gm.graph.lint()
    assert _ops(gm) == [aurora_linear]  # the base linear and the adapter in one op
    assert len(gm.graph.nodes) < n_before
    assert_close(gm(x), before)


def _dropout_pair(method: str, train_base: bool):
    torch.manual_seed(0)
    fused = aurora_fx.apply(nn.Sequential(nn.Linear(6, 5)), "0", method=method, rank=2, dropout=0.5)
    randomize_adapters(fused)
    plain = aurora_fx.apply(nn.Sequential(nn.Linear(6, 5)), "0", method=method, rank=2, dropout=0.5, fuse=False)
    plain.load_state_dict(fused.state_dict())
    for model in (fused, plain):
        model[0].weight.requires_grad_(train_base)
        model[0].bias.requires_grad_(train_base)
    return fused, plain


@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("method", ["aurora", "lora"])
def test_with_dropout_the_op_takes_the_linear_and_drops_only_the_adapter_input(monkeypatch, method, train_base):
    import aurora_fx.ops.fused as fused_ops

    split = []  # calls that ran the base linear and the delta op separately
    real = getattr(fused_ops, f"{method}_delta")
    monkeypatch.setattr(fused_ops, f"{method}_delta", lambda *a: split.append(1) or real(*a))
    fused, plain = _dropout_pair(method, train_base)
    op = next(n for n in fused[0].graph.nodes if n.target in (aurora_linear, lora_linear))
    assert op.kwargs["dropout"].target == "adapter.dropout"  # the adapter's own dropout module
    x = torch.randn(4, 3, 6, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    for train in (True, False):
        fused.train(train), plain.train(train)
        split.clear()
        torch.manual_seed(1)
        out = fused(x)
        # AuroRA: one op with the mask inside (AuroraLinearDropout); LoRA: base linear + delta op; eval: fused
        assert split == ([1] if train and method == "lora" else [])
        torch.manual_seed(1)  # the same dropout mask
        ref = plain(xs)
        assert_close(out, ref)
        if train:  # the mask is drawn: the dropped adapter input differs from the base's
            torch.manual_seed(2)
            assert not torch.allclose(fused(x), out)
            g = torch.randn_like(out)
            out.backward(g), ref.backward(g)
            assert_close(x.grad, xs.grad)
            for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
                assert (p.grad is None) == (q.grad is None), name
                if p.grad is not None:
                    assert_close(p.grad, q.grad, atol=1e-5), name


def test_the_fused_linear_gives_the_unfused_gradients_for_every_input():
    for method in ("aurora", "lora"):
        torch.manual_seed(0)
        fused = aurora_fx.apply(nn.Sequential(nn.Linear(6, 5)), "0", method=method, rank=2, dropout=0.0)
        randomize_adapters(fused)
        fused[0].weight.requires_grad_(True)  # the base weight and bias too, when they train
        fused[0].bias.requires_grad_(True)
        plain = aurora_fx.apply(nn.Sequential(nn.Linear(6, 5)), "0", method=method, rank=2, dropout=0.0,
                                fuse=False)
        plain.load_state_dict(fused.state_dict())
        plain[0].weight.requires_grad_(True)
        plain[0].bias.requires_grad_(True)
        x = torch.randn(4, 3, 6, requires_grad=True)
        xs = x.detach().clone().requires_grad_()
        g = torch.randn(4, 3, 5)
        fused(x).backward(g)
        plain(xs).backward(g)
        assert_close(x.grad, xs.grad)
        for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
            assert_close(p.grad, q.grad, atol=1e-5), name


def test_lora_fuses_and_keeps_numerics():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0", method="lora", rank=2, fuse=False)
    randomize_adapters(model)
    x = torch.randn(3, 6)
    before = model(x)
    gm = fuse_adapters(model[0]).graph_module
    assert _ops(gm) == [lora_linear]
    assert_close(gm(x), before)


def test_aroma_and_non_cubic_aurora_are_not_fused():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 5))
    aurora_fx.apply(model, "0", method="aroma")
    aurora_fx.apply(model, "1", config=AuroraConfig(spline_order=2))
    assert not fuse_adapters(model[0]).modified
    assert not fuse_adapters(model[1]).modified
    assert "cubic splines only" in can_fuse(model[1].adapter)
    assert [a.fused for a in aurora_fx.adapters(model)] == [False, False]
