"""Named adapters (issue 33): many adapters on one base, the active set, per-row mixed batches, export.

Two (or three) named adapters of different methods on overlapping sites of real transformers models: each alone,
several active and mixed rows equal the functional oracle in float64; delete/unload restore the base; per-name
save/load round-trips and a one-adapter file is unchanged; a mixed training step gives each adapter the gradients of
its own rows; switching and in-place loads never recompile a compiled model; the exported graphs (encoder, decoder,
swappable slots) take a per-row adapter index and match PyTorch per row in onnxruntime.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch._dynamo.utils import counters

import aurora_fx
from aurora_fx import adapter_set
from aurora_fx.adapter_set import AdapterSet
from aurora_fx.export.decoder import OnnxGenerator
from aurora_fx.export.onnx import run_onnx
from aurora_fx.export.swappable import save_adapter_weights
from aurora_fx.inventory import adapter_modules
from tests.models import MOE_BUILDERS, bert, gpt2, llama, randomize_adapters


def two_named(dtype=torch.float64):
    """A tiny BERT: LoRA r=4 "default" on query|value, AuroRA "b" on query|key, AROMA "c" (one merged piece) on
    value."""
    model = bert().to(dtype)
    aurora_fx.apply(model, "query|value", method="lora", rank=4)
    aurora_fx.apply(model, "query|key", name="b", dropout=0.0)
    aurora_fx.apply(model, "value", name="c", method="aroma", dropout=0.0)
    randomize_adapters(model)
    for _, _, adapter in adapter_modules(model, name="c"):
        adapter.merge_active()  # U, V non-zero: the merged part is exercised too
        adapter.B.data.normal_(0, 0.3)
    return model.eval()


def reference(model, names, ids):
    """The model's base with the oracle deltas of ``names`` added at their sites (aurora_fx.functional only)."""
    ref = copy.deepcopy(model)
    deltas = [(site, adapter) for n in names for site, _, adapter in adapter_modules(ref, name=n)]
    aurora_fx.unload(ref)
    for site, adapter in deltas:
        ref.get_submodule(site).register_forward_hook(lambda m, i, out, a=adapter: out + a.oracle_delta(i[0]))
    with torch.no_grad():
        return ref(input_ids=ids).last_hidden_state


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


