"""inspect(): table, per-site code, networkx views."""

from __future__ import annotations

import networkx as nx
import pytest

import aurora_fx
from tests.models import CASES


def _report(fuse=True):
    case = CASES["roberta_cls"]
    model = case.build()
    aurora_fx.apply(model, case.pattern, trainable_modules="classifier", fuse=fuse)
    return model, aurora_fx.inspect(model)


def test_table_lists_sites_and_totals():
    model, report = _report()
    text = str(report)
    assert "roberta.encoder.layer.1.attention.self.value" in text
    assert f"{report.adapter_params:,} adapter parameters" in text
    assert report.adapter_params == 4 * (2 * (64 + 64) + 4 + 16)
    assert report.trainable_params == sum(p.numel() for p in aurora_fx.trainable_parameters(model))


def test_code_of_a_site_is_its_rewritten_forward():
    _, report = _report()
    code = report.code("roberta.encoder.layer.0.attention.self.query")
    assert "aurora_fx_ops_fused_aurora_linear(input_1, weight, bias, adapter_a_1" in code  # the fused op owns the GEMM
    with pytest.raises(KeyError, match="no adapted site 'nope'"):
        report.code("nope")


def test_site_graph_shows_base_and_adapter_roles():
    _, report = _report(fuse=False)
    g = report.site_graph("roberta.encoder.layer.0.attention.self.query")
    assert nx.is_directed_acyclic_graph(g)
    roles = nx.get_node_attributes(g, "role")
    assert {"input", "base", "adapter", "sum", "output"} <= set(roles.values())
    targets = [d["target"] for _, d in g.nodes(data=True) if d["role"] == "adapter"]
    assert "bspline_basis" in targets and targets.count("tanh") == 2


def test_module_map_flags_adapted_sites():
    _, report = _report()
    g = report.to_networkx()
    assert nx.is_tree(g)
    adapted = [n for n, d in g.nodes(data=True) if d["adapted"]]
    assert len(adapted) == 4
    node = g.nodes["roberta.encoder.layer.0.attention.self.query"]
    assert (node["method"], node["rank"], node["type"]) == ("aurora", 2, "Linear")
