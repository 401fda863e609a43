"""Surgery on a Llama-2-7B-shaped model built on the meta device (no memory)."""

from __future__ import annotations

import pytest
import torch

import aurora_fx

pytestmark = pytest.mark.slow
PATTERN = r"(q|k|v|o|gate|up|down)_proj"


def test_llama_7b_shape_finds_and_adapts_224_sites():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert len(aurora_fx.sites(model, PATTERN).matched) == 224
    aurora_fx.apply(model, PATTERN)
    infos = aurora_fx.adapters(model)
    assert len(infos) == 224 and all(a.rank == 2 for a in infos)
    # per layer: q,k,v,o 2·(4096+4096) each, gate/up 2·(4096+11008), down 2·(11008+4096); +20 each
    per_layer = 4 * 2 * 8192 + 3 * 2 * 15104 + 7 * 20
    assert sum(a.num_params for a in infos) == 32 * per_layer
    assert all(p.is_meta for p in model.parameters())
