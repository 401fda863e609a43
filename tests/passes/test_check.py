"""passes/check.py: the one place that decides whether a site can take an adapter."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from torch import nn

import aurora_fx
from aurora_fx.checkpoint import CheckpointError
from aurora_fx.config import AuroraConfig, LoraConfig
from aurora_fx.passes.check import check, require
from aurora_fx.records import SiteRequest


@pytest.fixture
def site():
    return aurora_fx.sites(nn.Sequential(nn.Linear(8, 4))).get("0")


def test_a_plain_linear_site_passes(site):
    assert check(site) is None and check(site, AuroraConfig()) is None


@pytest.mark.parametrize("facts, reason", [
    ({"is_parameter": False}, "buffer, not an nn.Parameter"),
    ({"floating": False, "dtype": "torch.int8"}, "torch.int8 is not floating point"),
    ({"ndim": 3}, "the weight is 3-D"),
    ({"owner": "", "owner_type": "Net", "param": "w"}, "root module \\(Net\\) computes w"),
    ({"bypass": "its parent reads it directly"}, "its parent reads it directly"),
])
def test_each_site_rule_refuses_with_its_reason(site, facts, reason):
    bad = replace(site, **facts)
    assert re.search(reason, check(bad) or "")
    assert check(bad, AuroraConfig()) == check(bad)  # the same reason with or without a config


def test_request_rules_need_a_config(site):
    assert "already has an adapter (lora)" in check(replace(site, adapted="lora"), AuroraConfig())
    assert check(replace(site, adapted="lora")) is None  # sites() shows it in its own column
    assert "rank 8 > min(in_features=8, out_features=4)" in check(site, LoraConfig())


def test_require_raises_the_given_error_naming_every_refused_site(site):
    requests = [SiteRequest(replace(site, path="a", ndim=1), AuroraConfig()), SiteRequest(site, AuroraConfig()),
                SiteRequest(replace(site, path="b", is_parameter=False), AuroraConfig())]
    with pytest.raises(CheckpointError, match=r"ctx 2 site\(s\) cannot take the adapter:\n  a: .*1-D.*\n  b: .*buffer"):
        require(requests, CheckpointError, "ctx")
    require(requests[1:2])


def test_a_method_can_refuse_a_site_through_its_check_site(site, monkeypatch):
    from aurora_fx.methods.aurora import AuroraAdapter

    monkeypatch.setattr(AuroraAdapter, "check_site", classmethod(lambda cls, s, c: f"no {s.path} today"))
    assert check(site, AuroraConfig()) == "no 0 today"
    with pytest.raises(ValueError, match="0: no 0 today"):
        aurora_fx.apply(nn.Sequential(nn.Linear(8, 4)), "0")
