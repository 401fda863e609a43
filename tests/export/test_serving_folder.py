"""``to_onnx_decoder`` writes a folder that onnxruntime-genai loads with no edits, checked with the real client.

Llama and Qwen2 configs with random non-zero AuroRA and LoRA adapters: ``og.Model(folder)`` generates HF
``generate``'s greedy tokens (16 new, batch 1 and a batch of 2 prompts of different lengths). A swappable
graph with two fine-tunes' ``.onnx_adapter`` files through ``og.Adapters`` gives each fine-tune's tokens,
and no active adapter gives the base model's.

Two conventions differ and are bridged here, not in the folder: HF batches prompts left-padded (with an
attention mask), genai 0.18 right-padded (it masks the trailing pad tokens of each row and continues each
row after its own last real token), so each row's real prompt and new tokens are compared; and genai does
not return a final EOS token that HF appends.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import aurora_fx
from aurora_fx.export import save_adapter_weights, to_onnx_decoder
from tests.models import DECODERS, randomize_adapters

og = pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow
NEW = 16
PROMPT = 7


def _decoder(name: str, seed: int = 0, std: float = 0.1):
    build, aurora_site, lora_site = DECODERS[name]
    torch.manual_seed(seed)
    model = build()
    aurora_fx.apply(model, aurora_site)
    aurora_fx.apply(model, lora_site, method="lora", rank=4)
    randomize_adapters(model, std=std)
    return model


def _prompts(batch: int) -> list[list[int]]:
    """Tokens 3..99 (never the pad id 0); with batch > 1 the first prompt is 3 tokens shorter."""
    ids = torch.randint(3, 100, (batch, PROMPT), generator=torch.Generator().manual_seed(1)).tolist()
    return [row[3:] if i == 0 and batch > 1 else row for i, row in enumerate(ids)]


def _padded(prompts: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts padded with the pad id 0 to one length, and their attention mask."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(prompts):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), 1
    return ids, mask


def _real(row: list[int], prompt: list[int], width: int, eos: int) -> list[int]:
    """A generated row as prompt + new tokens: padding dropped, a final EOS dropped."""
    new = row[width:]
    new = new[:-1] if new and new[-1] == eos else new
    return prompt + new


def _genai(folder, prompts: list[list[int]], adapter: tuple | None = None) -> list[list[int]]:
    ids, _ = _padded(prompts, left=False)
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + NEW, do_sample=False, batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter[0]), adapter[1])
        generator.set_active_adapter(adapters, adapter[1])
    generator.append_tokens(ids.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    rows = [[int(t) for t in generator.get_sequence(i)] for i in range(ids.shape[0])]
    return [_real(row, p, ids.shape[1], model_eos(folder)) for row, p in zip(rows, prompts, strict=True)]


def model_eos(folder) -> int:
    return json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]


def _hf(model, prompts: list[list[int]]) -> list[list[int]]:
    ids, mask = _padded(prompts, left=True)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)
    return [_real(row, p, ids.shape[1], model.config.eos_token_id) for row, p in zip(out.tolist(), prompts,
                                                                                    strict=True)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def folder(request, tmp_path_factory):
    model = _decoder(request.param)
    target = tmp_path_factory.mktemp(request.param)
    result = to_onnx_decoder(model, target)
    return model, target, result


def test_the_folder_holds_what_the_clients_read(folder):
    model, target, result = folder
    assert result.path == target / "model.onnx"
    assert sorted(p.name for p in result.files) == ["config.json", "genai_config.json", "generation_config.json"]
    genai = json.loads((target / "genai_config.json").read_text())
    assert genai["model"]["type"] == model.config.model_type  # llama and qwen2 are genai's own types
    assert genai["search"]["past_present_share_buffer"] is False
    decoder = genai["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (
        model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert json.loads((target / "config.json").read_text())["model_type"] == model.config.model_type


@pytest.mark.parametrize("batch", [1, 2])
def test_genai_generates_hf_generate_tokens(folder, batch):
    model, target, _ = folder
    prompts = _prompts(batch)
    assert _genai(target, prompts) == _hf(model, prompts)


def test_genai_adapters_fill_a_swappable_graph(tmp_path):
    first = _decoder("llama")
    second = copy.deepcopy(first)
    torch.manual_seed(7)
    randomize_adapters(second, std=0.2)
    to_onnx_decoder(first, tmp_path, swappable=True)
    files = [save_adapter_weights(m, tmp_path / f"{i}.onnx_adapter") for i, m in enumerate((first, second))]
    prompts = _prompts(2)
    for i, (model, file) in enumerate(zip((first, second), files, strict=True)):
        assert _genai(tmp_path, prompts, adapter=(file, f"tune{i}")) == _hf(model, prompts)
    base = copy.deepcopy(first)
    aurora_fx.unload(base)
    assert _genai(tmp_path, prompts) == _hf(base, prompts)
    assert len({str(_hf(m, prompts)) for m in (base, first, second)}) == 3  # the adapters matter at this size


def test_a_tokenizer_is_saved_into_the_folder(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        pad_token="t0", eos_token="t2", bos_token="t1")
    result = to_onnx_decoder(_decoder("llama"), tmp_path / "llm.onnx", verify=False, tokenizer=tokenizer)
    assert result.path == tmp_path / "llm.onnx"
    names = {p.name for p in result.files}
    assert {"tokenizer.json", "tokenizer_config.json", "genai_config.json"} <= names
    assert json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "llm.onnx"
