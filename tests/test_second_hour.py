"""The second hour of a new user: things that failed or went wrong without a word, one test each."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import aurora_fx
from tests.conftest import assert_close
from tests.models import randomize_adapters


def _encoder(nested: bool = True) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_with_a_padding_mask_runs_the_adapters(grad):
    enc = aurora_fx.apply(_encoder(), "linear1|linear2")
    randomize_adapters(enc)
    reference = copy.deepcopy(enc)  # the same weights on the dense path
    reference.use_nested_tensor = False
    x = torch.randn(2, 10, 64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 7:] = True
    with torch.set_grad_enabled(grad):
        out = enc(x, src_key_padding_mask=mask)
        expected = reference(x, src_key_padding_mask=mask)
        bare = aurora_fx.unload(copy.deepcopy(enc))(x, src_key_padding_mask=mask)
    keep = ~mask
    assert_close(out[keep], expected[keep])
    assert not torch.allclose(out[keep], bare[keep], atol=1e-3)  # the adapters act
    unloaded = aurora_fx.unload(enc)
    assert unloaded.use_nested_tensor is True  # the fast path comes back with the base


def test_a_finished_aroma_model_comes_back_from_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.models import CASES

    case = CASES["llama"]
    model = aurora_fx.apply(case.build(), case.pattern, method="aroma")
    controller = aurora_fx.AromaController(model, torch.optim.SGD(aurora_fx.trainable_parameters(model), lr=0.0),
                                           max_inner_steps=1)
    randomize_adapters(model, std=0.1)
    controller._outer_step()  # one merged piece per site
    randomize_adapters(model, std=0.1)
    controller.finalize()  # what AromaCallback does at the end of training: every site frozen
    model.save_pretrained(tmp_path)
    back = aurora_fx.from_pretrained(LlamaForCausalLM, tmp_path)
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert_close(back.eval()(**inputs).logits, model.eval()(**inputs).logits)
    assert [a.rank for a in aurora_fx.adapters(back)] == [a.rank for a in aurora_fx.adapters(model)]