IDS = torch.randint(3, 90, (5, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("active", [["default"], ["b"], ["c"], ["default", "b"], ["default", "b", "c"]])
def test_each_alone_and_several_active_equal_the_oracle(active):
    model = two_named()
    aurora_fx.set_adapters(model, active)
    assert (hidden(model, IDS) - reference(model, active, IDS)).abs().max() <= 1e-10


def test_mixed_rows_equal_the_oracle_row_by_row():
    model = two_named()
    rows = ["b", None, "default", "c", "b"]
    with aurora_fx.adapter_rows(model, rows):
        out = hidden(model, IDS)
    for i, name in enumerate(rows):
        expected = reference(model, [name] if name else [], IDS[i:i + 1])
        assert (out[i:i + 1] - expected).abs().max() <= 1e-10, (i, name)
    assert (hidden(model, IDS) - reference(model, ["c"], IDS)).abs().max() <= 1e-10  # rows end with the block


def test_rows_are_one_gathered_op_and_equal_each_adapter_masked(monkeypatch):
    """LoRA, AuroRA and AROMA rows run as one gathered computation (no per-adapter call); it equals the fallback
    that runs every adapter on the batch and masks its rows."""
    model = two_named()
    calls = {"masked": 0}
    rows = ["c", "b", "default", None, "b"]
    masked = AdapterSet._masked_delta

    def spy(self, x, local):
        calls["masked"] += 1
        return masked(self, x, local)

    monkeypatch.setattr(AdapterSet, "_masked_delta", spy)
    with aurora_fx.adapter_rows(model, rows):
        gathered = hidden(model, IDS)
    assert calls["masked"] == 0
    monkeypatch.setattr(AdapterSet, "_row_forms", lambda self: None)
    monkeypatch.setattr(AdapterSet, "_cache_key", lambda self: None)  # (no serving cache either)
    with aurora_fx.adapter_rows(model, rows):
        fallback = hidden(model, IDS)
    assert calls["masked"] > 0
    assert (gathered - fallback).abs().max() <= 1e-10


def test_the_serving_cache_follows_in_place_weight_changes():
    model = two_named()
    rows = ["b", "default", "c", "b", None]
    for scale in (1.0, -2.0):
        with torch.no_grad():
            for p in aurora_fx.trainable_parameters(model, name="b"):
                p.mul_(scale)
        with aurora_fx.adapter_rows(model, rows):
            out = hidden(model, IDS)  # (eval, no grad: the cached stack is used from the second call on)
        assert (out[:1] - reference(model, ["b"], IDS[:1])).abs().max() <= 1e-10


def test_padded_ranks_do_not_enter_the_spline_sum():
    """AuroRA r̃=2 stacked beside LoRA r=4: its two padded ranks would add basis(0) to the spline sum."""
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    lora = aurora_fx.registry.build_adapter(aurora_fx.LoraConfig(rank=4), 16, 8, dtype=torch.float64)
    aurora = aurora_fx.registry.build_adapter(aurora_fx.AuroraConfig(dropout=0.0), 16, 8, dtype=torch.float64)
    for p in [*lora.parameters(), *aurora.parameters()]:
        p.data.normal_(0, 0.5)
    s = AdapterSet({"l": lora, "a": aurora}, ("l", "a")).eval()
    s.rows = torch.tensor([1, 0, 1])
    out = s(x)
    for i, adapter in enumerate([aurora, lora, aurora]):
        assert (out[i] - adapter.oracle_delta(x[i])).abs().max() <= 1e-12


def test_delete_and_unload_restore_the_base_exactly():
    model = two_named()
    base = bert().double().eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter" not in k
                          and "aurora_fx" not in k}, strict=True)
    aurora_fx.delete_adapter(model, "b")
    assert aurora_fx.adapter_names(model) == ("default", "c")
    assert not any(".adapter.b." in n for n, _ in model.named_parameters())
    key = model.encoder.layer[0].attention.self.key
    assert type(key) is torch.nn.Linear  # only "b" adapted key: its original module is back
    aurora_fx.set_adapters(model, ["default", "c"])
    assert (hidden(model, IDS) - reference(model, ["default", "c"], IDS)).abs().max() <= 1e-10
    aurora_fx.unload(model)
    assert torch.equal(hidden(model, IDS), hidden(base, IDS))
    assert aurora_fx.adapter_names(model) == ()


def test_save_and_load_per_name_round_trip(tmp_path):
    model = two_named()
    for name in ("default", "b", "c"):
        aurora_fx.save_adapters(model, tmp_path / name, name=name)
    fresh = bert().double().eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter" not in k
                           and "aurora_fx" not in k})
    for name in ("c", "default", "b"):  # another order: names keep what they were saved as
        aurora_fx.load_adapters(fresh, tmp_path / name)
    assert set(aurora_fx.adapter_names(fresh)) == {"default", "b", "c"}
    for active in (["b"], ["default", "c"]):
        aurora_fx.set_adapters(model, active)
        aurora_fx.set_adapters(fresh, active)
        assert torch.equal(hidden(model, IDS), hidden(fresh, IDS))
    with pytest.raises(ValueError, match=r"holds 3 named adapters .*pass name="):
        aurora_fx.save_adapters(model, tmp_path / "any")


