"""A method registered in this file only runs the whole pipeline: the adapter contract is enough.

apply → a training step → save → load onto a fresh model → inspect → merge → ONNX export, with a
toy method defined here (no edit to aurora_fx/), plus a DoRA-style toy that reads the base weight.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aurora_fx
from aurora_fx.config import AdapterConfig
from aurora_fx.methods.base import AdapterBase
from aurora_fx.registry import adapter_class, method_names, register_adapter, unregister_adapter
from tests.conftest import assert_close
from tests.models import CASES


@dataclass(frozen=True)
class ScaledConfig(AdapterConfig):
    rank: int = 3
    alpha: float = 2.0
    method: ClassVar[str] = "toy_scaled"


class ScaledAdapter(AdapterBase):
    """``Δ(x) = g·s·B·A·x``: LoRA with one learned gain g."""

    config_class = ScaledConfig

    def __init__(self, in_features, out_features, config, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config)
        self.A = nn.Parameter(torch.randn(config.rank, in_features, device=device, dtype=dtype) / in_features**0.5)
        self.B = nn.Parameter(torch.zeros(out_features, config.rank, device=device, dtype=dtype))
        self.g = nn.Parameter(torch.ones((), device=device, dtype=dtype))

    def forward(self, x):
        return self.oracle_delta(self._input(x, self.A))

    def oracle_delta(self, x):
        return F.linear(F.linear(x, self.A), self.B) * (self.g * self.scale)

    def delta_weight(self, lossy=False):
        return (self.B @ self.A) * (self.g * self.scale)


@pytest.fixture(autouse=True, scope="module")
def _toy_methods():
    """Register the toys for this file's tests only (the registry is process-wide)."""
    register_adapter(ScaledAdapter)
    register_adapter(GainAdapter)
    yield
    unregister_adapter("toy_scaled")
    unregister_adapter("toy_gain")


def test_a_method_registered_in_a_test_file_runs_the_whole_pipeline(tmp_path):
    case = CASES["bert"]
    base = case.build()
    model = aurora_fx.apply(copy.deepcopy(base), case.pattern, method="toy_scaled")
    inputs = case.inputs(2, 7)
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-2)
    case.output(model(**inputs)).pow(2).mean().backward()
    optimizer.step()
    assert all(a.method == "toy_scaled" and a.num_params == 3 * 128 + 1 for a in aurora_fx.adapters(model))
    assert model.encoder.layer[0].attention.self.query.adapter.B.abs().max() > 0  # it trained
    path = aurora_fx.save_adapters(model, tmp_path)
    fresh = aurora_fx.load_adapters(copy.deepcopy(base), path)
    expected = case.output(model(**inputs)).detach()
    assert_close(case.output(fresh(**inputs)).detach(), expected)
    assert "toy_scaled" in aurora_fx.inspect(fresh).table()
    result = aurora_fx.export.to_onnx(fresh, tmp_path / "toy.onnx", example_kwargs=inputs)
    assert max(result.max_abs_diff.values()) < 1e-4
    merged = aurora_fx.merge(fresh)
    assert not aurora_fx.adapters(merged)
    assert_close(case.output(merged(**inputs)).detach(), expected, atol=1e-5)


def test_the_cli_and_make_config_know_a_registered_method():
    from aurora_fx.cli import build_parser

    assert "toy_scaled" in method_names()
    args = build_parser().parse_args(["train", "minilm", "bbc", "--method", "toy_scaled"])
    assert args.method == "toy_scaled"
    assert adapter_class("toy_scaled") is ScaledAdapter


@dataclass(frozen=True)
class GainConfig(ScaledConfig):
    method: ClassVar[str] = "toy_gain"


class GainAdapter(AdapterBase):
    """``Δ(x) = (g − 1) ⊙ (W0·x)``: a per-output gain, which needs the base weight (like DoRA)."""

    config_class = GainConfig
    reads_base_weight = True

    def __init__(self, in_features, out_features, config, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config)
        self.g = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def forward(self, x, weight):
        return F.linear(x, weight) * (self.g - 1)


@pytest.mark.parametrize("name", ["bert", "gpt2"])  # nn.Linear (out_in) and Conv1D (in_out)
def test_an_adapter_that_reads_the_base_weight_gets_it_as_out_by_in(name):
    case = CASES[name]
    model = aurora_fx.apply(case.build(), case.pattern, method="toy_gain")
    with torch.no_grad():
        for _, _, adapter in aurora_fx.inventory.adapter_modules(model):
            adapter.g.fill_(2.0)  # doubles every adapted projection
        site = aurora_fx.adapters(model)[0].path
        owner = model.get_submodule(site)
        x = torch.randn(3, owner.adapter.in_features)
        base = aurora_fx.unload(copy.deepcopy(model)).get_submodule(site)
    assert_close(owner(x), 2 * base(x))


def test_registering_a_second_class_under_a_taken_name_is_refused():
    class Other(AdapterBase):
        config_class = ScaledConfig

    with pytest.raises(ValueError, match="'toy_scaled' is already registered by .*ScaledAdapter"):
        register_adapter(Other)
    with pytest.raises(TypeError, match="needs a config_class"):
        register_adapter(type("NoConfig", (AdapterBase,), {}))
