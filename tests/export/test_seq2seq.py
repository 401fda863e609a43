"""Encoder-decoder models through ``to_onnx`` with its defaults: T5 and Whisper configs with AuroRA adapters.

Each input group has its own dynamic sequence axis (``decoder_*`` inputs: ``decoder_seq``), Whisper's mel
bins stay fixed, the cache is off, and onnxruntime equals PyTorch at two (encoder, decoder) length pairs.
``OnnxSeq2SeqGenerator`` over the T5 graph gives HF ``generate``'s greedy tokens, left padding included.
"""

from __future__ import annotations

import pytest
import torch

import aurora_fx
from aurora_fx.export import OnnxSeq2SeqGenerator, run_onnx, to_onnx
from tests.models import randomize_adapters

pytestmark = pytest.mark.slow


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                eos_token_id=1)).eval()
    aurora_fx.apply(model, r"SelfAttention\.(q|v)$")
    randomize_adapters(model, std=0.2)
    return model


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)).eval()
    aurora_fx.apply(model, r"self_attn\.(q|v)_proj$")
    randomize_adapters(model, std=0.2)
    return model


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_t5_exports_with_defaults_and_takes_any_length_pair(tmp_path):
    model = _t5()
    example = {"input_ids": _tokens(2, 9, 0), "attention_mask": torch.ones(2, 9, dtype=torch.long),
               "decoder_input_ids": _tokens(2, 5, 1)}
    result = to_onnx(model, tmp_path / "t5.onnx", example_kwargs=example)
    assert result.dynamic_axes == {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq"),
                                   "decoder_input_ids": ("batch", "decoder_seq")}
    assert len(result.max_abs_diff) == 2 and max(result.max_abs_diff.values()) <= 1e-5  # (9, 5) and (6, 8)
    assert any("use_cache=False" in n for n in result.notes)
    for enc, dec in ((4, 11), (12, 1)):  # more pairs, decoder shorter and longer than the encoder
        feeds = {"input_ids": _tokens(3, enc, enc), "attention_mask": torch.ones(3, enc, dtype=torch.long),
                 "decoder_input_ids": _tokens(3, dec, dec)}
        with torch.no_grad():
            expected = model(**feeds, use_cache=False).logits
        assert (torch.from_numpy(run_onnx(result.path, feeds)[0]) - expected).abs().max() <= 1e-5


def test_whisper_exports_with_defaults_keeping_the_mel_bins_fixed(tmp_path):
    model = _whisper()
    example = {"input_features": torch.randn(2, 80, 32), "decoder_input_ids": _tokens(2, 5, 1)}
    result = to_onnx(model, tmp_path / "whisper.onnx", example_kwargs=example)
    assert result.dynamic_axes == {"input_features": ("batch",), "decoder_input_ids": ("batch", "decoder_seq")}
    assert max(result.max_abs_diff.values()) <= 1e-5


def test_t5_greedy_generation_in_onnxruntime_equals_hf_generate(tmp_path):
    model = _t5()
    ids = _tokens(2, 7, 3)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # (T5 pads on the right in practice; any mask works)
    to_onnx(model, tmp_path / "t5.onnx", example_kwargs={"input_ids": ids, "attention_mask": mask,
                                                          "decoder_input_ids": ids[:, :1]})
    gen = OnnxSeq2SeqGenerator(tmp_path / "t5.onnx", decoder_start_token_id=0, eos_token_id=1)
    ours = gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    assert torch.equal(ours, hf)


def test_a_graph_without_a_decoder_is_refused(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    to_onnx(lin, tmp_path / "lin.onnx", example_inputs=(torch.randn(2, 4),))
    with pytest.raises(ValueError, match="takes no decoder_input_ids"):
        OnnxSeq2SeqGenerator(tmp_path / "lin.onnx", decoder_start_token_id=0)
