"""load_peft_lora: a PEFT LoRA checkpoint becomes our LoRA adapters with PEFT's own outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import aurora_fx
from aurora_fx.checkpoint import CheckpointError
from tests.models import CASES


def _peft_folder(tmp_path, name, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    case = CASES[name]
    torch.manual_seed(5)
    base = case.build()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    return case, base, peft_model


@pytest.mark.parametrize(("name", "kwargs"), [
    ("roberta_cls", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    ("gpt2", {"r": 3, "lora_alpha": 6, "target_modules": ["c_attn"], "fan_in_fan_out": True}),
    ("llama", {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": True,
               "rank_pattern": {"v_proj": 2}}),
])
def test_peft_import_matches_peft_outputs(tmp_path, name, kwargs):
    case, base, peft_model = _peft_folder(tmp_path, name, **kwargs)
    aurora_fx.load_peft_lora(base, tmp_path / "peft")
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        ours, theirs = case.output(base(**inputs)), case.output(peft_model(**inputs))
    assert (ours - theirs).abs().max() <= 1e-5
    assert {a.method for a in aurora_fx.adapters(base)} == {"lora"}


def test_imported_lora_merges_and_exports(tmp_path):
    case, base, peft_model = _peft_folder(tmp_path, "roberta_cls", r=4, lora_alpha=8,
                                          target_modules=["query", "value"], modules_to_save=["classifier"])
    aurora_fx.load_peft_lora(base, tmp_path / "peft")
    assert all(p.requires_grad for p in base.classifier.parameters())
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        merged = aurora_fx.merge(copy.deepcopy(base))(**inputs).logits
    assert (merged - expected).abs().max() <= 1e-5


def test_non_lora_and_dora_checkpoints_are_refused(tmp_path):
    _peft_folder(tmp_path, "bert", r=2, target_modules=["query"])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="uses DoRA"):
        aurora_fx.load_peft_lora(CASES["bert"].build(), tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="'IA3' is not LoRA"):
        aurora_fx.load_peft_lora(CASES["bert"].build(), tmp_path / "peft")


def test_checkpoint_for_another_model_names_the_module(tmp_path):
    _peft_folder(tmp_path, "bert", r=2, target_modules=["query"])
    model = CASES["roberta_cls"].build()
    with pytest.raises(CheckpointError, match="PEFT module 'encoder.layer.0.attention.self.query' does not exist"):
        aurora_fx.load_peft_lora(model, tmp_path / "peft")
    assert aurora_fx.adapters(model) == []