def test_to_peft_and_merge_take_one_name(tmp_path):
    """A name written as a PEFT folder loads in real PEFT with that name's function; merging one name keeps the
    others on the changed base."""
    from peft import PeftModel

    model = two_named(torch.float32)
    aurora_fx.export.to_peft(model, tmp_path / "c", name="c")
    base = bert().eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter" not in k
                          and "aurora_fx" not in k})
    peft_model = PeftModel.from_pretrained(base, tmp_path / "c").eval()
    aurora_fx.set_adapters(model, "c")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).last_hidden_state, hidden(model, IDS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pass name="):
        aurora_fx.export.to_peft(model, tmp_path / "any")
    aurora_fx.set_adapters(model, ["default", "c"])
    expected = hidden(model, IDS)
    aurora_fx.merge(model, name="default")  # folded into the base, then deleted
    assert aurora_fx.adapter_names(model) == ("b", "c")
    aurora_fx.set_adapters(model, "c")
    torch.testing.assert_close(hidden(model, IDS), expected, rtol=0, atol=1e-5)


def test_save_pretrained_and_state_dicts_carry_every_name(tmp_path):
    from transformers import BertModel

    model = two_named(torch.float32)
    aurora_fx.set_adapters(model, ["default", "b"])
    model.save_pretrained(tmp_path)
    again = aurora_fx.from_pretrained(BertModel, tmp_path).eval()
    assert aurora_fx.adapter_names(again) == ("default", "b", "c")
    assert torch.equal(hidden(again, IDS), hidden(model, IDS))  # the active set came back too
    rows = ["c", "b", None, "default", "c"]
    with aurora_fx.adapter_rows(model, rows), aurora_fx.adapter_rows(again, rows):
        assert torch.equal(hidden(again, IDS), hidden(model, IDS))
    state = model.state_dict()
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    again.load_state_dict(state, strict=True)  # (a Trainer resume: the record names every (site, name))
    assert torch.equal(hidden(again, IDS), hidden(model, IDS))


def test_a_one_adapter_file_is_unchanged_and_loads_beside_other_names(tmp_path):
    single = bert().eval()
    aurora_fx.apply(single, "query|value", method="lora")
    randomize_adapters(single)
    path = aurora_fx.save_adapters(single, tmp_path / "one")
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["aurora_fx"])
        keys = sorted(fh.keys())  # noqa: SIM118
    assert all("name" not in site for site in meta["sites"])  # the format of every earlier release
    assert all(k.startswith("adapters/") and k.count("/") == 2 for k in keys)
    other = copy.deepcopy(single)
    aurora_fx.unload(other)
    aurora_fx.apply(other, "key", name="mine")
    aurora_fx.load_adapters(other, path)  # joins as "default"
    aurora_fx.set_adapters(other, "default")
    assert torch.equal(hidden(other, IDS), hidden(single, IDS))


def test_a_load_into_an_existing_name_is_in_place_and_pads_a_smaller_lora(tmp_path):
    model = two_named(torch.float32)
    donor = copy.deepcopy(model)
    aurora_fx.unload(donor)
    aurora_fx.apply(donor, "query|value", method="lora", rank=2, alpha=3.0)
    randomize_adapters(donor)
    aurora_fx.save_adapters(donor, tmp_path / "r2")
    before = {id(p) for p in model.parameters()}
    aurora_fx.load_adapters(model, tmp_path / "r2", name="default")
    assert {id(p) for p in model.parameters()} == before  # same tensors: written in place
    aurora_fx.set_adapters(model, "default")
    torch.testing.assert_close(hidden(model, IDS), hidden(donor, IDS), rtol=0, atol=2e-6)
    aurora_fx.unload(donor)
    aurora_fx.apply(donor, "query|value")  # AuroRA on default's sites
    aurora_fx.save_adapters(donor, tmp_path / "aurora")
    with pytest.raises(aurora_fx.checkpoint.CheckpointError, match="cannot load into the existing slot"):
        aurora_fx.load_adapters(model, tmp_path / "aurora", name="default")
    aurora_fx.save_adapters(model, tmp_path / "b", name="b")
    with pytest.raises(aurora_fx.checkpoint.CheckpointError, match="needs the same sites"):
        aurora_fx.load_adapters(model, tmp_path / "b", name="c")


def _grads(model, names):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
            and any(f".adapter.{x}." in n for x in names)}


def test_a_mixed_training_step_gives_each_adapter_the_gradients_of_its_rows():
    model = two_named().train()
    rows = ["b", "default", "b", None, "c"]
    with aurora_fx.adapter_rows(model, rows):
        model(input_ids=IDS).last_hidden_state.pow(2).sum().backward()
    mixed = _grads(model, ["default", "b", "c"])
    assert mixed and all(g.abs().sum() > 0 for g in mixed.values())
    for name in ("default", "b", "c"):
        model.zero_grad()
        keep = [i for i, r in enumerate(rows) if r == name]
        with aurora_fx.adapter_rows(model, [name] * len(keep)):
            model(input_ids=IDS[keep]).last_hidden_state.pow(2).sum().backward()
        alone = _grads(model, [name])
        assert alone.keys() == {k for k in mixed if f".adapter.{name}." in k}
        for key, grad in alone.items():
            torch.testing.assert_close(mixed[key], grad, rtol=1e-6, atol=1e-12)


