"""Activation checkpointing with adapters: the recomputed forward draws the same dropout masks.

HF ``gradient_checkpointing_enable()`` on the Llama config and ``torch.utils.checkpoint`` around
blocks, for every method with adapter dropout 0.1, eager and under ``torch.compile``: the gradients
equal the un-checkpointed ones (fp32, relative 1e-6). A control run that does not restore the RNG
state shows the comparison can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import aurora_fx
from tests.models import CASES, randomize_adapters

VARIANTS = {"lora": {"method": "lora", "rank": 4}, "aurora_fused": {"method": "aurora"},
            "aurora_unfused": {"method": "aurora", "fuse": False}, "aroma": {"method": "aroma"}}
REL = 1e-6


def _model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    case = CASES["llama"]
    model = aurora_fx.apply(case.build(), case.pattern, dropout=0.1, **VARIANTS[variant])
    randomize_adapters(model, std=0.1)
    return model.train()


def _grads(model: nn.Module, compile_backend: str | None = None) -> dict[str, torch.Tensor]:
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    torch.manual_seed(4)
    inputs = CASES["llama"].inputs(2, 8)  # the same inputs ...
    torch.manual_seed(5)  # ... and the same dropout masks in both runs' forwards
    logits = run(**inputs).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * probe).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_gradient_checkpointing_gives_the_same_gradients(variant):
    plain = _model(variant)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    assert _worst(_grads(plain), _grads(ckpt)) <= REL


def test_the_comparison_sees_dropout_masks_that_differ():
    plain = _model("aurora_fused")
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"preserve_rng_state": False,
                                                                      "use_reentrant": False})
    assert _worst(_grads(plain), _grads(ckpt)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("variant, backend", [*((v, "aot_eager") for v in VARIANTS), ("aurora_fused", "inductor"),
                                              ("lora", "inductor")])
def test_checkpointed_gradients_match_under_torch_compile(variant, backend):
    plain = _model(variant)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    assert _worst(_grads(plain, backend), _grads(ckpt, backend)) <= REL


class _Blocks(nn.Module):
    """Two MLP blocks, each run under torch.utils.checkpoint when ``checkpointed``."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2))
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x))
        return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_utils_checkpoint_around_blocks_gives_the_same_gradients(variant):
    torch.manual_seed(0)
    plain = aurora_fx.apply(_Blocks(False), r"blocks\.\d\.(0|2)$", dropout=0.1, **VARIANTS[variant])
    randomize_adapters(plain, std=0.1)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointed = True
    x = torch.randn(8, 16)
    grads = []
    for model in (plain.train(), ckpt.train()):
        torch.manual_seed(5)
        model(x).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert _worst(*grads) <= REL
