"""export.to_onnx_decoder: HF decoders with the KV cache as graph inputs and outputs, and OnnxGenerator.

GPT-2 (Conv1D), Llama and Qwen2 configs, each with random non-zero AuroRA and LoRA adapters: the
onnxruntime greedy loop gives exactly HF ``generate``'s tokens, with every step's logits within 1e-4,
batch 2 with left padding.
"""

from __future__ import annotations

import pytest
import torch

import aurora_fx
from aurora_fx.export import OnnxGenerator, to_onnx, to_onnx_decoder
from tests.conftest import ORT_ATOL
from tests.models import DECODERS, randomize_adapters

pytestmark = pytest.mark.slow
NEW = 16


def _decoder(name: str, seed: int = 0):
    build, aurora_site, lora_site = DECODERS[name]
    torch.manual_seed(seed)
    model = build()
    aurora_fx.apply(model, aurora_site)
    aurora_fx.apply(model, lora_site, method="lora", rank=4)
    randomize_adapters(model, std=0.1)
    return model


def _prompt():
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.fixture(scope="module", params=sorted(DECODERS))
def exported(request, tmp_path_factory):
    model = _decoder(request.param)
    path = tmp_path_factory.mktemp(request.param) / "decoder.onnx"
    return model, to_onnx_decoder(model, path)


def test_the_graph_takes_and_returns_the_cache(exported):
    model, result = exported
    layers = model.config.num_hidden_layers
    assert result.input_names[:3] == ("input_ids", "attention_mask", "position_ids")
    assert result.input_names[3:] == tuple(f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    assert result.output_names == ("logits", *(f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")))
    assert result.adapter_nodes > 0  # the fused AuroRA op is inside, unmerged
    assert max(result.max_abs_diff.values()) <= ORT_ATOL  # prefill with past 0, and a decode step


def test_onnxruntime_greedy_generation_equals_hf_generate(exported):
    model, result = exported
    ids, mask = _prompt()
    ours, logits = OnnxGenerator(result.path).generate(ids, mask, max_new_tokens=NEW, return_logits=True)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                        output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours, hf.sequences)
    assert len(logits) == len(hf.logits)
    assert max(float((torch.from_numpy(a) - b).abs().max()) for a, b in zip(logits, hf.logits, strict=True)) <= ORT_ATOL


def test_sampling_draws_from_the_model_and_is_seeded(exported):
    _, result = exported
    gen = OnnxGenerator(result.path)
    ids, mask = _prompt()
    a = gen.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=5, seed=3)
    b = gen.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=5, seed=3)
    assert torch.equal(a, b) and a.shape[1] <= 7 + 6


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_to_onnx_with_default_arguments_works_on_a_decoder(name, tmp_path):
    model = _decoder(name)
    ids, _ = _prompt()  # (fully masked left-padding rows compute garbage that runtimes need not agree on)
    result = to_onnx(model, tmp_path / "plain.onnx", example_kwargs={"input_ids": ids})
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    assert any("use_cache=False" in note and "to_onnx_decoder" in note for note in result.notes)


def test_one_swappable_decoder_graph_serves_two_fine_tunes(tmp_path):
    first, second = _decoder("llama", seed=0), _decoder("llama", seed=0)
    randomize_adapters(second, std=0.2)  # the same base, other adapter weights
    to_onnx_decoder(first, tmp_path / "base.onnx", swappable=True)
    files = [aurora_fx.export.save_adapter_weights(m, tmp_path / f"{i}.onnx_adapter")
             for i, m in enumerate((first, second))]
    ids, mask = _prompt()
    for model, file in zip((first, second), files, strict=True):
        ours = OnnxGenerator(tmp_path / "base.onnx", adapter=file).generate(ids, mask, max_new_tokens=8)
        assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                max_new_tokens=8))


def test_a_model_without_a_kv_cache_is_refused_with_the_alternative(tmp_path):
    from tests.models import bert

    with pytest.raises(ValueError, match="is not an HF causal LM.*to_onnx"):
        to_onnx_decoder(bert(), tmp_path / "x.onnx")


def test_the_verification_raises_when_onnxruntime_differs(tmp_path):
    from aurora_fx.export import ExportVerificationError

    with pytest.raises(ExportVerificationError, match=r"onnxruntime differs from PyTorch by .* \(> atol 1e-15\)"):
        to_onnx_decoder(_decoder("llama"), tmp_path, atol=1e-15)  # float32 runtimes differ by ~1e-7
