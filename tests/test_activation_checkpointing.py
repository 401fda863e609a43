"""Activation checkpointing with adapters: the recomputed forward draws the same dropout masks.

HF ``gradient_checkpointing_enable()`` on the Llama config and ``torch.utils.checkpoint`` around
blocks, for every method with adapter dropout 0.1, eager and under ``torch.compile``: the gradients
equal the un-checkpointed ones (fp32, relative 1e-6 eager; 1e-5 when compiled, where the compiled
forward and the eager recompute may run different kernels for the same math). A control run that
does not restore the RNG state shows the comparison can fail.

``test_mask_is_the_same_when_compiled_and_eager_paths_mix`` guards the class of bug without depending
on how a transformers version places its checkpoints: a block runs compiled in the forward and is
recomputed eagerly in the backward (and the reverse). With a mask drawn one way eagerly and another
way when traced (the ``InputDropout`` before the ``aurora_fx::keep_mask`` op), the worst relative
gradient difference is about 1.
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
REL_COMPILED = 1e-5  # compiled forward vs eager recompute: same math, different kernels (fp32 rounding)


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
    assert _worst(_grads(plain, backend), _grads(ckpt, backend)) <= REL_COMPILED


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


class _Pair(nn.Module):
    """Two sites reading one input (as q_proj and v_proj do): their masks must not trade places."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q = nn.Linear(16, 32)
        self.v = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.nn.functional.gelu(self.q(h)) * self.v(h))


class _Mixed(nn.Module):
    """Runs ``block`` compiled on odd calls and eagerly on even ones, or the reverse.

    Under the reentrant ``checkpoint`` the forward (no grad) is the first call and the recompute in the
    backward the second, so one path draws the forward's dropout masks and the other the recomputed
    ones. (The non-reentrant checkpoint refuses such a mix outright: the two paths save different tensors.)
    """

    def __init__(self, block: nn.Module, compiled_first: bool, backend: str) -> None:
        super().__init__()
        self.block = block
        self.compiled = torch.compile(block, backend=backend, fullgraph=True)
        self.compiled_first = compiled_first
        self.calls = 0

    def forward(self, x):
        first = self.calls % 2 == 0
        self.calls += 1
        return (self.compiled if first == self.compiled_first else self.block)(x)


MIXED = [*((v, "aot_eager") for v in VARIANTS), ("lora", "inductor"), ("aurora_fused", "inductor")]


@pytest.mark.slow
@pytest.mark.parametrize("compiled_first", [True, False], ids=["compiled_forward", "compiled_recompute"])
@pytest.mark.parametrize("variant, backend", MIXED)
def test_mask_is_the_same_when_compiled_and_eager_paths_mix(variant, backend, compiled_first):
    torch.manual_seed(0)
    block = aurora_fx.apply(_Pair(), r"^(q|v|out)$", dropout=0.1, **VARIANTS[variant])
    randomize_adapters(block, std=0.1)
    block.train()
    mixed = _Mixed(block, compiled_first, backend)
    x = torch.randn(8, 16, requires_grad=True)  # the reentrant checkpoint needs an input that requires grad
    grads = []
    for run in (lambda: block(x), lambda: checkpoint(mixed, x, use_reentrant=True)):
        block.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        run().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad})
    assert mixed.calls == 2  # the forward and its recompute, one on each path
    assert _worst(*grads) <= REL_COMPILED
