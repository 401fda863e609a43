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
