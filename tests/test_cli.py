"""Every CLI command through its entry point, on small inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import aurora_fx
from aurora_fx.cli import main
from aurora_fx.data import load_bbc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bbc_folder(tmp_path_factory):
    """A small BBC News folder of <label>/*.txt files (30 per class)."""
    root = tmp_path_factory.mktemp("bbc")
    bbc = load_bbc()
    counts: dict[int, int] = {}
    for i, (text, y) in enumerate(zip(bbc.texts, bbc.labels, strict=False)):
        if counts.get(y, 0) < 30:
            counts[y] = counts.get(y, 0) + 1
            (root / bbc.label_names[y]).mkdir(exist_ok=True)
            (root / bbc.label_names[y] / f"{i}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def trained(bbc_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "minilm", str(bbc_folder), "--steps", "6", "--max-length", "48", "--test-size", "25",
                 "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_sites_prints_the_dry_run_table(capsys):
    assert main(["sites", "minilm", "--pattern", "query|value"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.5.attention.self.value" in out and "38 sites, 12 matched by 'query|value'" in out


def test_sites_on_a_timm_model(capsys):
    assert main(["sites", "timm:resnet10t", "--pattern", "fc"]) == 0
    assert "1 matched" in capsys.readouterr().out


def test_train_end_to_end_on_a_bbc_folder(trained, capsys):
    from aurora_fx.checkpoint import read_checkpoint

    ckpt = read_checkpoint(trained / "adapters.safetensors")
    assert len(ckpt.sites) == 12 and {s.config.method for s in ckpt.sites} == {"aurora"}
    bs = [t for k, t in ckpt.tensors.items() if k.endswith("/B")]
    assert len(bs) == 12 and all(torch.count_nonzero(b) > 0 for b in bs)  # the adapters trained (B starts at 0)
    assert ckpt.trainable_modules == ("classifier",) and any(k.startswith("modules/classifier.") for k in ckpt.tensors)
    from transformers import BertForSequenceClassification

    from aurora_fx.data import minilm_path

    assert ckpt.extra["num_labels"] == len(ckpt.extra["labels"]) and ckpt.extra["steps"] == 6
    base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=ckpt.extra["num_labels"])
    aurora_fx.load_adapters(base, trained / "adapters.safetensors")  # and it loads onto a fresh base


def test_inspect_prints_the_report(trained, capsys):
    assert main(["inspect", str(trained / "adapters.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "12 adapted site(s) in BertForSequenceClassification" in out


def test_export_writes_a_verified_onnx(trained, capsys):
    target = trained / "model.onnx"
    assert main(["export", str(trained / "adapters.safetensors"), "--out", str(target)]) == 0
    assert target.is_file() and "onnxruntime vs PyTorch max abs diff" in capsys.readouterr().out


def test_bad_model_gives_an_error_exit(capsys):
    assert main(["sites", "no/such/folder"]) == 2
    assert "neither 'minilm'" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "aurora_fx.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sites" in result.stdout and "export" in result.stdout


def test_train_summary_is_json(bbc_folder, tmp_path, capsys):
    assert main(["train", "minilm", str(bbc_folder), "--method", "lora", "--steps", "2", "--max-length", "32",
                 "--test-size", "10", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"accuracy_before", "accuracy_after", "train_seconds", "checkpoint"}


def test_demo_trains_exports_and_checks_in_onnxruntime(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--test-size", "16", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy: before" in out and "onnxruntime vs PyTorch max abs diff" in out
    assert "onnxruntime predictions agree with PyTorch on" in out
    assert (tmp_path / "adapters.safetensors").is_file() and (tmp_path / "minilm_bbc_aurora.onnx").is_file()


def test_inspect_renders_the_model_map_and_one_site(trained, capsys):
    import xml.etree.ElementTree as ET

    site = "bert.encoder.layer.0.attention.self.query"
    assert main(["inspect", str(trained / "adapters.safetensors"), "--render", str(trained / "map.svg")]) == 0
    svg = ET.parse(trained / "map.svg").getroot().itertext()
    assert site in " ".join(svg) or site in (trained / "map.svg").read_text()
    assert main(["inspect", str(trained / "adapters.safetensors"), "--site", site,
                 "--render", str(trained / "site.png")]) == 0
    assert (trained / "site.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "aurora_linear(" in capsys.readouterr().out  # the site's rewritten graph code


@pytest.mark.parametrize("mode", ["static", "fit"])
def test_export_writes_a_peft_folder(trained, bbc_folder, tmp_path, capsys, mode):
    args = ["export", str(trained / "adapters.safetensors"), "--format", "peft", "--out", str(tmp_path / "peft"),
            "--mode", mode]
    if mode == "fit":
        args += ["--calibrate", str(bbc_folder), "--rank", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file() and "held-out error" in out
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_export_peft_fit_without_calibration_is_a_one_line_error(trained, tmp_path, capsys):
    code = main(["export", str(trained / "adapters.safetensors"), "--format", "peft", "--out", str(tmp_path),
                 "--mode", "fit"])
    assert code == 2 and "--mode fit needs --calibrate DATA" in capsys.readouterr().err


def test_export_picks_the_kv_cache_decoder_graph_for_a_causal_lm(tmp_path, capsys):
    import aurora_fx
    from tests.models import llama

    base = tmp_path / "tinyllama"
    llama().save_pretrained(base)
    model = aurora_fx.apply(type(llama()).from_pretrained(base), "q_proj")
    ckpt = aurora_fx.save_adapters(model, tmp_path / "run", extra={"base_model": str(base)})
    assert main(["export", str(ckpt), "--out", str(tmp_path / "llm.onnx")]) == 0
    out = capsys.readouterr().out
    assert "a causal LM, so the KV cache is an input and an output (4 past tensors)" in out
    gen = aurora_fx.export.OnnxGenerator(tmp_path / "llm.onnx")
    assert gen.generate(__import__("torch").tensor([[5, 6, 7]]), max_new_tokens=3).shape[1] <= 6
