"""The second hour of a new user: things that failed or went wrong without a word, one test each."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import aurora_fx
from tests.conftest import ORT_ATOL, assert_close
from tests.models import randomize_adapters


def _encoder(nested: bool = True) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_with_a_padding_mask_runs_the_adapters(grad):
    enc = aurora_fx.apply(_encoder(), "linear1|linear2")
    randomize_adapters(enc)
    reference = copy.deepcopy(enc)  # the same weights on the dense path
    reference.use_nested_tensor = False
    x = torch.randn(2, 10, 64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 7:] = True
    with torch.set_grad_enabled(grad):
        out = enc(x, src_key_padding_mask=mask)
        expected = reference(x, src_key_padding_mask=mask)
        bare = aurora_fx.unload(copy.deepcopy(enc))(x, src_key_padding_mask=mask)
    keep = ~mask
    assert_close(out[keep], expected[keep])
    assert not torch.allclose(out[keep], bare[keep], atol=1e-3)  # the adapters act
    unloaded = aurora_fx.unload(enc)
    assert unloaded.use_nested_tensor is True  # the fast path comes back with the base


def test_a_finished_aroma_model_comes_back_from_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.models import CASES

    case = CASES["llama"]
    model = aurora_fx.apply(case.build(), case.pattern, method="aroma")
    controller = aurora_fx.AromaController(model, torch.optim.SGD(aurora_fx.trainable_parameters(model), lr=0.0),
                                           max_inner_steps=1)
    randomize_adapters(model, std=0.1)
    controller._outer_step()  # one merged piece per site
    randomize_adapters(model, std=0.1)
    controller.finalize()  # what AromaCallback does at the end of training: every site frozen
    model.save_pretrained(tmp_path)
    back = aurora_fx.from_pretrained(LlamaForCausalLM, tmp_path)
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert_close(back.eval()(**inputs).logits, model.eval()(**inputs).logits)
    assert [a.rank for a in aurora_fx.adapters(back)] == [a.rank for a in aurora_fx.adapters(model)]


def _peft_sites(model, config) -> list[str]:
    """The modules real PEFT puts LoRA on for ``config``."""
    import peft

    wrapped = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    prefix = "base_model.model."
    return sorted(path[len(prefix):] for path, m in wrapped.named_modules() if hasattr(m, "lora_A")
                  and isinstance(m.lora_A, nn.ModuleDict))


PEFT_CASES = {
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
    "layers_pattern": dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    "exclude_modules": dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["v_proj"]),
    "exclude_regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*"),
    "all_linear": dict(target_modules="all-linear"),
    "regex_targets": dict(target_modules=r".*\.(q|v)_proj"),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_a_peft_lora_config_selects_the_sites_peft_selects(case):
    peft = pytest.importorskip("peft")
    from tests.models import CASES

    base = CASES["llama"].build()
    config = peft.LoraConfig(r=4, lora_alpha=8, **PEFT_CASES[case])
    ours = aurora_fx.apply(copy.deepcopy(base), config=config)
    assert sorted(a.path for a in aurora_fx.adapters(ours)) == _peft_sites(base, config)


def test_modules_to_save_train_with_the_adapters():
    peft = pytest.importorskip("peft")
    from tests.models import CASES

    model = aurora_fx.apply(CASES["llama"].build(), config=peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                          modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight"} <= trainable
    assert all(n == "lm_head.weight" or ".adapter." in n for n in trainable)


@pytest.mark.parametrize(("setting", "words"), [({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
                                                ({"use_dora": True}, "use_dora=True"),
                                                ({"rank_pattern": {"q_proj": 2}}, "rank_pattern")])
def test_peft_settings_without_an_equivalent_are_refused_by_name(setting, words):
    peft = pytest.importorskip("peft")
    from tests.models import CASES

    model = CASES["llama"].build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape(words)):
        aurora_fx.apply(model, config=peft.LoraConfig(r=4, target_modules=["q_proj"], **setting))
    assert aurora_fx.adapters(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_wrapped_by_peft_is_refused_with_the_ways_out():
    peft = pytest.importorskip("peft")
    from tests.models import CASES

    wrapped = peft.get_peft_model(CASES["llama"].build(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"wrapped by PEFT.*merge_and_unload\(\).*aurora_fx\.load_peft_lora"):
        aurora_fx.apply(wrapped, "q_proj")


def test_a_csv_with_an_unquoted_comma_is_refused_with_its_line(tmp_path):
    from aurora_fx.data import load_csv

    path = tmp_path / "d.csv"
    path.write_text("text,label\ngreat,pos\nloved it, really,pos\nawful,neg\n")
    with pytest.raises(ValueError, match=r"line\(s\) \[3\] have more fields than the header.*double quotes"):
        load_csv(path)
    path.write_text('text,label\ngreat,pos \n"loved it, really",pos\nawful,neg\n')
    assert load_csv(path).label_names == ("neg", "pos")  # quoted: fine; "pos " is "pos"


def test_a_csv_row_without_a_label_is_refused_not_dropped(tmp_path):
    from aurora_fx.data import load_csv

    path = tmp_path / "d.csv"
    path.write_text("text,label\ngreat,pos\nno label here,\nawful,neg\n")
    with pytest.raises(ValueError, match=r"line\(s\) \[3\] have an empty 'text' or 'label'"):
        load_csv(path)


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    from aurora_fx.data import load_csv

    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ngreat,pos\nawful,neg\n".encode("utf-8-sig"))
    data = load_csv(path)
    assert data.texts == ("great", "awful") and data.label_names == ("neg", "pos")


def test_apply_refuses_a_method_that_contradicts_its_config():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"method='lora' but config is AuroraConfig"):
        aurora_fx.apply(model, "0", method="lora", config=aurora_fx.AuroraConfig())
    assert aurora_fx.adapters(model) == []
    aurora_fx.apply(model, "0", config=aurora_fx.LoraConfig(rank=2))  # the config alone decides
    assert aurora_fx.adapters(model)[0].method == "lora"


def test_a_fit_worse_than_no_adapter_warns():
    from aurora_fx.export.peft_lora import SiteExport, _warn_bad_fits

    good = SiteExport("a", "aurora", 2, "fit", 0.1, 0.3, 0.5, 0.6)
    bad = SiteExport("b", "aurora", 2, "fit", 0.2, 1.7, 0.5, 0.6)
    with pytest.warns(UserWarning, match=r"1 fitted site\(s\) have a held-out relative error above 100% \(worst b: "
                                         r"170%\)"):
        _warn_bad_fits([good, bad])


def test_too_high_a_rank_is_one_short_error():
    from tests.models import CASES

    with pytest.raises(ValueError) as caught:
        aurora_fx.apply(CASES["bert"].build(), "query|value|key", rank=1000)
    lines = str(caught.value).splitlines()
    assert len(lines) <= 4 and "rank 1000 > min(in_features=" in lines[1] and "more" in lines[1]


def test_cli_errors_name_options_and_ctrl_c_is_one_line(monkeypatch, capsys):
    import aurora_fx.cli as cli

    def fails(args):
        raise ValueError("aurora adapters are nonlinear: use mode='static' or mode='fit', as merge needs lossy=True")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_sites", fails)
    assert cli.main(["sites", "minilm"]) == 2
    err = capsys.readouterr().err
    assert "--mode static" in err and "--mode fit" in err and "--lossy" in err and "mode='static'" not in err
    monkeypatch.setattr(cli, "_cmd_sites", interrupted)
    assert cli.main(["sites", "minilm"]) == 130
    assert capsys.readouterr().err == "aurora-fx: interrupted\n"


def test_import_aurora_fx_leaves_torch_transformers_peft_and_onnx_for_later():
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "onnx", "onnxscript", "networkx")
    code = f"import sys, aurora_fx; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    code = "import aurora_fx; aurora_fx.export.to_onnx; aurora_fx.AromaCallback; print('ok')"  # still there on use
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


@pytest.mark.slow
def test_a_mixture_of_experts_decoder_exports_with_a_note(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        vocab_size=100)).eval()
    aurora_fx.apply(model, "q_proj|v_proj")
    randomize_adapters(model)
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default: no ONNX form
    result = aurora_fx.export.to_onnx_decoder(model, tmp_path)
    assert max(result.max_abs_diff.values()) <= ORT_ATOL
    assert any("'batched_mm'" in n for n in result.notes)
    assert model.config._experts_implementation == "grouped_mm"  # the user's model is untouched


def test_an_op_without_an_onnx_translation_is_named_in_one_line(tmp_path):
    lib = torch.library.Library("second_hour_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("twice", lambda x: torch.empty_like(x), "Meta")

    class Calls(nn.Module):
        def forward(self, x):
            return torch.ops.second_hour_test.twice(x)

    with pytest.raises(ValueError, match=r"^the model calls second_hour_test.twice, which has no ONNX translation"):
        aurora_fx.export.to_onnx(Calls(), tmp_path / "x.onnx", example_inputs=(torch.randn(2, 3),))
