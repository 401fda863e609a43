"""The official AROMA loop's port (benchmarks/official_aroma.py): its schedule, its checks and the defects it
keeps on purpose, each against values worked out from the official code by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quality as BQ  # noqa: E402
import official_aroma as OA  # noqa: E402


def _layer(max_steps=100, check_every=2, change=0.1, converge=1e-3, d_in=6, d_out=5):
    torch.manual_seed(0)
    return OA.OfficialAromaLinear(nn.Linear(d_in, d_out), 1, 4.0, 0.0, check_every=check_every,
                                  max_steps=max_steps, change_threshold=change, convergence_threshold=converge,
                                  window=1)


def test_forward_is_the_base_plus_the_scaled_piece():
    layer = _layer()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6)
    expected = x @ layer.weight.T + layer.bias + 4.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_the_inner_snapshot_keeps_the_difference_as_the_official_code_does():
    layer = _layer(check_every=1, change=1e-9)
    products = []
    for value in (1.0, 2.0, 4.0):
        layer.lora_B.weight.data.fill_(value)
        products.append(layer.lora_B.weight @ layer.lora_A.weight)
        assert not layer.wants_reset()
    # after checks at P1, P2, P3 the snapshot is (P3 − (P2 − P1)), not P3
    torch.testing.assert_close(layer.previous_product, products[2] - (products[1] - products[0]))


def test_a_layer_asks_for_a_reset_after_max_steps_and_when_stabilized():
    layer = _layer(max_steps=5, check_every=100)
    asks = [layer.wants_reset() for _ in range(10)]
    assert asks == [False] * 4 + [True] + [False] * 4 + [True]
    still = _layer(check_every=1, change=0.5)
    still.lora_B.weight.data.fill_(1.0)
    assert [still.wants_reset() for _ in range(3)] == [False, True, True]  # no change: stabilized, and stays


def test_merge_writes_the_piece_into_the_weight_and_a_still_weight_converges_dropping_the_piece():
    layer = _layer(converge=1e-3)
    layer.lora_B.weight.data.fill_(0.1)
    expected = layer.weight + 4.0 * layer.lora_B.weight @ layer.lora_A.weight
    layer.merge_check_and_reinit()
    torch.testing.assert_close(layer.weight, expected)
    assert layer.merges == 1 and torch.count_nonzero(layer.lora_B.weight) == 0
    layer.lora_B.weight.data.fill_(1e-7)  # a tiny second piece: relative change < 1e-3
    before = layer.weight.clone()
    layer.merge_check_and_reinit()
    assert layer.converged and layer.merges == 1 and torch.equal(layer.weight, before)


def test_the_schedule_is_relora_cosine_with_multiple_warmups():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    config = OA.OfficialConfig(first_warmup=100, restart_warmup=50, min_lr_ratio=0.1)
    sched = OA.schedule(opt, 600, 200, config)
    factor = sched.lr_lambdas[0]
    cosine = lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    assert factor(50) == pytest.approx(0.5)
    assert factor(150) == pytest.approx(cosine(50 / 500))
    assert factor(200) == 0.0  # a restart on the clock
    assert factor(225) == pytest.approx(25 / 50 * cosine((200 + 50 - 100) / 500))
    assert factor(260) == pytest.approx(cosine(160 / 500))


def test_t_in_divides_the_budget():
    assert OA.t_in_for(600) == 200 and OA.t_in_for(286) == 143 and OA.t_in_for(3000) == 200
    for steps in (100, 286, 599, 600, 1001):
        assert steps % OA.t_in_for(steps) == 0


def test_the_reset_runs_before_the_step_so_the_old_gradient_moves_the_fresh_piece():
    layer = _layer(max_steps=1)
    opt = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.1)
    loop = OA.OfficialLoop([layer], opt, OA.OfficialConfig())
    layer.lora_B.weight.data.fill_(0.5)
    layer(torch.randn(4, 6)).sum().backward()
    grad_b = layer.lora_B.weight.grad.clone()
    opt.step()  # the hook merged and re-initialised B to 0 first, then the step applied the old gradient
    assert loop.resets == [1] and layer.merges == 1
    torch.testing.assert_close(layer.lora_B.weight, -0.1 * grad_b)


def test_the_optimizer_reset_draws_one_mask_per_buffer():
    layer = _layer(max_steps=1)
    opt = torch.optim.Adam([layer.lora_A.weight, layer.lora_B.weight], lr=0.1)
    loop = OA.OfficialLoop([layer], opt, OA.OfficialConfig(prune_ratio=0.5))
    state = opt.state[layer.lora_A.weight] = {"exp_avg": torch.ones(1, 6 * 1000), "exp_avg_sq": torch.ones(1, 6000)}
    loop._reset_optimizer()
    kept_m, kept_v = state["exp_avg"] != 0, state["exp_avg_sq"] != 0
    assert 0.4 < kept_m.float().mean() < 0.6 and (kept_m & ~kept_v).any()  # m kept over an emptied v


def test_every_layer_converged_stops_training():
    layer = _layer(max_steps=1, converge=10.0)  # any weight change counts as converged
    opt = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.1)
    OA.OfficialLoop([layer], opt, OA.OfficialConfig())
    layer(torch.randn(4, 6)).sum().backward()
    opt.step()  # first reset: always merges
    layer(torch.randn(4, 6)).sum().backward()
    with pytest.raises(OA.StopTraining, match="every layer converged at step 2"):
        opt.step()


def test_the_reference_row_trains_on_a_tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    from aurora_fx.train import Encoded

    torch.manual_seed(0)
    ids = torch.randint(1, 50, (24, 8))
    enc = Encoded(ids, torch.ones_like(ids), torch.randint(0, 3, (24,)))
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    setting = BQ.DataSetting("bbc", 12, 8, 24, 2, steps=12)
    record = BQ.fit(model, BQ.method_named("aroma_official_r1"), setting, (enc, enc, enc), 0, 5e-3, 0)
    assert record.steps == 12 and record.extra["t_in"] == 6 and record.extra["resets"] == [6, 12]
    assert record.extra["merges"] == [2, 2, 2, 2] and record.stored_params == 4 * 3 * 32
    assert record.adapter_params == 4 * 32 and 0.0 <= record.test_accuracy <= 1.0