def test_switching_and_loading_never_recompile(tmp_path):
    model = two_named(torch.float32)
    for name in ("b", "default"):
        aurora_fx.save_adapters(model, tmp_path / name, name=name)
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)  # inductor, the default backend
    torch._dynamo.config.error_on_recompile = True
    try:
        seen = []
        for active in (["b"], ["c"], ["default", "b"], ["default"], ["b", "c"]):  # ranks 4/2/1+1, three methods
            aurora_fx.set_adapters(model, active)
            got = compiled(input_ids=IDS).last_hidden_state
            torch.testing.assert_close(got, hidden(model, IDS), rtol=0, atol=1e-5)  # (inductor reassociates)
            seen.append(got)
        with torch.no_grad():
            for p in aurora_fx.trainable_parameters(model, name="b"):
                p.mul_(-1.5)
        for name in ("b", "default"):  # two weight loads into existing slots
            aurora_fx.load_adapters(model, tmp_path / name, name=name)
            torch.testing.assert_close(compiled(input_ids=IDS).last_hidden_state, hidden(model, IDS), rtol=0,
                                       atol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # the switches changed the function


def test_encoder_onnx_takes_an_adapter_index_per_row(tmp_path):
    model = two_named(torch.float32)
    mask = torch.ones_like(IDS)
    result = aurora_fx.export.to_onnx(model, tmp_path / "m.onnx", example_kwargs={"input_ids": IDS,
                                                                                  "attention_mask": mask})
    assert result.input_names == ("input_ids", "attention_mask", "adapter_index")
    index = torch.tensor([2, -1, 0, 1, 1, 2])
    ids = torch.randint(3, 90, (6, 4))
    got = run_onnx(result.path, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "adapter_index": index})[0]
    names = aurora_fx.adapter_names(model)
    for i, k in enumerate(index.tolist()):
        expected = reference(model, [names[k]] if k >= 0 else [], ids[i:i + 1])
        assert np.abs(got[i:i + 1] - expected.numpy()).max() <= 2e-5


@pytest.mark.slow
def test_decoder_onnx_and_generator_decode_each_row_with_its_adapter(tmp_path):
    model = llama()
    aurora_fx.apply(model, "q_proj|v_proj", method="lora", rank=4, name="a")
    aurora_fx.apply(model, "q_proj|k_proj|o_proj", name="b")
    randomize_adapters(model, 0.2)
    model.eval()
    result = aurora_fx.export.to_onnx_decoder(model, tmp_path / "dec")
    assert result.input_names[-1] == "adapter_index" and max(result.max_abs_diff.values()) <= 1e-4
    ids = torch.randint(3, 90, (3, 5))
    rows = ["b", None, "a"]
    onnx_tokens = OnnxGenerator(result.path).generate(ids, max_new_tokens=6, adapter_index=rows)
    for i, name in enumerate(rows):
        one = copy.deepcopy(model)
        if name is None:
            aurora_fx.unload(one)
        else:
            aurora_fx.set_adapters(one, name)
        hf = one.generate(ids[i:i + 1], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=6,
                          do_sample=False)
        assert hf.tolist() == onnx_tokens[i:i + 1].tolist(), name
    with aurora_fx.adapter_rows(model, rows):  # HF generate with rows: the same tokens
        assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                          do_sample=False), onnx_tokens)
    with pytest.raises(ValueError, match="pass adapter_index"):
        OnnxGenerator(result.path).generate(ids, max_new_tokens=2)


@pytest.mark.slow
def test_swappable_slots_are_filled_by_adapter_files_of_single_fine_tunes(tmp_path):
    base = llama().eval()
    fine = {}
    for name, method, pattern in (("a", "lora", "q_proj|v_proj"), ("b", "aurora", "q_proj|o_proj")):
        one = copy.deepcopy(base)
        aurora_fx.apply(one, pattern, method=method)
        randomize_adapters(one, 0.2)
        fine[name] = one.eval()
        save_adapter_weights(one, tmp_path / f"{name}.onnx_adapter", slot=name)
    served = copy.deepcopy(base)
    aurora_fx.apply(served, "q_proj|v_proj", method="lora", name="a")
    aurora_fx.apply(served, "q_proj|o_proj", name="b")
    result = aurora_fx.export.to_onnx_decoder(served.eval(), tmp_path / "sw", swappable=True)
    files = [tmp_path / "a.onnx_adapter", tmp_path / "b.onnx_adapter"]
    ids = torch.randint(3, 90, (3, 5))
    tokens = OnnxGenerator(result.path, adapter=files).generate(ids, max_new_tokens=5, adapter_index=["a", "b", None])
    for i, model in enumerate([fine["a"], fine["b"], base]):
        hf = model.generate(ids[i:i + 1], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=5,
                            do_sample=False)
        assert hf.tolist() == tokens[i:i + 1].tolist()


