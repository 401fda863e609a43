"""find_sites: golden site lists, kinds, layouts, match rule and reasoned rejections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aurora_fx
from aurora_fx.passes.match import find_sites
from aurora_fx.passes.pattern import compile_pattern
from tests.models import CASES, FunctionalNet


class Matmuls(nn.Module):
    """Every spelling of a linear map on an own parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(5, 4))  # (d_out, d_in), used as x @ w.T
        self.w_mm = nn.Parameter(torch.randn(5, 6))  # (d_in, d_out), used as x @ w
        self.w_t2 = nn.Parameter(torch.randn(3, 6))  # used as x.matmul(w.t())
        self.w_add = nn.Parameter(torch.randn(3, 2))  # (d_in, d_out) in addmm
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        h = x @ self.w_t.T
        h = torch.matmul(h, self.w_mm)
        h = h.matmul(self.w_t2.t())
        return torch.addmm(self.bias, h.reshape(-1, 3), self.w_add)


def test_every_linear_spelling_is_a_site_with_its_layout():
    table = find_sites(nn.Sequential(Matmuls()))
    got = {s.path: (s.op, s.layout, s.in_features, s.out_features, s.kind) for s in table}
    assert got == {
        "0.w_t": ("matmul", "out_in", 4, 5, "functional"),
        "0.w_mm": ("matmul", "in_out", 5, 6, "functional"),
        "0.w_t2": ("matmul", "out_in", 6, 3, "functional"),
        "0.w_add": ("addmm", "in_out", 3, 2, "functional"),
    }


def test_gpt2_conv1d_sites_are_in_out():
    table = find_sites(CASES["gpt2"].build(), "c_attn")
    site = table.matched[0]
    assert (site.path, site.kind, site.layout, site.in_features, site.out_features) == (
        "transformer.h.0.attn.c_attn", "conv1d", "in_out", 64, 192)


def test_bert_golden_site_list():
    table = find_sites(CASES["bert"].build(), "query|value")
    assert [s.path for s in table.matched] == [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
    assert len(table) == 13  # 6 per layer + pooler


def test_pattern_is_searched_not_fullmatched():
    table = find_sites(CASES["timm_vit"].build(), "attn.*proj")
    assert [s.path for s in table.matched] == ["blocks.0.attn.proj", "blocks.1.attn.proj"]  # not attn.qkv


def test_list_and_callable_patterns():
    model = FunctionalNet()
    assert [s.path for s in find_sites(model, ["w_in$", "head"]).matched] == ["blocks.0.w_in", "blocks.1.w_in", "head"]
    only_first = find_sites(model, lambda path, module: path.startswith("blocks.0"))
    assert [s.path for s in only_first.matched] == ["blocks.0.w_in", "blocks.0.w_out"]


def test_no_pattern_matches_nothing():
    assert find_sites(FunctionalNet()).matched == ()


def test_invalid_regex_names_it():
    with pytest.raises(ValueError, match=r"invalid regex 'attn\[' in pattern"):
        compile_pattern("attn[")


def test_multihead_attention_sites_belong_to_the_attention_module():
    """``out_proj`` is never called by its parent: it is a site of the MHA (mha_sites.py), not of the Linear."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    table = find_sites(layer, "out_proj|in_proj")
    assert [(s.path, s.owner, s.reason) for s in table.matched] == [
        ("self_attn.in_proj_weight[q]", "self_attn", None), ("self_attn.in_proj_weight[k]", "self_attn", None),
        ("self_attn.in_proj_weight[v]", "self_attn", None), ("self_attn.out_proj", "self_attn", None)]
    assert table.untraceable == ()


class ReadsChildWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.proj.weight)  # bypasses proj.forward


def test_parent_reading_a_child_weight_marks_the_child_as_bypassed():
    site = find_sites(nn.Sequential(ReadsChildWeight()), "proj").matched[0]
    assert "reads proj.weight directly" in site.reason


def test_integer_weights_are_rejected():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    site = find_sites(nn.Sequential(lin), "0").matched[0]
    assert "torch.int8 is not floating point" in site.reason


class ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        if self.training:
            x = x * 2
        return F.linear(x, self.w)


def test_a_forward_that_branches_on_training_is_reported_untraceable():
    table = find_sites(nn.Sequential(ModeDependent()), "w")
    assert table.matched == ()
    assert "branches on self.training" in table.untraceable[0].error


def test_sites_table_prints_and_marks_adapted_sites():
    model = CASES["bert"].build()
    aurora_fx.apply(model, "query")
    table = aurora_fx.sites(model, "query|value")
    assert {s.path: s.adapted for s in table.matched}["encoder.layer.0.attention.self.query"] == "aurora"
    text = str(table)
    assert "encoder.layer.0.attention.self.value" in text and "aurora" in text
    # adapter internals are never sites themselves
    assert not any("adapter" in s.path for s in table)
