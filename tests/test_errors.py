"""The bad-input matrix: every misuse raises a clear error naming the bad value and the fix.

Each case is (id, a call that must fail, the exception type, a regex the message must match).
The regexes check both halves of a good message: what is wrong, and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import aurora_fx
from aurora_fx.aroma import AromaController
from aurora_fx.checkpoint import CheckpointError, read_checkpoint
from aurora_fx.config import AuroraConfig, LoraConfig
from aurora_fx.data import load_text_data, split
from aurora_fx.export import ExportVerificationError, to_onnx
from aurora_fx.registry import make_config
from aurora_fx.render import render_map
from tests.models import CASES


class ReadsChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return nn.functional.linear(x, self.proj.weight)  # bypasses proj.forward


def small() -> nn.Module:
    """The same base weights every time (loads check the base they were saved from)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def adapted(method: str = "aurora") -> nn.Module:
    return aurora_fx.apply(small(), r"^0$", method=method, **({"dropout": 0.0} if method == "aroma" else {}))


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return F.linear(x * 2 if self.training else x, self.w)


def int_weights() -> nn.Module:
    model = small()
    model[0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    return model


def mixed_devices() -> nn.Module:
    model = small()
    model[0].bias = nn.Parameter(torch.zeros(8, device="meta"))
    return model


def meta_model() -> nn.Module:
    with torch.device("meta"):
        model = small()
    return aurora_fx.apply(model, r"^0$")


def saved(tmp: Any, method: str = "aurora") -> Any:
    return aurora_fx.save_adapters(adapted(method), tmp / f"{method}.safetensors")


def rewrite_checkpoint(tmp: Any, edit: Callable[[dict, dict], None]) -> Any:
    path = saved(tmp)
    ckpt = read_checkpoint(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["aurora_fx"])
    tensors = dict(ckpt.tensors)
    edit(meta, tensors)
    out = tmp / "edited.safetensors"
    save_file(tensors, str(out), metadata={"aurora_fx": json.dumps(meta)})
    return out


def corrupt(tmp: Any, how: str) -> Any:
    path = saved(tmp)
    data = path.read_bytes()
    path.write_bytes(data[:40] if how == "truncate" else b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + data[16:])
    return path


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Any], Any]
    exc: type[BaseException]
    match: str


