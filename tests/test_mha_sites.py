"""``nn.MultiheadAttention`` sites (issue 31): q/k/v row blocks of ``in_proj_weight`` and ``out_proj``, live.

An explicit float64 attention reference (projections plus each adapter's ``oracle_delta``, heads, softmax, output
projection) for every method, ``batch_first`` both ways; ``nn.TransformerEncoder`` end to end (fast path off only
while adapters are present, training, save/load, merge, ONNX).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aurora_fx
from aurora_fx.owners import WrappedOwner, owner_state
from tests.conftest import ORT_ATOL
from tests.models import assert_every_trainable_tensor_is_live, randomize_adapters, train_steps

METHODS = ("lora", "aurora", "aroma")
RANKS = {"lora": 2, "aurora": 2, "aroma": 1}
PATTERN = r"in_proj_weight\[[qkv]\]|out_proj"


class Holder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _reference(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written out, with each site's functional oracle added (batch first)."""
    e, h = mha.embed_dim, mha.num_heads
    adapters = {b.site.rpartition(".")[2]: mha.get_submodule(b.attr) for b in owner_state(mha).bindings}

    def project(i: int, name: str) -> torch.Tensor:
        y = F.linear(x, mha.in_proj_weight[i * e:(i + 1) * e], mha.in_proj_bias[i * e:(i + 1) * e])
        key = f"in_proj_weight[{name}]"
        return y + adapters[key].oracle_delta(x) if key in adapters else y

    q, k, v = (project(i, n).unflatten(-1, (h, e // h)).transpose(1, 2) for i, n in enumerate("qkv"))
    attn = torch.softmax(q @ k.transpose(-1, -2) / (e // h) ** 0.5, dim=-1) @ v
    attn = attn.transpose(1, 2).flatten(-2)
    out = F.linear(attn, mha.out_proj.weight, mha.out_proj.bias)
    return out + adapters["out_proj"].oracle_delta(attn) if "out_proj" in adapters else out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_mha_sites_equal_the_attention_oracle_in_float64(method, batch_first):
    torch.manual_seed(0)
    model = aurora_fx.apply(Holder(batch_first).double(), PATTERN, method=method, rank=RANKS[method], dropout=0.0)
    randomize_adapters(model, std=0.1)
    assert isinstance(model.attn, WrappedOwner) and len(aurora_fx.adapters(model)) == 4
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        got = model(x if batch_first else x.transpose(0, 1))
        got = got if batch_first else got.transpose(0, 1)
        assert (got - _reference(model.attn, x)).abs().max().item() <= 1e-10
        with aurora_fx.disable_adapters(model):
            assert (model(x if batch_first else x.transpose(0, 1)) - (got if batch_first else got.transpose(0, 1))
                    ).abs().max().item() > 1e-3


def _encoder(method: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    aurora_fx.apply(model, PATTERN, method=method, rank=RANKS[method], dropout=dropout)
    randomize_adapters(model, std=0.1)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_every_tensor_is_live_in_a_transformer_encoder_under_no_grad_eval(method):
    """(eval + no_grad is where the encoder layer's and the MHA's fused fast paths would bypass the adapters)"""
    model = _encoder(method)
    x = torch.randn(2, 5, 16)
    expected = 2 * 4 * {"aurora": 4, "lora": 2, "aroma": 2}[method]  # 2 layers × q, k, v, out_proj
    assert_every_trainable_tensor_is_live(model, lambda: model(x), f"({method})", expected=expected)


def test_training_save_load_merge_and_the_fast_path_back_after_unload(tmp_path):
    model = _encoder("lora", dropout=0.1)
    x, target = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    losses = train_steps(model, lambda: F.mse_loss(model(x), target), steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        expected = model(x)
    aurora_fx.save_adapters(model, tmp_path)
    fresh = _encoder("lora")
    aurora_fx.unload(fresh)
    assert fresh.layers[0].activation_relu_or_gelu  # the encoder layer's fast path is back without adapters
    aurora_fx.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        merged = copy.deepcopy(fresh)
        aurora_fx.merge(merged)
        assert type(merged.layers[0].self_attn) is nn.MultiheadAttention
        assert (merged(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_an_encoder_with_mha_adapters_exports_to_onnx(tmp_path):
    model = _encoder("aurora")
    result = aurora_fx.export.to_onnx(model, tmp_path / "enc.onnx", example_inputs=(torch.randn(2, 5, 16),))
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