def test_slices_of_a_fused_projection_take_named_adapters():
    model = gpt2().double()
    aurora_fx.apply(model, r"c_attn\[q\]", method="lora")
    aurora_fx.apply(model, r"c_attn\[v\]", name="v_only")
    randomize_adapters(model)
    model.eval()
    ids = IDS[:3]
    with aurora_fx.adapter_rows(model, ["v_only", "default", None]), torch.no_grad():
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(["v_only", "default", None]):
        one = copy.deepcopy(model)
        if name is None:
            aurora_fx.unload(one)
        else:
            aurora_fx.set_adapters(one, name)
        with torch.no_grad():
            assert (one(input_ids=ids[i:i + 1]).logits - mixed[i:i + 1]).abs().max() <= 1e-10


def test_records_names_activity_and_trainable_parameters():
    model = two_named()
    table = str(aurora_fx.inspect(model))
    assert "name" in table.splitlines()[0] and "default (off)" in table and "\n" in table
    query = aurora_fx.sites(model).get("encoder.layer.0.attention.self.query")
    assert query.adapted == "lora:default, aurora:b" and query.adapted_names == ("default", "b")
    infos = aurora_fx.adapters(model)
    assert {(a.name, a.method) for a in infos} == {("default", "lora"), ("b", "aurora"), ("c", "aroma")}
    assert {a.name for a in infos if a.active} == {"c"}  # the last name applied is active
    aurora_fx.set_adapters(model, ["default", "b"])
    assert {a.name for a in aurora_fx.adapters(model) if a.active} == {"default", "b"}
    by_name = {n: {id(p) for p in aurora_fx.trainable_parameters(model, name=n)} for n in ("default", "b", "c")}
    active = {id(p) for p in aurora_fx.trainable_parameters(model)}
    assert active == by_name["default"] | by_name["b"] and not active & by_name["c"]


def test_bad_names_and_rows_are_refused_with_the_fix():
    model = two_named(torch.float32)
    with pytest.raises(ValueError, match="not usable"):
        aurora_fx.apply(model, "query", name="has.dot")
    with pytest.raises(ValueError, match="not usable"):
        aurora_fx.apply(model, "query", name="gate")
    with pytest.raises(ValueError, match=r"already has an adapter named 'b' .*delete_adapter"):
        aurora_fx.apply(model, "query", name="b")
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['x'\]"):
        aurora_fx.set_adapters(model, ["x"])
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['x'\]"), aurora_fx.adapter_rows(model, ["x"]):
        pass
    with pytest.raises(ValueError, match=r"adapter_rows has 2 row\(s\) but this site's input has 5"), \
            aurora_fx.adapter_rows(model, ["b", "c"]):
        model(input_ids=IDS)
    single = bert()
    aurora_fx.apply(single, "query")
    with pytest.raises(ValueError, match="adapter_rows needs a model with named adapters"), \
            aurora_fx.adapter_rows(single, ["default"]):
        pass
    with pytest.raises(ValueError, match=r"already has an adapter \(aurora\); call aurora_fx.unload"):
        aurora_fx.apply(single, "query")


def test_an_expert_site_refuses_a_second_name_and_nothing_changes():
    model = MOE_BUILDERS["qwen3_moe"]()
    aurora_fx.apply(model, "experts", method="lora", rank=2)
    before = {n: p.clone() for n, p in model.state_dict().items() if torch.is_tensor(p)}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="not yet on expert, convolution or nn.MultiheadAttention sites"):
        aurora_fx.apply(model, "q_proj", name="other")
    assert [type(m) for m in model.modules()] == modules
    assert aurora_fx.adapter_names(model) == ("default",)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items() if n in before)


def test_the_gathered_path_handles_a_two_dimensional_input():
    x = torch.randn(3, 16, dtype=torch.float64)
    lora = aurora_fx.registry.build_adapter(aurora_fx.LoraConfig(rank=3), 16, 8, dtype=torch.float64)
    lora.B.data.normal_()
    stacked = adapter_set.stack_forms([lora.row_form()])
    out = adapter_set._gathered_delta(x, torch.tensor([0, -1, 0]), stacked, 0.0)
    assert out.shape == (3, 8) and torch.equal(out[1], torch.zeros(8, dtype=torch.float64))
    assert (out[0] - lora.oracle_delta(x[0])).abs().max() <= 1e-12
