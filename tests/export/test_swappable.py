"""One base ONNX graph, two fine-tunes: each adapter file reproduces its own PyTorch model."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.export import SwappableSession, save_adapter_weights, to_onnx_swappable
from tests.conftest import ORT_ATOL
from tests.models import CASES, randomize_adapters

pytestmark = pytest.mark.slow


def _two_finetunes(name, **kwargs):
    case = CASES[name]
    base = case.build()
    tunes = []
    for seed in (1, 2):
        model = copy.deepcopy(base)
        aurora_fx.apply(model, case.pattern, **kwargs)
        torch.manual_seed(seed)
        randomize_adapters(model, std=0.2)
        tunes.append(model)
    return case, base, tunes


@pytest.mark.parametrize(("name", "kwargs"), [("bert", {}), ("llama", {"method": "lora", "rank": 4})])
def test_two_adapter_files_reproduce_their_models_from_one_graph(tmp_path, name, kwargs):
    case, base, (tune_a, tune_b) = _two_finetunes(name, **kwargs)
    to_onnx_swappable(tune_a, tmp_path / "base.onnx", example_kwargs=case.inputs(2, 7))
    files = [save_adapter_weights(m, tmp_path / f"{i}.onnx_adapter") for i, m in enumerate((tune_a, tune_b))]
    session = SwappableSession(tmp_path / "base.onnx")
    inputs = case.inputs(3, 5)  # another shape than the export's
    outputs = {}
    with torch.no_grad():
        for model, path in zip((tune_a, tune_b), files, strict=False):
            expected = case.output(model(**inputs))
            got = torch.from_numpy(session.run(inputs, adapter=path)[0])
            assert (got - expected).abs().max() <= ORT_ATOL
            outputs[str(path)] = got
        base_out = torch.from_numpy(session.run(inputs)[0])  # no adapter: zero-effect defaults
        assert (base_out - case.output(base(**inputs))).abs().max() <= ORT_ATOL
    assert (outputs[str(files[0])] - outputs[str(files[1])]).abs().max() > 1e-3


def test_adapter_tensors_are_overridable_inputs_with_zero_defaults(tmp_path):
    case, _, (tune, _) = _two_finetunes("bert")
    to_onnx_swappable(tune, tmp_path / "base.onnx", example_kwargs=case.inputs(2, 7))
    proto = onnx.load(str(tmp_path / "base.onnx"))
    inputs = {i.name for i in proto.graph.input}
    adapter_inits = [t for t in proto.graph.initializer if ".adapter" in t.name]
    assert adapter_inits and all(t.name in inputs for t in adapter_inits)
    assert all(not onnx.numpy_helper.to_array(t).any() for t in adapter_inits)


def test_aroma_fine_tunes_with_different_grown_ranks_share_one_graph(tmp_path):
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    tunes = []
    for grown in (1, 3):
        model = copy.deepcopy(base)
        aurora_fx.apply(model, r"^0$", method="aroma", dropout=0.0)
        randomize_adapters(model)
        for _ in range(grown):
            model[0].adapter.merge_active()
        randomize_adapters(model)
        tunes.append(model)
    x = torch.randn(4, 8)
    to_onnx_swappable(tunes[0], tmp_path / "base.onnx", example_inputs=(x,))
    session = SwappableSession(tmp_path / "base.onnx")
    for i, model in enumerate(tunes):
        path = save_adapter_weights(model, tmp_path / f"{i}.onnx_adapter")
        with torch.no_grad():
            got = torch.from_numpy(session.run({session.data_inputs[0]: x}, adapter=path)[0])
            assert (got - model(x)).abs().max() <= 1e-5
