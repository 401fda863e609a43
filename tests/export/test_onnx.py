"""to_onnx: adapters baked in, standard ops only, verified in onnxruntime at two shapes."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

import aurora_fx
from aurora_fx.export import ExportVerificationError, run_onnx, to_onnx
from tests.conftest import ORT_ATOL
from tests.models import CASES, randomize_adapters

pytestmark = pytest.mark.slow
STANDARD_DOMAINS = {"", "ai.onnx"}


def _adapted(name, **kwargs):
    case = CASES[name]
    model = case.build()
    aurora_fx.apply(model, case.pattern, **kwargs)
    randomize_adapters(model, std=0.2)
    return case, model


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "timm_vit"])
def test_aurora_models_export_and_match_in_onnxruntime(name, tmp_path):
    case, model = _adapted(name)
    result = to_onnx(model, tmp_path / f"{name}.onnx", example_kwargs=case.inputs(2, 7))
    assert len(result.max_abs_diff) == 2  # the example and a second, differently shaped input
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= STANDARD_DOMAINS
    assert not proto.functions or all(n.domain in STANDARD_DOMAINS for f in proto.functions for n in f.node)
    assert result.adapter_nodes > 0  # the adapter is recognisable by name
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.onnx"]  # one self-contained file, no temp left


def test_adapter_weights_are_initializers_and_change_the_output(tmp_path):
    case, model = _adapted("bert")
    inputs = case.inputs(2, 7)
    result = to_onnx(model, tmp_path / "m.onnx", example_kwargs=inputs)
    names = {i.name for i in onnx.load(str(result.path)).graph.initializer}
    assert any("adapter" in n and n.endswith("Ws") for n in names)
    with torch.no_grad(), aurora_fx.disable_adapters(model):
        base = model(**inputs).last_hidden_state
    got = torch.from_numpy(run_onnx(result.path, inputs)[0])
    assert (got - base).abs().max() > 1e-3


def test_merged_lora_is_exactly_the_base_graph(tmp_path):
    case = CASES["bert"]
    base = case.build()
    inputs = case.inputs(2, 7)
    base_ops = Counter(to_onnx(base, tmp_path / "base.onnx", example_kwargs=inputs).op_counts)
    aurora_fx.apply(base, case.pattern, method="lora", rank=4)
    randomize_adapters(base, std=0.05)
    merged = to_onnx(base, tmp_path / "merged.onnx", example_kwargs=inputs, merge=True)
    unmerged = to_onnx(base, tmp_path / "unmerged.onnx", example_kwargs=inputs)
    assert Counter(merged.op_counts) == base_ops
    assert sum(unmerged.op_counts.values()) > sum(base_ops.values())
    assert aurora_fx.adapters(base)  # exporting merged never touches the user's model


def test_merged_aurora_needs_lossy(tmp_path):
    case, model = _adapted("bert")
    with pytest.raises(ValueError, match="lossy=True"):
        to_onnx(model, tmp_path / "m.onnx", example_kwargs=case.inputs(2, 7), merge=True)


def test_inputs_the_model_rejects_give_a_clear_error(tmp_path):
    case, model = _adapted("bert")
    with pytest.raises(ValueError, match="the model rejects the example inputs"):
        to_onnx(model, tmp_path / "m.onnx", example_kwargs={"input_ids": torch.randn(2, 3, 4)})
    assert not (tmp_path / "m.onnx").exists()


def test_a_too_strict_tolerance_raises_with_the_difference(tmp_path):
    case, model = _adapted("functional")
    with pytest.raises(ExportVerificationError, match=r"max abs .* \(> atol 1e-30\)"):
        to_onnx(model, tmp_path / "m.onnx", example_kwargs=case.inputs(2, 7), atol=1e-30)


def test_external_data_on_request(tmp_path):
    case, model = _adapted("functional")
    result = to_onnx(model, tmp_path / "m.onnx", example_kwargs=case.inputs(2, 7), external_data=True)
    assert (tmp_path / "m.onnx.data").is_file() and max(result.max_abs_diff.values()) <= ORT_ATOL


def test_feature_inputs_keep_their_width_and_nan_propagates(tmp_path):
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    aurora_fx.apply(model, "0")
    randomize_adapters(model)
    model.eval()  # the reference below: no dropout
    x = torch.randn(6, 4) * torch.tensor([0.1, 1.0, 10.0, 30.0])  # far outside the spline grid too
    result = to_onnx(model, tmp_path / "m.onnx", (x[:4],))
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    x[2, 1] = float("nan")
    got = run_onnx(result.path, {result.input_names[0]: x})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.isnan(got[2]).all() and np.isfinite(np.delete(got, 2, 0)).all()
    assert np.abs(np.delete(got, 2, 0) - np.delete(expected, 2, 0)).max() <= ORT_ATOL


@pytest.mark.parametrize(("grid_size", "grid_range"), [(5, (-1.0, 1.0)), (8, (-2.0, 0.5))])
def test_closed_form_spline_matches_across_on_and_beyond_the_knots(grid_size, grid_range, tmp_path):
    import numpy as np

    from aurora_fx.config import AuroraConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    aurora_fx.apply(model, "0", config=AuroraConfig(grid_size=grid_size, grid_range=grid_range))
    randomize_adapters(model, std=0.5)
    model.eval()  # the reference below: no dropout
    site = model[0]
    with torch.no_grad():
        site.adapter.A.copy_(torch.tensor([[1.0, 0.0], [0.0, -0.5]]))  # z = (u, -u/2): both sweep the grid
    lo, hi = grid_range
    h = (hi - lo) / grid_size
    knots = lo + h * np.arange(-3, grid_size + 4)
    sweep = np.concatenate([np.linspace(lo - 5 * h, hi + 5 * h, 997), knots, knots + 1e-4, knots - 1e-4,
                            -2 * knots, [0.0]])
    x = torch.tensor(sweep, dtype=torch.float32).unsqueeze(-1).expand(-1, 2).contiguous()
    result = to_onnx(model, tmp_path / "m.onnx", (x[:5],))
    got = run_onnx(result.path, {result.input_names[0]: x})[0]
    with torch.no_grad():
        expected = model(x).numpy()
        base = torch.nn.functional.linear(x, site.weight, site.bias).numpy()
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(expected - base).max() > 1e-2  # the adapter is not silently zero


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_batch_of_one_example_exports_a_graph_for_any_batch(name, tmp_path):
    """torch.export fixes a size-1 axis; to_onnx traces a tiled copy, so batch 1 still exports dynamic."""
    case, model = _adapted(name)
    ids = case.inputs(1, 7)["input_ids"]  # no attention mask: nothing else carries the batch axis
    result = to_onnx(model, tmp_path / f"{name}.onnx", example_kwargs={"input_ids": ids})
    assert sorted(result.max_abs_diff) == [(1, 7), (2, 10)]  # the example and batch 2 both run
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), dims  # symbolic batch and sequence axes
