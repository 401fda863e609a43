"""Liveness: no adapter is reported that does not run.

For every model of the matrix (and a model whose root computes a linear map itself), with every
trainable tensor random and non-zero, perturbing any single trainable tensor changes the output;
and ``sites()``, ``adapters()`` and ``trainable_parameters()`` tell the same story.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aurora_fx
from tests.models import CASES, ModelCase, root_functional

METHODS = ("aurora", "lora", "aroma")
RANKS = {"aurora": 2, "lora": 2, "aroma": 1}  # below every site's min(d_in, d_out)
ROOT = ModelCase("root_functional", root_functional, lambda b, s: {"x": torch.randn(b, s, 16)}, "head", lambda o: o, 1)


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for p in aurora_fx.trainable_parameters(model):
            p.normal_(0.0, 0.3)


def _output(case: ModelCase, model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model(**inputs)).double()


def _assert_reports_agree(model: nn.Module) -> None:
    adapted = [s.path for s in aurora_fx.sites(model) if s.adapted]
    infos = aurora_fx.adapters(model)
    assert adapted == [a.path for a in infos]
    assert [s.adapted for s in aurora_fx.sites(model) if s.adapted] == [a.method for a in infos]
    owned = {id(p) for _, _, a in aurora_fx.inventory.adapter_modules(model) for p in a.parameters()}
    trainable = {id(p) for p in aurora_fx.trainable_parameters(model)}
    assert trainable == owned
    assert sum(a.trainable_params for a in infos) == sum(p.numel() for p in aurora_fx.trainable_parameters(model))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [*CASES.values(), ROOT], ids=lambda c: c.name)
def test_every_trainable_tensor_changes_the_output(case, method):
    model = aurora_fx.apply(case.build(), case.pattern, method=method, rank=RANKS[method], dropout=0.0)
    _assert_reports_agree(model)
    _randomize(model)
    inputs = case.inputs(2, 6)
    reference = _output(case, model, inputs)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(named) == case.sites * {"aurora": 4, "lora": 2, "aroma": 2}[method]
    for name, p in named:
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(torch.randn_like(p))
        moved = (_output(case, model, inputs) - reference).abs().max().item()
        with torch.no_grad():
            p.copy_(saved)
        assert moved > 1e-6, f"{name} does not reach the output of {case.name} ({method})"


def test_a_root_modules_own_weight_is_refused_with_its_name_and_the_fix():
    model = root_functional()
    site = aurora_fx.sites(model).get("w")
    assert site is not None and "root module (RootFunctional) computes w in its own forward" in site.reason
    assert "torch.nn.Sequential(model)" in site.reason
    with pytest.raises(ValueError, match=r"w: the root module .* Wrap the model"):
        aurora_fx.apply(model, "^w$")
    assert not aurora_fx.adapters(model) and all(p.requires_grad for p in model.parameters())


def test_wrapped_in_a_parent_the_root_weight_is_adapted_for_real():
    wrapped = aurora_fx.apply(nn.Sequential(root_functional()), r"^0\.w$", method="lora")
    _assert_reports_agree(wrapped)
    _randomize(wrapped)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = wrapped(x)
        wrapped[0].adapter_w.B.add_(1.0)
        assert (wrapped(x) - before).abs().max() > 1e-3


def test_swap_module_refuses_the_root():
    from aurora_fx.owners import swap_module

    with pytest.raises(ValueError, match="cannot swap the root module"):
        swap_module(nn.Linear(2, 2), "", nn.Identity())
