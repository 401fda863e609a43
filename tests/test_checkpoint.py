"""save_adapters / load_adapters: exact round trips, errors that name the tensor, no partial loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import aurora_fx
from aurora_fx.checkpoint import CheckpointError, read_checkpoint
from tests.models import CASES, randomize_adapters


def _saved(tmp_path, name="roberta_cls", **kwargs):
    case = CASES[name]
    torch.manual_seed(3)
    model = case.build()
    aurora_fx.apply(model, case.pattern, **kwargs)
    randomize_adapters(model)
    return case, model, aurora_fx.save_adapters(model, tmp_path / "ck.safetensors", extra={"base": name})


def test_checkpoint_is_safetensors_with_a_json_config(tmp_path):
    _, model, path = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["aurora_fx"])
        keys = set(fh.keys())
    assert meta["format"] == "aurora_fx.adapters" and meta["extra"] == {"base": "roberta_cls"}
    assert {s["path"] for s in meta["sites"]} == {a.path for a in aurora_fx.adapters(model)}
    assert "adapters/roberta.encoder.layer.0.attention.self.query/Ws" in keys
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # never a pickle


def test_a_folder_path_gets_a_default_file_name(tmp_path):
    case = CASES["bert"]
    model = case.build()
    aurora_fx.apply(model, case.pattern)
    assert aurora_fx.save_adapters(model, tmp_path / "run").name == "adapters.safetensors"


def test_trainable_modules_are_saved_and_restored(tmp_path):
    case = CASES["roberta_cls"]
    torch.manual_seed(3)
    model = case.build()
    aurora_fx.apply(model, case.pattern, trainable_modules="classifier")
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.out_proj.weight.normal_()
    path = aurora_fx.save_adapters(model, tmp_path / "ck.safetensors")
    torch.manual_seed(3)
    fresh = case.build()
    aurora_fx.load_adapters(fresh, path)
    assert torch.equal(fresh.classifier.out_proj.weight, model.classifier.out_proj.weight)
    assert fresh.classifier.out_proj.weight.requires_grad
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_a_checkpoint_for_another_shape_names_the_site(tmp_path):
    _, _, path = _saved(tmp_path, "bert")
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100))
    with pytest.raises(CheckpointError, match=r"site 'encoder.layer.0.attention.self.query' was saved for "
                                              r"in_features=64.*has in_features=32"):
        aurora_fx.load_adapters(other, path)
    assert aurora_fx.adapters(other) == []


def test_a_tensor_with_the_wrong_shape_is_named_and_nothing_changes(tmp_path):
    _, _, path = _saved(tmp_path, "bert")
    ckpt = read_checkpoint(path)
    from safetensors.torch import save_file

    tensors = dict(ckpt.tensors)
    key = "adapters/encoder.layer.1.attention.self.value/H"
    tensors[key] = torch.zeros(3, 3)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    torch.manual_seed(3)
    fresh = CASES["bert"].build()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \(3, 3\) but site .* needs \(2, 2\)"):
        aurora_fx.load_adapters(fresh, bad)
    assert aurora_fx.adapters(fresh) == []
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


def test_loading_onto_an_adapted_model_is_refused(tmp_path):
    case, model, path = _saved(tmp_path, "bert")
    with pytest.raises(CheckpointError, match="already has an adapter"):
        aurora_fx.load_adapters(model, path)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_files_give_a_clear_error(tmp_path, damage):
    _, _, path = _saved(tmp_path, "bert")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated or corrupted"):
        aurora_fx.load_adapters(CASES["bert"].build(), path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint("/nonexistent/ck.safetensors")


def test_a_model_without_adapters_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="no aurora_fx adapters to save"):
        aurora_fx.save_adapters(CASES["bert"].build(), tmp_path / "x.safetensors")


def test_save_leaves_no_temporary_files(tmp_path):
    _saved(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]
