"""export.to_peft: standard PEFT LoRA folders, loaded by real PEFT onto a fresh base."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx.export import to_peft
from tests.conftest import assert_close
from tests.models import CASES, randomize_adapters

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


def _adapted(name: str, method: str, **kwargs):
    case = CASES[name]
    torch.manual_seed(0)
    base = case.build()
    model = aurora_fx.apply(copy.deepcopy(base), case.pattern, method=method, rank=2, dropout=0.0, **kwargs)
    randomize_adapters(model, std=0.1)
    return case, base, model


def _grow_aroma(model):
    """Two merges plus a trained active piece, so the AROMA factors have a rank of their own."""
    controller = aurora_fx.AromaController(model, torch.optim.SGD(aurora_fx.trainable_parameters(model), lr=0.0),
                                           max_inner_steps=1)
    for _ in range(2):
        with torch.no_grad():
            for _, _, a in aurora_fx.inventory.adapter_modules(model):
                a.B.normal_(0, 0.1)
        controller._outer_step()
    with torch.no_grad():
        for _, _, a in aurora_fx.inventory.adapter_modules(model):
            a.B.normal_(0, 0.1)


def _load_with_peft(base, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert keys == [], keys  # no missing or unexpected keys
    return loaded


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "aroma"])
def test_lora_and_aroma_export_exactly_and_real_peft_gives_our_outputs(name, method, tmp_path):
    case, base, model = _adapted(name, method)
    if method == "aroma":
        _grow_aroma(model)
    result = to_peft(model, tmp_path)
    assert result.mode == "exact" and all(s.how == "exact" for s in result.sites)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (name == "gpt2")
    assert sorted(config["target_modules"]) == sorted(a.path for a in aurora_fx.adapters(model))
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        expected = case.output(model.eval()(**inputs))
        assert_close(case.output(_load_with_peft(base, tmp_path)(**inputs)), expected, atol=1e-5)
    back = aurora_fx.load_peft_lora(copy.deepcopy(base), tmp_path)  # and back into aurora_fx
    with torch.no_grad():
        assert_close(case.output(back.eval()(**inputs)), expected, atol=1e-5)


def _site_rank(config: dict, site: str) -> int:
    return next((v for k, v in config["rank_pattern"].items() if k.replace("\\", "") == site), config["r"])


def test_aroma_sites_write_their_own_rank_and_one_alpha(tmp_path):
    case, base, model = _adapted("llama", "aroma")
    _grow_aroma(model)
    with torch.no_grad():  # sites of different ranks: one compacts to rank 1
        site = model.model.layers[0].self_attn.q_proj.adapter
        site.U, site.V = site.U[:, :1].clone(), site.V[:1].clone()  # (out, k), (k, in)
    to_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {a.path: a.rank for a in aurora_fx.adapters(model)}
    assert len(set(ranks.values())) > 1
    assert "alpha_pattern" not in config  # llama.cpp reads only lora_alpha: the scales live in lora_B
    assert {site: _site_rank(config, site) for site in ranks} == ranks
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert_close(case.output(_load_with_peft(base, tmp_path)(**inputs)), case.output(model.eval()(**inputs)),
                     atol=1e-5)


def test_lora_with_two_alphas_folds_the_scales_into_lora_b(tmp_path):
    case = CASES["llama"]
    torch.manual_seed(0)
    base = case.build()
    model = aurora_fx.apply(copy.deepcopy(base), "q_proj", method="lora", rank=4, alpha=8.0)
    aurora_fx.apply(model, "v_proj", method="lora", rank=2, alpha=16.0)
    randomize_adapters(model, std=0.1)
    to_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "alpha_pattern" not in config and config["lora_alpha"] in (8.0, 16.0)  # the per-site s·r are 8 and 16
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        expected = case.output(model.eval()(**inputs))
        assert_close(case.output(_load_with_peft(base, tmp_path)(**inputs)), expected, atol=1e-5)
        back = aurora_fx.load_peft_lora(copy.deepcopy(base), tmp_path)  # and back into aurora_fx
        assert_close(case.output(back.eval()(**inputs)), expected, atol=1e-5)


def test_a_folder_only_peft_serves_is_written_with_a_warning_that_names_the_servers(tmp_path):
    case, base, model = _adapted("bert", "aurora")
    calibration = [case.inputs(4, 12) for _ in range(4)]
    with pytest.warns(UserWarning, match=r"PEFT only: lora_bias.*vLLM refuses.*llama\.cpp"):
        to_peft(model, tmp_path / "bias", mode="fit", calibration=calibration, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain folder: no warning
        to_peft(model, tmp_path / "plain", mode="fit", calibration=calibration)


def test_aurora_static_equals_the_lossy_merge_and_exact_mode_is_refused(tmp_path):
    case, base, model = _adapted("bert", "aurora")
    with pytest.raises(ValueError, match="aurora adapters are nonlinear.*mode='static'.*mode='fit'"):
        to_peft(model, tmp_path)
    to_peft(model, tmp_path, mode="static")
    merged = aurora_fx.merge(copy.deepcopy(model), lossy=True)
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert_close(case.output(_load_with_peft(base, tmp_path)(**inputs)), case.output(merged(**inputs)),
                     atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_aurora_fit_is_never_worse_than_static_on_the_calibration_inputs(bias, tmp_path):
    case, base, model = _adapted("bert", "aurora")
    torch.manual_seed(1)
    calibration = [case.inputs(4, 12) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "this PEFT folder serves in PEFT only")  # (bias=True: tested below)
        result = to_peft(model, tmp_path, mode="fit", calibration=calibration, rank=4, bias=bias)
    assert len(result.sites) == 4 and "held-out error" in str(result)
    for site in result.sites:
        assert site.calibration_error <= site.static_calibration_error + 1e-9
        assert site.heldout_error is not None and site.rank <= 4
    assert any(s.how == "fit" and s.calibration_error < s.static_calibration_error for s in result.sites)
    loaded = _load_with_peft(base, tmp_path)  # PEFT loads it (with lora_bias when fitted with a bias)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_bias"] is bias
    assert loaded is not None


def test_aurora_fit_defaults_to_rank_r_because_a_higher_rank_fits_no_better(tmp_path):
    """AuroRA's update lies in the span of B's r̃ columns: k = r̃ is the best linear fit of any rank."""
    case, base, model = _adapted("bert", "aurora")
    torch.manual_seed(1)
    calibration = [case.inputs(4, 12) for _ in range(8)]
    default = to_peft(model, tmp_path / "default", mode="fit", calibration=calibration)
    wider = to_peft(model, tmp_path / "wider", mode="fit", calibration=calibration, rank=8)
    narrower = to_peft(model, tmp_path / "narrower", mode="fit", calibration=calibration, rank=1)
    assert {s.rank for s in default.sites} == {2}
    for d, w, n in zip(default.sites, wider.sites, narrower.sites, strict=True):
        assert d.calibration_error == pytest.approx(w.calibration_error, rel=1e-6, abs=1e-9)
        assert n.calibration_error > d.calibration_error + 1e-6  # rank 1 is not enough: the test can fail


def test_trainable_modules_land_in_modules_to_save(tmp_path):
    case, base, model = _adapted("roberta_cls", "lora", trainable_modules="classifier")
    with torch.no_grad():
        model.classifier.out_proj.weight.normal_()
    to_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert_close(case.output(_load_with_peft(base, tmp_path)(**inputs)), case.output(model.eval()(**inputs)),
                     atol=1e-5)


def test_a_functional_site_is_named_in_the_error(tmp_path):
    _, _, model = _adapted("functional", "lora")
    with pytest.raises(ValueError, match=r"site 'blocks\.0\.w_in' cannot be written as standard LoRA: it is a "
                                         r"functional site"):
        to_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def _least_squares(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` affine least-squares map ``y ≈ x·ΔWᵀ + c`` (float64), computed independently."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    m = torch.linalg.lstsq(xc, yc).solution  # (d_in, d_out)
    _, vecs = torch.linalg.eigh((xc @ m).t() @ (xc @ m))  # the fitted outputs' principal directions
    vk = vecs[:, -rank:]
    delta = vk @ vk.t() @ m.t()  # (d_out, d_in)
    return delta, my - delta @ mx


@pytest.mark.parametrize("bias", [False, True])
def test_a_loaded_fit_folder_computes_the_least_squares_optimum(bias, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 12)).eval()
    model = aurora_fx.apply(copy.deepcopy(base), "^3$", dropout=0.0)
    randomize_adapters(model, std=0.5)
    calibration = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    result = to_peft(model, tmp_path, mode="fit", calibration=calibration, rank=2, bias=bias)
    assert [s.how for s in result.sites] == ["fit"]  # the fit itself is tested, not the static fallback
    adapter = model[3].adapter
    with torch.no_grad():
        fit_batches = [b for i, b in enumerate(calibration) if i % 4 != 3]  # one batch in four is held out
        h = torch.cat([torch.tanh(base[0](b)) for b in fit_batches]).double()  # the site's inputs, in eval
        y = adapter.oracle_delta(h.float()).double()
        if bias:
            delta, c = _least_squares(h, y, rank=2)
        else:
            m = torch.linalg.lstsq(h, y).solution
            _, vecs = torch.linalg.eigh((h @ m).t() @ (h @ m))
            delta, c = vecs[:, -2:] @ vecs[:, -2:].t() @ m.t(), torch.zeros(12, dtype=torch.float64)
        x = torch.randn(32, 8)
        hx = torch.tanh(base[0](x))
        expected = base(x) + (hx.double() @ delta.t() + c).float()
        loaded = _load_with_peft(base, tmp_path)(x)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "aroma"])
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_expert_sites_export_as_peft_target_parameters_and_real_peft_gives_our_logits(name, method, tmp_path):
    from tests.models import MOE_BUILDERS

    torch.manual_seed(0)
    base = MOE_BUILDERS[name]()
    model = aurora_fx.apply(copy.deepcopy(base), "experts|q_proj", method=method, rank=2, dropout=0.0)
    randomize_adapters(model, std=0.1)
    if method == "aroma":  # experts of different ranks: expert 0 of each site merges its piece once
        controller = aurora_fx.AromaController(model, torch.optim.SGD(aurora_fx.trainable_parameters(model), lr=0.0))
        for track in controller.tracks:
            if track.path.endswith(".0"):
                controller._merge(track, torch.Generator().manual_seed(0))
        randomize_adapters(model, std=0.1)
    to_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(a.path for a in aurora_fx.adapters(model) if a.kind == "expert")
    assert all("q_proj" in m for m in config["target_modules"])
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        assert_close(_load_with_peft(base, tmp_path)(input_ids=ids).logits, expected, atol=1e-5)
