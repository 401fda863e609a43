"""bench_quality's protocol (LR chosen on validation, resume, claims) and the synthetic claim test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quality as BQ  # noqa: E402
import synthetic as SY  # noqa: E402


def _record(method="lora_r8", lr=2e-3, seed=0, val=0.5, test=0.5, dataset="bbc"):
    return BQ.RunRecord(dataset, method, lr, seed, val, test, 100, 50, 1.0)


def test_learning_rate_is_chosen_on_validation_never_on_test():
    sweep = [_record(lr=2e-3, val=0.80, test=0.99), _record(lr=5e-3, val=0.85, test=0.60)]
    assert BQ.choose_lr(sweep).lr == 5e-3


def test_ties_on_validation_keep_the_earlier_rate():
    assert BQ.choose_lr([_record(lr=2e-3, val=0.8), _record(lr=5e-3, val=0.8)]).lr == 2e-3


def test_store_is_resumable_and_runner_skips_finished_runs(tmp_path):
    store = BQ.RunStore(tmp_path / "runs.json")
    mode = BQ.Mode("t", (BQ.DataSetting("bbc", 1, 8, 1, 1),), ("lora_r8",), (0, 1, 2), True, SY.SyntheticConfig())
    for lr in BQ.ADAPTER_LRS:
        store.put(_record(lr=lr, val=0.9 if lr == 5e-3 else 0.1))
    for seed in (1, 2):
        store.put(_record(lr=5e-3, seed=seed, test=0.7))
    reloaded = BQ.RunStore(tmp_path / "runs.json")
    assert len(reloaded.runs) == 4

    def no_training(num_labels):
        raise AssertionError("a finished run was trained again")

    prep = BQ.Prepared(mode.data[0], 5, None, None, None)
    seeds = BQ.Runner(reloaded, mode, no_training).method(prep, BQ.method_named("lora_r8"))
    assert [(r.lr, r.seed) for r in seeds] == [(5e-3, 0), (5e-3, 1), (5e-3, 2)]
    assert BQ.planned_runs(mode) == 4
    (row,) = BQ.rows_from_store(mode, reloaded)
    assert (row.lr, row.seeds, row.test_median) == (5e-3, 3, 0.7)


def test_report_leaves_out_methods_whose_sweep_is_unfinished_and_counts_seeds(tmp_path):
    store = BQ.RunStore(tmp_path / "runs.json")
    mode = BQ.Mode("t", (BQ.DataSetting("bbc", 1, 8, 1, 1),), ("lora_r8", "aurora_r2"), (0, 1, 2), True,
                   SY.SyntheticConfig())
    store.put(_record(method="aurora_r2", lr=2e-3))
    for lr in BQ.ADAPTER_LRS:
        store.put(_record(lr=lr))
    (row,) = BQ.rows_from_store(mode, store)
    assert (row.method, row.seeds) == ("lora_r8", 1)
    assert BQ.RunStore(tmp_path / "runs.json", fresh=True).runs == {}


def test_claims_state_the_comparison_with_numbers():
    def row(method, accs, params):
        return BQ.Row("bbc", method, 1e-3, {}, sorted(accs)[1], min(accs), max(accs), params, params, 1.0)

    rows = [row("lora_r8", [0.90, 0.91, 0.92], 73728), row("aurora_r2", [0.93, 0.94, 0.95], 18672),
            row("aroma_r1", [0.80, 0.81, 0.82], 9216), row("peft_lora_r8", [0.905, 0.91, 0.915], 73728)]
    text = "\n".join(BQ.claims(rows))
    assert "AuroRA r̃=2 0.940 [0.930, 0.950] with 18,672 adapter params beats (median +3.0 points) LoRA r=8" in text
    assert "AROMA r=1 0.810 [0.800, 0.820] with 9,216 adapter params falls short (-10.0 points) of" in text
    assert "agree within the seed spread" in text
    assert "25.3% of its params" in text


def _tiny_classifier(num_labels):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    num_labels=num_labels))


@pytest.mark.parametrize("name", ["full", "head", "lora_r8", "aurora_r2", "aroma_r1", "peft_lora_r8",
                                  "aurora_r2_all"])
def test_every_method_trains_on_a_tiny_bert(name):
    from aurora_fx.train import Encoded

    torch.manual_seed(0)
    ids = torch.randint(1, 50, (24, 8))
    enc = Encoded(ids, torch.ones_like(ids), torch.randint(0, 3, (24,)))
    prep = BQ.Prepared(BQ.DataSetting("bbc", 12, 8, 24, 24, batch_size=4), 3, enc, enc, enc)
    record = BQ.train_one(prep, BQ.method_named(name), 5e-3, 0, _tiny_classifier)
    assert 0.0 <= record.test_accuracy <= 1.0 and record.seconds > 0
    head = 16 * 3 + 3
    frozen_body = name not in ("full",)
    assert record.trainable_params > (head if name != "head" else 0)
    if frozen_body:
        assert record.trainable_params < sum(p.numel() for p in _tiny_classifier(3).parameters()) / 2
    if name.startswith("aroma"):
        assert record.extra["ranks"] and record.extra["stored_adapter_params"] > 0
    if name in ("lora_r8", "peft_lora_r8"):
        assert record.adapter_params == 2 * 2 * 8 * (16 + 16)


SMALL = SY.SyntheticConfig(dim=16, n_train=1024, n_test=1024, steps=400, restarts=2, lora_ranks=(2, 8),
                           aurora_ranks=(2,))


@pytest.fixture(scope="module")
def fits():
    return {(f.target, f.method, f.rank): f for f in SY.run_synthetic(SMALL)}


def test_no_nonlinearity_beats_the_best_rank_r_linear_map_on_a_linear_target(fits):
    aurora, lora = fits["linear", "aurora", 2], fits["linear", "lora", 2]
    assert aurora.rel_error >= aurora.optimum - 0.03
    assert lora.rel_error == pytest.approx(lora.optimum, abs=0.03)
    assert fits["linear", "lora", 8].rel_error < 0.01


def test_no_linear_map_of_any_rank_escapes_the_floor_of_a_nonlinear_rank_2_target(fits):
    r2, r8 = fits["nonlinear", "lora", 2].rel_error, fits["nonlinear", "lora", 8].rel_error
    assert r8 == pytest.approx(r2, abs=0.02) and r2 > 0.3
    assert fits["nonlinear", "aurora", 2].params < fits["nonlinear", "lora", 8].params


def test_format_fits_lists_every_student(fits):
    assert len(SY.format_fits(list(fits.values())).splitlines()) == 1 + len(fits)


def test_matches_means_a_median_within_one_point_not_overlapping_ranges():
    def row(method, accs):
        return BQ.Row("tweets", method, 1e-3, {}, sorted(accs)[1], min(accs), max(accs), 10, 10, 1.0)

    lora = row("lora_r8", [0.59, 0.624, 0.64])
    close = BQ._compare("tweets", "X", row("aurora_r2", [0.608, 0.616, 0.62]), lora)
    far = BQ._compare("tweets", "X", row("aroma_r1", [0.52, 0.544, 0.608]), lora)
    assert "matches (median -0.8 points, within 1)" in close
    assert "falls short (-8.0 points, seed ranges overlap) of" in far
