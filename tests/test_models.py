"""The core model matrix: real transformers / timm classes from small configs, plus a module
with functional sites. Every case: sites found, class kept, init equals base, parity with the
functional oracle (float64, 1e-10), fused == unfused, unload, save → load, LoRA merge, training.
"""

from __future__ import annotations

import copy

import pytest
import torch

import aurora_fx
from tests.conftest import assert_close
from tests.models import CASES, cast_inputs, randomize_adapters, run
from tests.reference import reference_model

NAMES = list(CASES)
BATCH, SEQ = 2, 7


def _adapted(name: str, **kwargs):
    case = CASES[name]
    model = case.build()
    aurora_fx.apply(model, case.pattern, **kwargs)
    return case, model


@pytest.mark.parametrize("name", NAMES)
def test_pattern_finds_the_expected_sites(name):
    case = CASES[name]
    table = aurora_fx.sites(case.build(), case.pattern)
    assert len(table.matched) == case.sites
    assert all(s.adaptable for s in table.matched)


@pytest.mark.parametrize("name", NAMES)
def test_apply_keeps_class_and_starts_at_the_base_output(name):
    case = CASES[name]
    model = case.build()
    inputs = case.inputs(BATCH, SEQ)
    with torch.no_grad():
        base = run(case, model, inputs)
    cls = type(model)
    assert aurora_fx.apply(model, case.pattern) is model
    assert type(model) is cls
    assert len(aurora_fx.adapters(model)) == case.sites
    with torch.no_grad():
        assert torch.equal(run(case, model, inputs), base)  # B = 0: exactly the base


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_the_functional_reference_in_float64(name, fuse):
    case = CASES[name]
    model = case.build().double()
    aurora_fx.apply(model, case.pattern, fuse=fuse)
    randomize_adapters(model)
    inputs = cast_inputs(case.inputs(BATCH, SEQ), torch.float64)
    with torch.no_grad():
        actual = run(case, model, inputs)
        expected = run(case, reference_model(model), inputs)
        base = run(case, aurora_fx.unload(copy.deepcopy(model)), inputs)
    assert (actual - base).abs().max() > 1e-6  # the adapters really act (far above the tolerance)
    assert_close(actual, expected, torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_fused_and_unfused_agree_forward_and_backward(name):
    case = CASES[name]
    fused = case.build()
    aurora_fx.apply(fused, case.pattern, fuse=True)
    randomize_adapters(fused, std=0.1)
    unfused = copy.deepcopy(aurora_fx.unload(copy.deepcopy(fused)))
    aurora_fx.apply(unfused, case.pattern, fuse=False)
    unfused.load_state_dict(fused.state_dict())
    assert all(a.fused for a in aurora_fx.adapters(fused))
    assert not any(a.fused for a in aurora_fx.adapters(unfused))
    inputs = case.inputs(BATCH, SEQ)
    out_f, out_u = run(case, fused, inputs), run(case, unfused, inputs)
    assert (out_f - out_u).abs().max() <= 1e-5
    out_f.square().mean().backward()
    out_u.square().mean().backward()
    grads_u = dict(unfused.named_parameters())
    for pname, p in fused.named_parameters():
        if p.requires_grad:
            assert (p.grad - grads_u[pname].grad).abs().max() <= 1e-5, pname


@pytest.mark.parametrize("name", NAMES)
def test_unload_restores_the_exact_base(name):
    case = CASES[name]
    model = case.build()
    inputs = case.inputs(BATCH, SEQ)
    with torch.no_grad():
        base = run(case, model, inputs)
    modules_before = {n: type(m) for n, m in model.named_modules()}
    aurora_fx.apply(model, case.pattern)
    randomize_adapters(model)
    aurora_fx.unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert aurora_fx.adapters(model) == []
    with torch.no_grad():
        assert torch.equal(run(case, model, inputs), base)


@pytest.mark.parametrize("name", NAMES)
def test_disable_adapters_gives_the_base_temporarily(name):
    case = CASES[name]
    model = case.build()
    inputs = case.inputs(BATCH, SEQ)
    with torch.no_grad():
        base = run(case, model, inputs)
    aurora_fx.apply(model, case.pattern)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = run(case, model, inputs)
        with aurora_fx.disable_adapters(model):
            assert torch.equal(run(case, model, inputs), base)
        assert torch.equal(run(case, model, inputs), adapted)


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_onto_a_fresh_model_is_exact(name, tmp_path):
    case = CASES[name]
    torch.manual_seed(1)
    model = case.build()
    aurora_fx.apply(model, case.pattern)
    randomize_adapters(model)
    path = aurora_fx.save_adapters(model, tmp_path / "ckpt.safetensors")
    torch.manual_seed(1)
    fresh = case.build()
    aurora_fx.load_adapters(fresh, path)
    inputs = case.inputs(BATCH, SEQ)
    with torch.no_grad():
        assert torch.equal(run(case, fresh, inputs), run(case, model, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_lora_merge_matches_the_unmerged_model(name):
    case, model = _adapted(name, method="lora", rank=4)
    randomize_adapters(model, std=0.05)
    inputs = case.inputs(BATCH, SEQ)
    with torch.no_grad():
        unmerged = run(case, model, inputs)
        merged = run(case, aurora_fx.merge(model), inputs)
    assert aurora_fx.adapters(model) == []
    assert (merged - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["bert", "gpt2", "timm_vit", "functional"])
def test_a_few_steps_lower_the_loss_and_leave_the_base_untouched(name):
    case, model = _adapted(name)
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = aurora_fx.trainable_parameters(model)
    assert params and all(".adapter" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = case.inputs(4, SEQ)
    with torch.no_grad():
        target = torch.randn_like(run(case, model.eval(), inputs))
    def eval_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(run(case, model.eval(), inputs), target).item()

    before = eval_loss()
    for _ in range(8):  # trains in train mode (adapter and model dropout on), judged in eval mode
        loss = torch.nn.functional.mse_loss(run(case, model.train(), inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < before
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_llama_generate_config_and_save_pretrained_still_work(tmp_path):
    case, model = _adapted("llama")
    randomize_adapters(model)
    ids = torch.randint(3, 100, (1, 5))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    assert model.config.hidden_size == 64
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


def test_timm_keeps_default_cfg():
    case, model = _adapted("timm_vit")
    assert model.default_cfg["architecture"] == "vit_tiny_patch16_224"
    assert model.pretrained_cfg is model.default_cfg or model.pretrained_cfg == model.default_cfg
