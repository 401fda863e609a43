"""torch.compile and HF Trainer on adapted models."""

from __future__ import annotations

import copy

import pytest
import torch

import aurora_fx
from tests.models import CASES, randomize_adapters

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["bert", "functional"])
def test_torch_compile_matches_eager_forward_and_backward(name):
    case = CASES[name]
    eager = case.build()
    aurora_fx.apply(eager, case.pattern)
    randomize_adapters(eager, std=0.1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: no graph break, also at the op
    inputs = case.inputs(2, 7)
    out_e, out_c = case.output(eager(**inputs)), case.output(compiled(**inputs))
    assert (out_e - out_c).abs().max() <= 1e-5
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    grads = dict(compiled_model.named_parameters())
    for pname, p in eager.named_parameters():
        if p.requires_grad:
            assert (p.grad - grads[pname].grad).abs().max() <= 1e-5, pname


def test_export_keeps_the_fused_op_as_one_node_per_site():
    case = CASES["llama"]
    model = case.build()
    aurora_fx.apply(model, case.pattern)
    ep = torch.export.export(model, (), kwargs=case.inputs(2, 7))
    fused_linear = torch.ops.aurora_fx.aurora_linear.default
    assert sum(n.target is fused_linear for n in ep.graph.nodes) == case.sites  # base linear + adapter, one node


def test_hf_trainer_trains_an_aurora_model_unchanged(tmp_path):
    from transformers import Trainer, TrainingArguments

    case = CASES["roberta_cls"]
    model = case.build()
    aurora_fx.apply(model, case.pattern, trainable_modules="classifier")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (64, 10), generator=g)
    labels = (ids[:, 0] > 50).long()
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=False)]
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=30, per_device_train_batch_size=16,
                             learning_rate=5e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(not torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if n in adapter_before)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    model.save_pretrained(tmp_path / "hf")  # HF's own save still works
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    path = aurora_fx.save_adapters(model, tmp_path / "adapters.safetensors")  # only the adapter (+ head)
    assert path.stat().st_size < (tmp_path / "hf" / "model.safetensors").stat().st_size / 5