CASES_ERR = [
    Case("model-not-a-module", lambda t: aurora_fx.apply("bert", "query"), TypeError,
         r"model must be a torch.nn.Module, got str; pass the model object itself"),
    Case("sites-not-a-module", lambda t: aurora_fx.sites(42), TypeError, r"got int"),
    Case("invalid-regex", lambda t: aurora_fx.apply(small(), "attn[proj"), ValueError,
         r"invalid regex 'attn\[proj'.*re\.escape"),
    Case("pattern-wrong-type", lambda t: aurora_fx.apply(small(), 42), TypeError,
         r"pattern must be a regex string, a list of regex strings or a callable.*got 42"),
    Case("pattern-matches-nothing", lambda t: aurora_fx.apply(small(), "query"), ValueError,
         r"pattern 'query' matched no site.*Sites that could match: 0, 2"),
    Case("rank-zero", lambda t: aurora_fx.apply(small(), "0", rank=0), ValueError,
         r"rank must be a positive integer, got 0; use e\.g\. rank=2"),
    Case("rank-negative", lambda t: aurora_fx.apply(small(), "0", method="lora", rank=-3), ValueError,
         r"rank must be a positive integer, got -3"),
    Case("rank-too-large", lambda t: aurora_fx.apply(small(), "^2$", rank=5), ValueError,
         r"(?s)2: rank 5 > min\(in_features=8, out_features=4\).*Narrow the pattern"),
    Case("alpha-zero", lambda t: aurora_fx.apply(small(), "0", alpha=0.0), ValueError,
         r"alpha must be a finite number > 0, got 0\.0; the scale is alpha / rank"),
    Case("alpha-nan", lambda t: LoraConfig(alpha=float("nan")), ValueError, r"got nan"),
    Case("dropout-one", lambda t: aurora_fx.apply(small(), "0", dropout=1.0), ValueError,
         r"dropout must be a probability in \[0, 1\), got 1\.0; use 0\.0 to disable it"),
    Case("dropout-negative", lambda t: aurora_fx.apply(small(), "0", dropout=-0.1), ValueError, r"got -0\.1"),
    Case("unknown-method", lambda t: aurora_fx.apply(small(), "0", method="dora"), ValueError,
         r"unknown method 'dora'; choose one of \['aroma', 'aurora', 'lora'\]"),
    Case("config-and-fields", lambda t: make_config(config=AuroraConfig(), rank=3), ValueError,
         r"pass either config=\.\.\. or rank/alpha/dropout, not both"),
    Case("bad-grid", lambda t: AuroraConfig(grid_range=(1.0, 1.0)), ValueError, r"lo < hi, got \(1\.0, 1\.0\)"),
    Case("apply-twice", lambda t: aurora_fx.apply(adapted(), r"^0$"), ValueError,
         r"0: already has an adapter \(aurora\); call aurora_fx\.unload\(model\) first"),
    Case("integer-weights", lambda t: aurora_fx.apply(int_weights(), r"^0$"), ValueError,
         r"weight dtype torch\.int8 is not floating point.*dequantize the layer first"),
    Case("quantized-module", lambda t: aurora_fx.apply(
        torch.ao.quantization.quantize_dynamic(small(), {nn.Linear}, dtype=torch.qint8), r"^0$"), ValueError,
         r"matches quantized module\(s\) \['0'\].*supported quantized bases.*dequantize these layers"),
    Case("meta-device-training", lambda t: aurora_fx.trainable_parameters(meta_model()), ValueError,
         r"on the meta device.*load real weights first"),
    Case("mixed-devices", lambda t: aurora_fx.apply(mixed_devices(), r"^0$"), ValueError,
         r"0 has parameters on several devices \(cpu, meta\); move the module to one device"),
    Case("bypassed-site", lambda t: aurora_fx.apply(nn.Sequential(ReadsChild()), "proj"), ValueError,
         r"reads proj.weight directly, so an adapter on proj could be silently bypassed"),
    Case("untraceable-site", lambda t: aurora_fx.apply(nn.Sequential(ModeDependent()), r"0\.w"), ValueError,
         r"reaches 0 \(ModeDependent\), whose own forward torch\.fx cannot trace alone.*Make that forward traceable"),
    Case("trainable-modules-nothing", lambda t: aurora_fx.apply(small(), "0", trainable_modules="head"), ValueError,
         r"trainable_modules 'head' matched no module.*top-level modules: 0, 1, 2"),
    Case("aurora-merge-not-lossy", lambda t: aurora_fx.merge(adapted()), ValueError,
         r"cannot be merged exactly.*Pass lossy=True"),
    Case("save-without-adapters", lambda t: aurora_fx.save_adapters(small(), t / "x.safetensors"), ValueError,
         r"no aurora_fx adapters to save; call aurora_fx\.apply"),
    Case("load-missing-file", lambda t: aurora_fx.load_adapters(small(), t / "nope.safetensors"), CheckpointError,
         r"no checkpoint at .*nope\.safetensors'; save one with aurora_fx\.save_adapters"),
    Case("load-truncated", lambda t: aurora_fx.load_adapters(small(), corrupt(t, "truncate")), CheckpointError,
         r"not a readable safetensors file.*truncated or corrupted"),
    Case("load-corrupted-header", lambda t: aurora_fx.load_adapters(small(), corrupt(t, "header")), CheckpointError,
         r"not a readable safetensors file.*save it again"),
    Case("load-wrong-shape", lambda t: aurora_fx.load_adapters(nn.Sequential(nn.Linear(6, 8)), saved(t)),
         CheckpointError, r"saved for in_features=8, out_features=8, but the model's site has in_features=6"),
    Case("load-unknown-method", lambda t: aurora_fx.load_adapters(small(), rewrite_checkpoint(
        t, lambda m, x: m["sites"][0]["config"].update(method="dora"))), CheckpointError,
         r"invalid site record: unknown adapter method 'dora'"),
    Case("load-wrong-method", lambda t: aurora_fx.load_adapters(small(), rewrite_checkpoint(
        t, lambda m, x: m["sites"][0].update(config=LoraConfig(rank=2).to_dict()))), CheckpointError,
         r"has tensor\(s\) \['adapters/0/H', 'adapters/0/Ws'\] that a lora adapter does not have.*disagree"),
    Case("load-missing-tensor", lambda t: aurora_fx.load_adapters(small(), rewrite_checkpoint(
        t, lambda m, x: x.pop("adapters/0/Ws"))), CheckpointError, r"lacks tensor\(s\) \['adapters/0/Ws'\]"),
    Case("load-wrong-site", lambda t: aurora_fx.load_adapters(small(), rewrite_checkpoint(
        t, lambda m, x: m["sites"][0].update(path="encoder.query"))), CheckpointError,
         r"checkpoint site 'encoder\.query' does not exist.*its sites include: 0, 2"),
    Case("load-not-ours", lambda t: (save_file({"w": torch.zeros(1)}, str(t / "o.safetensors")),
                                     aurora_fx.load_adapters(small(), t / "o.safetensors")), CheckpointError,
         r"has no aurora_fx metadata.*load_peft_lora"),
    Case("load-onto-adapted", lambda t: aurora_fx.load_adapters(adapted(), saved(t)), CheckpointError,
         r"already has an adapter \(aurora\); call aurora_fx.unload\(model\) first"),
    Case("controller-without-aroma", lambda t: AromaController(adapted(), torch.optim.Adam(
        aurora_fx.trainable_parameters(adapted()))), ValueError,
         r"needs AROMA adapters.*apply\(model, pattern, method='aroma'\)"),
    Case("controller-bad-arg", lambda t: AromaController(adapted("aroma"), torch.optim.Adam(
        aurora_fx.trainable_parameters(adapted("aroma"))), inner_check_every=0), ValueError,
         r"inner_check_every must be an integer >= 1, got 0"),
    Case("controller-wrong-optimizer", lambda t: AromaController(adapted("aroma"), torch.optim.Adam(
        [nn.Parameter(torch.zeros(1))])), ValueError,
         r"optimizer does not hold the AROMA parameters.*trainable_parameters\(model\) after apply"),
    Case("export-rejected-inputs", lambda t: to_onnx(CASES["bert"].build(), t / "m.onnx",
                                                     example_kwargs={"input_ids": torch.zeros(2, 3)}), ValueError,
         r"the model rejects the example inputs.*pass inputs that model\(\*example_inputs"),
    Case("export-no-inputs", lambda t: to_onnx(small(), t / "m.onnx"), ValueError,
         r"needs example_inputs=\(\.\.\.\) or example_kwargs"),
    Case("export-tolerance", lambda t: to_onnx(adapted(), t / "m.onnx", (torch.randn(2, 8),), atol=1e-30),
         ExportVerificationError, r"onnxruntime differs from PyTorch by max abs .* \(> atol 1e-30\).*should not be"),
    Case("render-bad-suffix", lambda t: render_map(aurora_fx.inspect(adapted()), t / "x.jpg"), ValueError,
         r"render to a \.svg or \.png file, got .*x\.jpg"),
    Case("report-unknown-site", lambda t: aurora_fx.inspect(adapted()).code("2"), KeyError,
         r"no adapted site '2'; adapted sites: 0"),
    Case("data-unknown-source", lambda t: load_text_data("imagenet"), ValueError,
         r"neither 'bbc', 'tweets', a folder of <label>/\*\.txt nor a \.csv file"),
    Case("data-split-too-big", lambda t: split(load_text_data("bbc"), 5000), ValueError,
         r"asks for 5000 of 2225 examples for testing; use a count in 1\.\.2224"),
]


@pytest.mark.parametrize("case", CASES_ERR, ids=[c.id for c in CASES_ERR])
def test_misuse_raises_a_clear_error(case, tmp_path):
    with pytest.raises(case.exc, match=case.match):
        case.call(tmp_path)


def test_the_matrix_holds_at_least_30_distinct_misuses():
    assert len({c.id for c in CASES_ERR}) == len(CASES_ERR) >= 30


def test_a_failed_load_leaves_the_model_unchanged(tmp_path):
    model = small()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = rewrite_checkpoint(tmp_path, lambda m, x: x.__setitem__("adapters/0/H", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"tensor 'adapters/0/H' has shape \(3, 3\) but site '0' needs \(2, 2\)"):
        aurora_fx.load_adapters(model, bad)
    assert aurora_fx.adapters(model) == [] and type(model[0]) is nn.Linear
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
