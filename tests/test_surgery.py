"""apply / unload / merge / disable_adapters: behaviour beyond the model matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx import functional as AF
from tests.conftest import assert_close
from tests.models import CASES, FunctionalNet, randomize_adapters

AURORA_SITE_PARAMS = lambda d_in, d_out, r=2: r * (d_in + d_out) + r * r + r * 8  # noqa: E731


def test_aurora_parameter_count_per_site_follows_the_formula():
    model = nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 3))
    aurora_fx.apply(model, ".", rank=3)
    assert [a.num_params for a in aurora_fx.adapters(model)] == [
        AURORA_SITE_PARAMS(10, 7, 3), AURORA_SITE_PARAMS(7, 3, 3)]
    assert [a.trainable_params for a in aurora_fx.adapters(model)] == [
        AURORA_SITE_PARAMS(10, 7, 3), AURORA_SITE_PARAMS(7, 3, 3)]


def test_roberta_base_query_value_has_74208_adapter_parameters():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    with torch.device("meta"):  # RoBERTa-base shape, no memory
        model = RobertaForSequenceClassification(RobertaConfig())
    aurora_fx.apply(model, "query|value")
    infos = aurora_fx.adapters(model)
    assert len(infos) == 24
    assert sum(a.num_params for a in infos) == 74_208


def test_minilm_shaped_lora_r8_has_73728_parameters():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536))
    aurora_fx.apply(model, "query|value", method="lora")
    assert sum(a.num_params for a in aurora_fx.adapters(model)) == 73_728


def test_transformer_encoder_layer_fast_path_never_bypasses_the_adapter():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = layer(x)
    aurora_fx.apply(layer, "linear1", method="lora", rank=2)
    randomize_adapters(layer)
    with torch.no_grad():  # eval + no_grad: where the fused kernel would run
        adapted = layer(x)
    assert (adapted - base).abs().max() > 1e-3
    assert layer.activation_relu_or_gelu == 0
    aurora_fx.unload(layer)
    assert layer.activation_relu_or_gelu == 1
    with torch.no_grad():
        assert_close(layer(x), base)


def test_no_match_lists_the_candidates():
    expected = r"pattern 'querry' matched no site.*encoder\.layer\.0\.attention\.self\.query"
    with pytest.raises(ValueError, match=expected):
        aurora_fx.apply(CASES["bert"].build(), "querry")


def test_rank_larger_than_the_site_is_refused():
    with pytest.raises(ValueError, match=r"head: rank 5 > min\(in_features=16, out_features=4\)"):
        aurora_fx.apply(FunctionalNet(), "head", method="lora", rank=5)


def test_applying_twice_to_a_site_is_refused():
    model = FunctionalNet()
    aurora_fx.apply(model, "head")
    with pytest.raises(ValueError, match=r"head: already has an adapter \(aurora\); call aurora_fx.unload"):
        aurora_fx.apply(model, "head")


def test_a_failed_apply_leaves_the_model_unchanged():
    layer = nn.Sequential(nn.Linear(8, 8), ReadsChildWeight())
    before = {n: type(m) for n, m in layer.named_modules()}
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    with pytest.raises(ValueError, match="reads proj.weight directly"):
        aurora_fx.apply(layer, "0|proj")  # 0 fine, proj not: nothing happens
    assert {n: type(m) for n, m in layer.named_modules()} == before
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == flags


class ReadsChildWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.linear(x, self.proj.weight)  # bypasses proj.forward


def test_base_is_frozen_and_trainable_modules_train():
    model = CASES["roberta_cls"].build()
    aurora_fx.apply(model, "query|value", trainable_modules="classifier")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".adapter." in n or n.startswith("classifier.")}
    assert len(aurora_fx.trainable_parameters(model)) == len(trainable)


def test_unload_restores_requires_grad_flags():
    model = FunctionalNet()
    model.blocks[0].norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    aurora_fx.apply(model, "w_in")
    aurora_fx.unload(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_trainable_modules_that_match_nothing_is_an_error():
    with pytest.raises(ValueError, match="trainable_modules 'clasifier' matched no module"):
        aurora_fx.apply(CASES["roberta_cls"].build(), "query", trainable_modules="clasifier")


def test_aurora_merge_refuses_without_lossy_and_changes_nothing():
    model = nn.Sequential(nn.Linear(6, 5))
    aurora_fx.apply(model, "0")
    randomize_adapters(model)
    weight = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="cannot be merged exactly.*lossy=True"):
        aurora_fx.merge(model)
    assert torch.equal(model[0].weight, weight) and aurora_fx.adapters(model)


def test_lossy_aurora_merge_is_the_static_formula():
    model = nn.Sequential(nn.Linear(6, 5)).double()
    aurora_fx.apply(model, "0")
    randomize_adapters(model)
    a = model[0].adapter
    knots = AF.spline_knots(dtype=torch.float64)
    expected = model[0].weight + AF.aurora_static_delta_weight(a.A, a.B, a.H, a.Ws, knots, a.scale)
    expected = expected.detach().clone()
    aurora_fx.merge(model, lossy=True)
    assert type(model[0]) is nn.Linear
    assert_close(model[0].weight, expected, torch.float64)


def test_conv1d_lora_merge_respects_the_transposed_layout():
    case = CASES["gpt2"]
    model = case.build()
    aurora_fx.apply(model, "c_attn", method="lora", rank=2)
    randomize_adapters(model, std=0.05)
    inputs = case.inputs(2, 5)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged = aurora_fx.merge(model)(**inputs).logits
    assert (unmerged - merged).abs().max() <= 1e-5


def test_mixed_methods_in_one_model():
    model = CASES["llama"].build()
    aurora_fx.apply(model, "q_proj", method="aurora")
    aurora_fx.apply(model, "v_proj", method="lora", rank=4)
    methods = {a.path.rsplit(".", 1)[-1]: a.method for a in aurora_fx.adapters(model)}
    assert methods == {"q_proj": "aurora", "v_proj": "lora"}
    # the first apply's adapters stay trainable after the second apply
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapter." in n)


def test_bf16_model_with_bf16_adapters_keeps_float32_splines():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    aurora_fx.apply(model, "0", dtype=torch.bfloat16)  # default: float32 adapters (tests/test_mixed_precision.py)
    randomize_adapters(model)
    assert model[0].adapter.A.dtype == torch.bfloat16
    out = model(torch.randn(4, 8, dtype=torch.bfloat16) * 20)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
