"""The training path GPU users run, on CPU: bf16/fp16 autocast, half-precision models, GradScaler, HF Trainer.

Every method (LoRA, AuroRA fused and unfused, AROMA) on the BERT and Llama configs of tests/models.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.aroma import AromaController
from tests.models import CASES, randomize_adapters

VARIANTS = {  # name → apply kwargs
    "lora": {"method": "lora", "rank": 4},
    "aurora_fused": {"method": "aurora"},
    "aurora_unfused": {"method": "aurora", "fuse": False},
    "aroma": {"method": "aroma", "dropout": 0.0},
}
MODELS = ("bert", "llama")
BF16_REL = 3e-2  # a bf16 forward through two layers keeps ~2 significant digits of the loss


def _adapted(name: str, variant: str, dtype: torch.dtype | None = None):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    if dtype is not None:
        model = model.to(dtype)
    aurora_fx.apply(model, case.pattern, **VARIANTS[variant])
    randomize_adapters(model, std=0.1)
    return case, model


def _loss(case, model, inputs) -> torch.Tensor:
    """A fixed random readout of the output (BERT's mean square after LayerNorm would be constant)."""
    out = case.output(model(**inputs)).float()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return (out * probe).mean() + out.pow(2).mean()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_forward_and_backward_match_fp32_within_half_precision(name, variant, amp):
    case, model = _adapted(name, variant)
    inputs = case.inputs(2, 8)
    reference = _loss(case, model, inputs)
    with torch.autocast("cpu", dtype=amp):
        loss = _loss(case, model, inputs)
    assert case.output(model(**inputs)).dtype == torch.float32  # autocast ended: fp32 again
    assert abs(loss.item() - reference.item()) <= BF16_REL * abs(reference.item())
    loss.backward()
    grads = [p.grad for p in aurora_fx.trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_the_fused_op_follows_autocast_like_the_unfused_graph(name):
    case, fused = _adapted(name, "aurora_fused")
    _, unfused = _adapted(name, "aurora_unfused")  # the same seed: the same weights
    inputs = case.inputs(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = case.output(fused(**inputs)), case.output(unfused(**inputs))
    assert a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_model_trains_with_float32_adapters(name, variant, dtype):
    case, model = _adapted(name, variant, dtype)
    assert all(p.dtype == torch.float32 for p in aurora_fx.trainable_parameters(model))
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-3)
    inputs = case.inputs(2, 8)
    model.train()
    for _ in range(3):
        loss = _loss(case, model, inputs)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in aurora_fx.trainable_parameters(model)]
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in aurora_fx.trainable_parameters(model))
    assert case.output(model(**inputs)).dtype == dtype  # the model's own dtype flows on


def test_adapters_follow_an_explicit_dtype():
    case = CASES["bert"]
    model = aurora_fx.apply(case.build().to(torch.bfloat16), case.pattern, dtype=torch.bfloat16)
    assert {p.dtype for p in aurora_fx.trainable_parameters(model)} == {torch.bfloat16}


def test_a_step_the_grad_scaler_skips_is_skipped_by_the_aroma_controller():
    case, model = _adapted("llama", "aroma")
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    controller = AromaController(model, optimizer, inner_check_every=1, max_inner_steps=3)
    inputs = case.inputs(2, 8)
    for step in range(6):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss(case, model, inputs)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if step == 2:  # an overflowed gradient: the scaler skips this optimizer step
            next(iter(aurora_fx.trainable_parameters(model))).grad.fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        controller.step()
    assert controller.skipped_steps == 1 and controller.steps == 5
    assert controller.outer >= 1  # the inner loop still ran


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_hf_trainer_in_mixed_precision_runs_with_the_aroma_callback(flag, tmp_path):
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    bert = CASES["bert"].build()
    clf = BertForSequenceClassification(bert.config.__class__(**{**bert.config.to_dict(), "num_labels": 2}))
    aurora_fx.apply(clf, "query|value", method="aroma", dropout=0.0, trainable_modules="classifier")
    ids, labels = torch.randint(1, 100, (64, 10)), torch.randint(0, 2, (64,))
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]
    callback = aurora_fx.AromaCallback(inner_check_every=2, max_inner_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, **{flag: True})
    Trainer(model=clf, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.controller.steps + callback.controller.skipped_steps >= 1
    assert callback.controller.outer >= 1


@pytest.mark.slow
def test_onnx_export_of_a_half_precision_model_keeps_the_adapter_in_float32(tmp_path):
    import onnx

    case, model = _adapted("llama", "aurora_fused", torch.float16)
    inputs = case.inputs(2, 6)
    result = aurora_fx.export.to_onnx(model, tmp_path / "half.onnx", example_kwargs=inputs)
    assert max(result.max_abs_diff.values()) < 3e-2  # the default tolerance of a half model
    base = aurora_fx.export.to_onnx(aurora_fx.unload(model), tmp_path / "base.onnx", example_kwargs=inputs)

    def casts(path):
        return [n for n in onnx.load(str(path)).graph.node if n.op_type == "Cast"]

    def targets(nodes):
        return sorted(a.i for n in nodes for a in n.attribute if a.name == "to")

    added = len(casts(result.path)) - len(casts(base.path))
    assert added == 2 * 4  # x to float32 and the delta back to float16, at each of the 4 sites
    extra = targets(casts(result.path))
    for t in targets(casts(base.path)):
        extra.remove(t)
    assert extra == sorted([onnx.TensorProto.FLOAT] * 4 + [onnx.TensorProto.FLOAT16] * 4)


@pytest.mark.parametrize("method", ["aurora", "lora"])
@pytest.mark.parametrize("path", ["fused_linear", "delta_op"])
def test_a_site_under_autocast_computes_and_returns_the_autocast_dtype(method, path):
    """An adapted linear under bf16 autocast gives bf16, as nn.Linear does: on the one-op path (eval) and on
    the base-plus-delta-op path (active dropout in training), and equals the same site run in bf16."""
    torch.manual_seed(0)
    model = aurora_fx.apply(nn.Sequential(nn.Linear(32, 24)), "0", method=method, dropout=0.2)
    for p in aurora_fx.trainable_parameters(model):
        nn.init.normal_(p, 0, 0.2)
    model.train(path == "delta_op")
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        y = model(x)
    assert y.dtype == torch.bfloat16
    reference = copy.deepcopy(model).to(torch.bfloat16)
    torch.manual_seed(1)
    expected = reference(x.to(torch.bfloat16))
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_under_autocast_the_compiled_delta_op_equals_eager():
    """``aurora_delta_add``'s autocast rule: a compiled graph calls the op through the dispatcher, where only the
    rule casts its inputs as eager autocast does; without it the compiled adapter computes in float32 and lands
    one bf16 step away from eager."""
    torch.manual_seed(0)
    model = aurora_fx.apply(nn.Sequential(nn.Linear(32, 24)), "0", dropout=0.2).train()  # the delta-op path
    for p in aurora_fx.trainable_parameters(model):
        nn.init.normal_(p, 0, 0.2)
    x = torch.randn(16, 32)

    def run(f):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)
            return f(x)

    eager = run(model)
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(compiled, eager)
