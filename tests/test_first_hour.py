"""The first hour of a new user: what broke or surprised, one test each (the README's own blocks run in
tests/test_docs.py)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aurora_fx
from aurora_fx.checkpoint import CheckpointError
from aurora_fx.cli import main
from tests.conftest import assert_close
from tests.models import CASES, randomize_adapters

ROOT = Path(__file__).parents[1]


def _shipped_text_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in tracked if f.endswith((".py", ".md", ".toml", ".txt", "Makefile"))]


def test_nothing_cites_spec_files_that_are_not_in_the_repository():
    files = [f for f in _shipped_text_files() if f.name != Path(__file__).name]  # this file names them
    assert len(files) > 50
    cited = [str(f.relative_to(ROOT)) for f in files
             if re.search(r"\b(METHODS|PLATFORM|DESIGN|STYLE)\.md\b|shared/spec|METHODS §", f.read_text())]
    assert cited == []
    assert (ROOT / "docs" / "methods.md").is_file() and "docs/methods.md" in (ROOT / "README.md").read_text()


def test_peft_import_and_from_pretrained_are_documented():
    for page in ("README.md", "docs/guide.md"):
        text = (ROOT / page).read_text()
        assert "load_peft_lora" in text and "from_pretrained" in text, page


@pytest.mark.parametrize("name, method", [("llama", "aurora"), ("gpt2", "aroma"), ("roberta_cls", "lora")])
def test_save_pretrained_then_from_pretrained_gives_the_adapters_back(tmp_path, name, method):
    case = CASES[name]
    model = aurora_fx.apply(case.build(), case.pattern, method=method, rank=2, dropout=0.0)
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    again = aurora_fx.from_pretrained(type(model), tmp_path)
    inputs = case.inputs(2, 6)
    with torch.no_grad():
        assert_close(case.output(again(**inputs)), case.output(model(**inputs)))
    assert [(a.path, a.method, a.num_params) for a in aurora_fx.adapters(again)] == \
        [(a.path, a.method, a.num_params) for a in aurora_fx.adapters(model)]
    plain = type(model).from_pretrained(tmp_path)  # the class's own loader: the base only
    assert aurora_fx.adapters(plain) == []


def test_from_pretrained_of_a_folder_without_adapters_says_so(tmp_path):
    CASES["bert"].build().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds no aurora_fx adapters.*BertModel.from_pretrained loads it"):
        aurora_fx.from_pretrained(type(CASES["bert"].build()), tmp_path)


def test_a_state_dict_round_trip_still_loads_strictly():
    model = aurora_fx.apply(CASES["bert"].build(), "query")
    state = model.state_dict()
    assert "aurora_fx.adapters" in state
    model.load_state_dict(state, strict=True)  # the record is dropped on load


def _saved_llama(tmp_path):
    case = CASES["llama"]
    torch.manual_seed(11)
    model = aurora_fx.apply(case.build(), case.pattern)
    randomize_adapters(model)
    return aurora_fx.save_adapters(model, tmp_path)


def test_load_adapters_refuses_a_base_with_other_weights_and_names_the_site(tmp_path):
    path = _saved_llama(tmp_path)
    torch.manual_seed(12)
    other = CASES["llama"].build()
    with pytest.raises(CheckpointError, match=r"site 'model\.layers\.0\.self_attn\.q_proj': the base weight differs.*"
                                              r"check_base=False"):
        aurora_fx.load_adapters(other, path)
    assert aurora_fx.adapters(other) == []
    aurora_fx.load_adapters(other, path, check_base=False)
    assert len(aurora_fx.adapters(other)) == 4


def test_load_adapters_refuses_a_same_shaped_model_of_another_class(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = _saved_llama(tmp_path)
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=100))
    with pytest.raises(CheckpointError, match="saved from a LlamaForCausalLM, but this model is a Qwen2ForCausalLM"):
        aurora_fx.load_adapters(qwen, path)


def test_the_same_base_cast_to_bf16_still_loads(tmp_path):
    path = _saved_llama(tmp_path)
    torch.manual_seed(11)
    base = CASES["llama"].build().to(torch.bfloat16)
    aurora_fx.load_adapters(base, path)
    assert len(aurora_fx.adapters(base)) == 4


def test_apply_takes_a_peft_lora_config():
    import peft

    model = aurora_fx.apply(CASES["bert"].build(), config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                           target_modules=["query", "value"]))
    infos = aurora_fx.adapters(model)
    assert len(infos) == 4 and all(a.method == "lora" and a.rank == 4 for a in infos)
    assert infos[0].config == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "method": "lora"}
    rs = aurora_fx.apply(CASES["bert"].build(), "query", config=peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    assert aurora_fx.adapters(rs)[0].config["alpha"] == pytest.approx(16.0)  # PEFT's α/√r == our α'/r
    with pytest.raises(ValueError, match="peft.LoraConfig with use_dora=True \\(DoRA\\) has no aurora_fx equivalent"):
        aurora_fx.apply(CASES["bert"].build(), "query", config=peft.LoraConfig(r=4, use_dora=True))
    with pytest.raises(TypeError, match="config must be an aurora_fx config.*got builtins.dict"):
        aurora_fx.apply(CASES["bert"].build(), "query", config={"r": 4})


def test_sites_hides_untraceable_modules_that_own_no_linear_weight():
    import timm

    table = aurora_fx.sites(timm.create_model("resnet18", pretrained=False))
    text = str(table)
    assert "fc" in text and "BatchNorm2d" not in text and "20 untraceable module(s)" in text
    assert "BatchNorm2d" in str(aurora_fx.sites(timm.create_model("resnet18", pretrained=False), include_all=True))
    assert len(table.untraceable) == 20  # still there for the checks


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "reviews.csv"
    rows = ["great movie,pos", "awful film,neg", "loved it,pos", "hated it,neg", "superb,pos", "boring,neg",
            "wonderful,pos", "dreadful,neg", "a delight,pos", "a mess,neg"]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("held_out", [1, 3, 5, 7])
def test_cli_train_honours_the_held_out_count_exactly(reviews, tmp_path, capsys, held_out):
    code, out, err = _cli(["train", "minilm", str(reviews), "--steps", "1", "--max-length", "8", "--test-size",
                           str(held_out), "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err
    ckpt = aurora_fx.checkpoint.read_checkpoint(tmp_path)
    assert ckpt.extra["held_out"] == held_out


@pytest.mark.slow
def test_cli_checkpoint_records_an_absolute_base_and_a_missing_base_says_where_it_came_from(
        reviews, tmp_path, capsys, monkeypatch):
    from aurora_fx.data import minilm_path

    local = tmp_path / "tinybert"
    local.symlink_to(minilm_path())
    monkeypatch.chdir(tmp_path)
    assert main(["train", "./tinybert", str(reviews), "--steps", "1", "--max-length", "8", "--test-size", "2",
                 "--out", "run", "--quiet"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["inspect", str(tmp_path / "run" / "adapters.safetensors")]) == 0
    local.unlink()
    code, _, err = _cli(["inspect", str(tmp_path / "run" / "adapters.safetensors")], capsys)
    assert code == 2 and "recorded in" in err and "pass --model MODEL" in err and str(local) in err


@pytest.mark.slow
def test_cli_sites_and_train_see_the_same_paths(reviews, tmp_path, capsys):
    pattern = r"^bert\.encoder\.layer\.0\.attention\.self\.query$"
    code, out, _ = _cli(["sites", "minilm", "--pattern", pattern], capsys)
    assert code == 0 and "1 matched" in out
    code, _, err = _cli(["train", "minilm", str(reviews), "--pattern", pattern, "--steps", "1", "--max-length", "8",
                         "--test-size", "2", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["sites", "timm:resnet999"], r"unknown timm model 'resnet999'; similar names: .*resnet18"),
    (["train", "minilm", "{bad}"], r"is not valid CSV: .* in the record that starts at line 3"),
    (["train", "minilm", "{one}"], r"has only one label \(pos\); a classifier needs examples of at least two"),
])
def test_cli_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, args, message):
    (tmp_path / "bad.csv").write_text('text,label\nfine,pos\n"unterminated,neg\nok,pos\n')
    (tmp_path / "one.csv").write_text("text,label\na,pos\nb,pos\nc,pos\n")
    args = [a.format(bad=tmp_path / "bad.csv", one=tmp_path / "one.csv") for a in args]
    extra = ["--steps", "1"] if args[0] == "train" else []
    result = subprocess.run([sys.executable, "-m", "aurora_fx.cli", *args, *extra], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr


def test_adapted_models_deepcopy_with_their_record():
    model = aurora_fx.apply(CASES["bert"].build(), "query")
    twin = copy.deepcopy(model)
    assert "aurora_fx.adapters" in twin.state_dict()
