"""Slice sites (issue 31): the q/k/v row blocks of a fused projection adapted on their own.

timm ViT (``attn.qkv``, an ``nn.Linear``) and GPT-2 (``c_attn``, HF ``Conv1D``): a float64 oracle that adds each
slice's functional ``oracle_delta`` to its rows of the base output, the pattern rule, user-given slices, liveness,
training, save/load, merge, ONNX and PEFT.
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
QV = r"\[[qv]\]$"


def _vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3,
                             depth=2).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


BUILD = {"vit": _vit, "gpt2": _gpt2}
FUSED = {"vit": "blocks.0.attn.qkv", "gpt2": "transformer.h.0.attn.c_attn"}


def _inputs(name: str, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"x": torch.randn(2, 3, 32, 32, generator=gen, dtype=dtype)}
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=gen)}


def _out(name: str, model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if name == "vit" else out.logits


def _adapted(name: str, method: str, dtype=torch.float32) -> nn.Module:
    model = aurora_fx.apply(BUILD[name]().to(dtype), QV, method=method, rank=RANKS[method], dropout=0.0)
    randomize_adapters(model, std=0.05)  # (A·x inside AuroRA's spline grid, so W_s is live)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(BUILD))
def test_a_fused_layer_with_q_and_v_slices_equals_the_row_oracle_in_float64(name, method):
    model = _adapted(name, method, torch.float64)
    layer = model.get_submodule(FUSED[name])
    assert isinstance(layer, WrappedOwner)
    x = torch.randn(2, 5, layer.adapter_q.in_features, dtype=torch.float64)
    with torch.no_grad():
        base = owner_state(layer).original(x)
        width = base.shape[-1] // 3
        expected = base.clone()
        expected[..., :width] += layer.adapter_q.oracle_delta(x)
        expected[..., 2 * width:] += layer.adapter_v.oracle_delta(x)
        assert (layer(x) - expected).abs().max().item() <= 1e-10
        assert (layer(x) - base)[..., width:2 * width].abs().max().item() == 0.0  # k's rows untouched


@pytest.mark.parametrize("name", list(BUILD))
def test_a_pattern_on_the_layer_adapts_it_whole_and_one_with_brackets_its_slices(name):
    table = aurora_fx.sites(BUILD[name](), FUSED[name].rpartition(".")[2])
    assert FUSED[name] in {s.path for s in table.matched}
    assert not any("[" in s.path for s in table.matched)
    sliced = aurora_fx.sites(BUILD[name](), QV).matched
    assert [s.path for s in sliced][:2] == [f"{FUSED[name]}[q]", f"{FUSED[name]}[v]"]
    assert sliced[0].rows == (0, 32 if name == "gpt2" else 192)
    model = aurora_fx.apply(BUILD[name](), QV, method="lora")
    with pytest.raises(ValueError, match="already has an adapter"):
        aurora_fx.apply(model, FUSED[name] + "$", method="lora")  # the whole layer under its slices


def test_user_slices_on_any_linear_and_a_bad_one_refused():
    model = nn.Sequential(nn.Linear(8, 20), nn.Tanh(), nn.Linear(20, 4))
    slices = {"0": {"q": (0, 8), "kv": (8, 20)}}
    table = aurora_fx.sites(model, r"\[kv\]", slices=slices)
    assert [(s.path, s.in_features, s.out_features) for s in table.matched] == [("0[kv]", 8, 12)]
    aurora_fx.apply(model, r"\[kv\]", method="lora", rank=2, slices=slices)
    bad = aurora_fx.sites(nn.Sequential(nn.Linear(8, 20)), slices={"0": {"x": (10, 30)}}).get("0[x]")
    assert "outside the layer's 20 outputs" in bad.reason


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(BUILD))
def test_every_slice_tensor_reaches_the_output(name, method):
    model = _adapted(name, method)
    inputs = _inputs(name)
    expected = 2 * 2 * {"aurora": 4, "lora": 2, "aroma": 2}[method]  # 2 layers × q, v
    assert_every_trainable_tensor_is_live(model, lambda: _out(name, model, inputs), f"({name}, {method})",
                                          expected=expected)


@pytest.mark.parametrize("name", list(BUILD))
def test_a_few_steps_lower_the_loss(name):
    model = aurora_fx.apply(BUILD[name](), QV, method="aurora", dropout=0.05)
    inputs = _inputs(name)

    def loss():
        if name == "vit":
            return F.cross_entropy(model(**inputs), torch.tensor([0, 2]))
        return model(**inputs, labels=inputs["input_ids"]).loss

    losses = train_steps(model, loss, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", list(BUILD))
def test_save_load_and_exact_merge(name, tmp_path):
    model = _adapted(name, "lora")
    inputs = _inputs(name)
    with torch.no_grad():
        expected = _out(name, model, inputs)
    aurora_fx.save_adapters(model, tmp_path)
    fresh = BUILD[name]()
    aurora_fx.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(_out(name, fresh, inputs), expected)
        aurora_fx.merge(fresh)
        assert not any(isinstance(m, WrappedOwner) for m in fresh.modules())
        assert (_out(name, fresh, inputs) - expected).abs().max().item() <= 1e-5


def test_user_slices_round_trip_through_a_checkpoint(tmp_path):
    slices = {"0": {"kv": (8, 20)}}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 20), nn.Tanh()))
    aurora_fx.apply(model, r"\[kv\]", method="lora", rank=2, slices={"0.0": slices["0"]})
    randomize_adapters(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    aurora_fx.save_adapters(model, tmp_path)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Sequential(nn.Linear(8, 20), nn.Tanh()))
    aurora_fx.load_adapters(fresh, tmp_path)  # the rows come from the checkpoint
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILD))
def test_to_onnx_of_slice_adapters_verifies_in_onnxruntime(name, tmp_path):
    model = _adapted(name, "aurora")
    inputs = _inputs(name)
    if name == "vit":
        result = aurora_fx.export.to_onnx(model, tmp_path / "m.onnx", example_inputs=(inputs["x"],))
    else:
        result = aurora_fx.export.to_onnx(model, tmp_path / "m.onnx", example_kwargs=inputs)
    assert max(result.max_abs_diff.values()) <= ORT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILD))
def test_to_peft_writes_one_full_width_lora_per_fused_layer_and_peft_matches(name, tmp_path):
    peft = pytest.importorskip("peft")
    model = _adapted(name, "lora")
    inputs = _inputs(name)
    with torch.no_grad():
        expected = _out(name, model, inputs)
    result = aurora_fx.export.to_peft(model, tmp_path)
    assert [s.path for s in result.sites][0] == FUSED[name] and result.sites[0].rank == 4  # q's 2 + v's 2
    loaded = peft.PeftModel.from_pretrained(BUILD[name](), str(tmp_path)).eval()
    with torch.no_grad():
        assert (_out(name, loaded, inputs) - expected).abs().max().item() <= 1e-5
    back = aurora_fx.load_peft_lora(BUILD[name](), tmp_path)  # the full-width LoRA, as our LoRA on the layer
    with torch.no_grad():
        assert (_out(name, back, inputs) - expected).abs().max().item() <= 1e-5
    assert copy.deepcopy(back) is not None
