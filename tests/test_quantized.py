"""Quantized bases (issue 32): QLoRA-style adapters on bitsandbytes and torchao weights, on the CPU.

A tiny Llama whose linears are quantized (bitsandbytes NF4 and int8, torchao int8 and int4 weight-only): every
method adapts them, the output is ``quantized_base(x) + oracle_delta(x)``, every trainable tensor is live, training
tracks the dequantized float base, no float copy of a quantized weight is saved for backward, and save/load,
merge, ``to_peft`` and ``to_onnx`` work or refuse by name.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.owners import WrappedOwner, owner_state
from aurora_fx.quantized import dequantized_weight, quantization, quantize_linears
from tests.models import assert_every_trainable_tensor_is_live, randomize_adapters, train_steps

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

SCHEMES = ("bnb-nf4", "bnb-int8", "torchao-int8", "torchao-int4")
NAMES = {"bnb-nf4": "bitsandbytes.nf4", "bnb-int8": "bitsandbytes.int8", "torchao-int8": "torchao.Int8Tensor",
         "torchao-int4": "torchao.IntxUnpackedToInt8Tensor"}
PATTERN = "q_proj|v_proj|o_proj|down_proj"
METHODS = ("lora", "aurora", "aroma")


def _llama(hidden: int = 64) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()


def _quantized(scheme: str) -> nn.Module:
    return quantize_linears(_llama(), scheme)


def _adapted(scheme: str, method: str, pattern: str = PATTERN, **kw) -> nn.Module:
    model = _quantized(scheme)
    aurora_fx.apply(model, pattern, method=method, rank=2, dropout=kw.pop("dropout", 0.0), **kw)
    randomize_adapters(model, std=0.1)
    return model


def _ids(seed: int = 0, shape=(2, 8)) -> torch.Tensor:
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sites_show_the_quantization_and_the_layer_shape(scheme):
    table = aurora_fx.sites(_quantized(scheme), "q_proj")
    site = table.matched[0]
    assert (site.quantization, site.kind, site.in_features, site.out_features, site.reason) == \
        (NAMES[scheme], "linear", 64, 64, None)
    assert f"linear ({NAMES[scheme]})" in str(table)
    assert table.get("lm_head").quantization is None  # left float by quantize_linears


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_output_is_the_quantized_base_plus_the_oracle_delta(scheme, method):
    model = _adapted(scheme, method)
    owner = model.model.layers[0].self_attn.q_proj
    assert isinstance(owner, WrappedOwner) and quantization(owner) == NAMES[scheme]
    base = owner_state(owner).original  # the quantized layer itself, sharing the weights
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = base(x) + owner.adapter.oracle_delta(x)
        assert (owner(x) - expected).abs().max().item() <= 1e-5
        assert (owner(x) - base(x)).abs().max().item() > 1e-3  # the adapter is not zero


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scheme", ("bnb-nf4", "torchao-int8"))
def test_every_trainable_tensor_of_a_quantized_site_reaches_the_output(scheme, method):
    model = _adapted(scheme, method)
    ids = _ids()
    expected = 8 * {"aurora": 4, "lora": 2, "aroma": 2}[method]  # 2 layers × 4 sites
    assert_every_trainable_tensor_is_live(model, lambda: model(input_ids=ids).logits, f"({scheme}, {method})",
                                          expected=expected)


def _float_twin(model: nn.Module) -> nn.Module:
    """The adapted quantized model with each quantized base replaced by its dequantized float ``nn.Linear``."""
    twin = copy.deepcopy(model)
    aurora_fx.export.onnx.float_bases(twin)
    return twin


def _train(model: nn.Module, steps: int = 30) -> list[float]:
    ids = _ids(1, (4, 16))  # one batch to fit: the adapters can lower its loss quickly
    return train_steps(model, lambda: model(input_ids=ids, labels=ids).loss, steps=steps, lr=2e-2)


@pytest.mark.parametrize("method", ("lora", "aurora"))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_thirty_steps_lower_the_loss_and_track_the_dequantized_float_base(scheme, method):
    model = _adapted(scheme, method)
    twin = _float_twin(model)
    assert not any(isinstance(m, WrappedOwner) for m in twin.modules())
    quantized, floating = _train(model), _train(twin)
    assert quantized[-1] < quantized[0] - 0.1
    assert abs(quantized[-1] - floating[-1]) <= 0.02 * floating[-1], (quantized[-1], floating[-1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_float_copy_of_a_quantized_weight_is_saved_for_backward(scheme):
    model = _adapted(scheme, "lora", pattern="proj")  # every quantized layer adapted (torchao's own backward, in
    # a layer without an adapter, keeps dequant(W)ᵀ for the input gradient; ours does not)
    full = {64 * 64, 64 * 32, 128 * 64}  # the float sizes of the quantized weights (q/o, k/v, mlp)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        plain = type(t) in (torch.Tensor, nn.Parameter)  # (torchao saves its quantized subclass: fine)
        if plain and t.is_floating_point() and t.dim() == 2 and t.numel() in full and t.shape[0] != 16:
            saved.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=_ids(shape=(1, 16)), labels=_ids(shape=(1, 16))).loss
    loss.backward()
    assert saved == [], f"float weight-sized tensors saved for backward: {saved}"


def test_the_saved_tensor_probe_sees_a_dequantized_weight():
    """The probe above catches a base that keeps dequant(W) for backward (as F.linear on it would)."""
    layer = quantize_linears(nn.Sequential(nn.Linear(64, 64)), "bnb-nf4", skip="")[0]
    seen = []
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        nn.functional.linear(x, dequantized_weight(layer).requires_grad_()).sum().backward()
    assert (64, 64) in seen


def test_save_then_load_onto_a_freshly_quantized_base_and_a_differently_quantized_one_is_refused(tmp_path):
    model = _adapted("bnb-nf4", "aurora")
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    aurora_fx.save_adapters(model, tmp_path)
    fresh = _quantized("bnb-nf4")
    aurora_fx.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)
    other = _quantized("bnb-int8")
    with pytest.raises(aurora_fx.checkpoint.CheckpointError, match="quantized as bitsandbytes.nf4.*this base is "
                                                                    "bitsandbytes.int8"):
        aurora_fx.load_adapters(other, tmp_path)
    assert not any(isinstance(m, WrappedOwner) for m in other.modules())  # nothing changed


def test_merge_refuses_a_quantized_base_unless_dequantize_and_reports_its_error(caplog):
    model = _adapted("torchao-int8", "lora")
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="quantized base.*dequantize=True"):
        aurora_fx.merge(model)
    with caplog.at_level(logging.WARNING, logger="aurora_fx"):
        aurora_fx.merge(model, dequantize=True)
    assert "largest error" in caplog.text and "q_proj" in caplog.text
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert (model(input_ids=ids).logits - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_to_onnx_runs_the_dequantized_base_with_the_adapters(tmp_path):
    model = _adapted("bnb-nf4", "aurora")
    result = aurora_fx.export.to_onnx(model, tmp_path / "q.onnx", example_kwargs={"input_ids": _ids()})
    assert any("dequantized" in note for note in result.notes)
    assert max(result.max_abs_diff.values()) <= 1e-4  # ORT against the quantized model with its adapters


@pytest.mark.slow
def test_to_peft_loads_in_peft_on_the_bitsandbytes_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = _adapted("bnb-nf4", "lora")
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    aurora_fx.export.to_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(_quantized("bnb-nf4"), str(tmp_path)).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_the_hf_loading_path_with_a_bitsandbytes_config(tmp_path):
    """from_pretrained(quantization_config=BitsAndBytesConfig(4-bit)) → apply → train → save_pretrained →
    aurora_fx.from_pretrained back onto a quantized model, with the same outputs."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    _llama().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")
    assert aurora_fx.sites(model, "q_proj").matched[0].quantization == "bitsandbytes.nf4"
    aurora_fx.apply(model, "q_proj|v_proj", method="lora", rank=4, alpha=8.0)
    losses = _train(model, steps=10)
    assert losses[-1] < losses[0]
    # compared in train mode (LoRA dropout 0: deterministic): bitsandbytes' CPU eval kernel repacks 4-bit weights in
    # place, and the inverse its save runs is lossy (outputs move by ~1e-2 after save_pretrained)
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "tuned")
    back = aurora_fx.from_pretrained(LlamaForCausalLM, tmp_path / "tuned", quantization_config=config,
                                     device_map="cpu").train()
    assert isinstance(back.model.layers[0].self_attn.q_proj, WrappedOwner)
    with torch.no_grad():
        assert (back(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
