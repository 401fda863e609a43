"""bench_quality's protocol (splits, grids grown at edges, choices on validation, the recipe study,
scheduling and verdicts) and the synthetic claim test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quality as BQ  # noqa: E402
import quality_protocol as QP  # noqa: E402
import synthetic as SY  # noqa: E402

from aurora_fx.data import TextDataset, load_bbc, text_key  # noqa: E402


def _data(n=60, dup_every=5):
    texts = [f"text number {i}" for i in range(n)]
    texts += [f"Text  Number {i}" for i in range(0, n, dup_every)]  # duplicates up to case and spacing
    return TextDataset(tuple(texts), tuple(i % 3 for i in range(len(texts))), ("a", "b", "c"))


def test_splits_drop_duplicates_first_and_never_share_a_text():
    splits = QP.make_splits(_data(), test=10, val=8)
    assert splits.duplicates_removed == 12
    assert (len(splits.test), len(splits.val), len(splits.train)) == (10, 8, 42)
    keys = [{text_key(t) for t in getattr(splits, s).texts} for s in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_check_disjoint_catches_a_text_in_two_splits():
    splits = QP.make_splits(_data(), test=10, val=8)
    test = splits.test
    leaked_test = TextDataset(test.texts + (splits.train.texts[0].upper(),), test.labels + (0,), test.label_names)
    leaked = QP.Splits(splits.train, splits.val, leaked_test, 0, 0)
    with pytest.raises(AssertionError, match="1 text\\(s\\) are in both the train and the test split"):
        QP.check_disjoint(leaked)


def test_real_bbc_splits_have_zero_overlap():
    splits = QP.make_splits(load_bbc(), test=400, val=200)
    assert splits.sizes() == {"total": 2225, "duplicates_removed": 101, "train": 1524, "val": 200, "test": 400}


def _plan(scores: dict[int, float], half=2, max_extra=3):
    grid = QP.GridPlan(1e-3, half=half, max_extra=max_extra)
    return QP.MethodPlan("bbc", "m", grid, (0, 1, 2), {k: QP.Score(v, 1.0) for k, v in scores.items()})


def test_a_best_rate_at_the_top_edge_grows_the_grid_until_it_is_interior():
    plan = _plan({-2: 0.5, -1: 0.6, 0: 0.7, 1: 0.8, 2: 0.9})
    assert plan.grid_needs() == [3] and plan.chosen() is None
    assert [k.k for k in QP.next_runs(plan, set())] == [3]
    plan = _plan({-2: 0.5, -1: 0.6, 0: 0.7, 1: 0.8, 2: 0.9, 3: 0.95})
    assert plan.grid_needs() == [4]
    plan = _plan({-2: 0.5, -1: 0.6, 0: 0.7, 1: 0.8, 2: 0.9, 3: 0.95, 4: 0.94})
    assert plan.grid_needs() == [] and plan.chosen() == 3 and not plan.at_edge()
    assert [(k.k, k.seed) for k in QP.next_runs(plan, set())] == [(3, 1), (3, 2)]


def test_a_best_rate_at_the_bottom_edge_grows_downwards_and_the_growth_is_capped():
    assert _plan({-2: 0.9, -1: 0.6, 0: 0.5, 1: 0.5, 2: 0.5}).grid_needs() == [-3]
    capped = _plan({-3: 0.95, -2: 0.9, -1: 0.6, 0: 0.5, 1: 0.5, 2: 0.5}, max_extra=1)
    assert capped.grid_needs() == [] and capped.chosen() == -3 and capped.at_edge()


def test_the_rate_is_chosen_on_validation_with_ties_broken_by_loss_then_the_lower_rate():
    grid = QP.GridPlan(1e-3)
    scores = {-2: QP.Score(0.8, 0.5), -1: QP.Score(0.9, 0.40), 0: QP.Score(0.9, 0.30), 1: QP.Score(0.9, 0.30),
              2: QP.Score(0.7, 0.1)}
    assert QP.MethodPlan("bbc", "m", grid, (0,), scores).chosen() == 0
    assert grid.rate(1) == pytest.approx(2e-3) and grid.rate(-2) == pytest.approx(2.5e-4)


def _record(method, k, seed=0, val=0.5, dataset="bbc", test=0.5):
    return BQ.RunRecord(dataset, method, k, seed, BQ.method_named(method.split("[")[0].removeprefix(
        BQ.STUDY_PREFIX)).center * 2.0**k, val, 1.0, test, 10, 5, 5, 3, 1.0)


def _finish_grid(store, method, best_k=0, dataset="bbc", val=0.8):
    for k in range(-2, 3):
        store.put(_record(method, k, val=val if k == best_k else 0.1, dataset=dataset))


def test_the_study_runs_first_and_aurora_rows_wait_for_its_recipe(tmp_path):
    store = BQ.RunStore(tmp_path / "runs.json")
    ready = {key.method for key, _, _ in BQ.ready_runs(store, BQ.FULL)}
    assert "aurora_r2" in ready and not {"aurora_r1", "aurora_r4", "aurora_r2_all"} & ready
    assert BQ.adopted_recipe(store, BQ.FULL) is None
    for ds in ("bbc", "tweets"):
        _finish_grid(store, "aurora_r2", dataset=ds)
    ready = [key for key, _, _ in BQ.ready_runs(store, BQ.FULL)]
    study = [key for key in ready if key.method.startswith(BQ.STUDY_PREFIX)]
    assert len(study) == 2 * len(BQ.STUDY) * 3 and {k.k for k in study} == {-1, 0, 1}


def _run_study(store, vals: dict[tuple[str, str], tuple[float, ...]]):
    """Finish the study: each candidate scores ``vals[(data, recipe name)]`` on the study seeds (default
    (0.70, 0.71, 0.72)) at its chosen rate; the other variants finish their seed-0 grid."""
    base = BQ.method_named("aurora_r2")
    for ds in ("bbc", "tweets"):
        _finish_grid(store, "aurora_r2", dataset=ds)
        for recipe in BQ.STUDY:
            name = base.with_recipe(recipe, BQ.STUDY_PREFIX).name
            for k in (-1, 0, 1):
                store.put(_record(name, k, val=0.8 if k == 0 else 0.1, dataset=ds))
        for recipe in BQ.CANDIDATES:
            name = base.with_recipe(recipe, BQ.STUDY_PREFIX).name
            for seed, val in zip(BQ.STUDY_SEEDS, vals.get((ds, BQ.recipe_name(recipe)), (0.70, 0.71, 0.72)),
                                 strict=True):
                store.put(_record(name, 0, seed=seed, val=val, dataset=ds))


def test_the_study_candidates_train_fresh_seeds_and_the_other_variants_seed_0_only(tmp_path):
    store = BQ.RunStore(tmp_path / "runs.json")
    base = BQ.method_named("aurora_r2")
    for ds in ("bbc", "tweets"):
        _finish_grid(store, "aurora_r2", dataset=ds)
        for recipe in BQ.STUDY:
            for k in (-1, 0, 1):
                store.put(_record(base.with_recipe(recipe, BQ.STUDY_PREFIX).name, k, val=0.8 if k == 0 else 0.1,
                                  dataset=ds))
    ready = {(key.dataset, key.method, key.k, key.seed) for key, _, _ in BQ.ready_runs(store, BQ.FULL)}
    study = {r for r in ready if r[1].startswith(BQ.STUDY_PREFIX) or r[1] == "aurora_r2"}
    names = ["aurora_r2"] + [base.with_recipe(r, BQ.STUDY_PREFIX).name for r in BQ.CANDIDATES[1:]]
    assert study == {(ds, n, 0, s) for ds in ("bbc", "tweets") for n in names for s in BQ.STUDY_SEEDS}
    assert BQ.adopted_recipe(store, BQ.FULL) is None  # the study is unfinished: AuroRA rows wait


def test_the_cheapest_candidate_stays_unless_another_beats_it_by_more_than_the_seed_spread(tmp_path):
    store = BQ.RunStore(tmp_path / "a.json")
    _run_study(store, {("bbc", "dropout=0.05"): (0.74, 0.75, 0.76)})  # +4 points, spread 2: beats
    assert BQ.adopted_recipe(store, BQ.FULL) == (("dropout", 0.05),)
    assert "aurora_r4[dropout=0.05]" in {m.name for m in BQ.main_rows(store, BQ.FULL)}
    store = BQ.RunStore(tmp_path / "b.json")
    _run_study(store, {("bbc", "dropout=0.05"): (0.70, 0.73, 0.76)})  # +2 points, spread 6: a tie
    assert BQ.adopted_recipe(store, BQ.FULL) == ()  # the cheapest of the tied ones
    assert "aurora_r4" in {m.name for m in BQ.main_rows(store, BQ.FULL)}
    store = BQ.RunStore(tmp_path / "c.json")
    _run_study(store, {("tweets", "dropout=0"): (0.60, 0.61, 0.62)})  # the baseline is beaten on tweets
    assert BQ.adopted_recipe(store, BQ.FULL) == (("scale_by_rank", False),)
    lines = BQ.format_recipe_scores(BQ.recipe_scores(store, BQ.FULL)).splitlines()
    cells = {tuple(c.strip() for c in line.split("|")[:2]): line.split("|")[-1].strip() for line in lines[2:]}
    assert cells[("tweets", "dropout=0")] == "-"  # the baseline beats nobody on tweets
    assert cells[("tweets", "scale_by_rank=False")] == "dropout=0"
    assert cells[("bbc", "scale_by_rank=False")] == "-"


def test_aurora_rows_report_fresh_seeds_not_the_rate_choosing_one(tmp_path):
    store = BQ.RunStore(tmp_path / "runs.json")
    _run_study(store, {})
    _finish_grid(store, "aurora_r4")
    method = BQ.method_named("aurora_r4")
    ready = {(key.k, key.seed) for key, m, _ in BQ.ready_runs(store, BQ.FULL) if key.method == "aurora_r4"
             and key.dataset == "bbc"}
    assert ready == {(0, 1), (0, 2), (0, 3)}
    for seed, test in ((1, 0.6), (2, 0.7), (3, 0.8)):
        store.put(_record("aurora_r4", 0, seed=seed, test=test))
    assert BQ.summarize(store, BQ.FULL, "bbc", method).tests == (0.6, 0.7, 0.8)  # seed 0's 0.5 is not reported


def test_the_protocols_aurora_baseline_has_no_dropout_whatever_the_library_default():
    import aurora_fx

    model = BQ.adapt(_tiny_classifier(3), BQ.method_named("aurora_r2"))
    assert {a.config["dropout"] for a in aurora_fx.adapters(model)} == {0.0}
    model = BQ.adapt(_tiny_classifier(3), BQ.method_named("aurora_r2").with_recipe((("dropout", 0.05),)))
    assert {a.config["dropout"] for a in aurora_fx.adapters(model)} == {0.05}


def test_report_rows_need_a_final_grid_and_every_seed(tmp_path):
    store = BQ.RunStore(tmp_path / "runs.json")
    _finish_grid(store, "lora_r8")
    assert BQ.summarize(store, BQ.FULL, "bbc", BQ.method_named("lora_r8")) is None
    for seed, test in ((1, 0.6), (2, 0.7)):
        store.put(_record("lora_r8", 0, seed=seed, test=test))
    row = BQ.summarize(BQ.RunStore(tmp_path / "runs.json"), BQ.FULL, "bbc", BQ.method_named("lora_r8"))
    assert row.tests == (0.5, 0.6, 0.7) and row.median == 0.6 and not row.at_edge
    assert row.lr == pytest.approx(BQ.ADAPTER_LR)


def test_verdicts_compare_at_matched_size_and_at_the_papers_ratio():
    def row(method, accs, stored):
        return BQ.Row("bbc", method, 1e-3, {}, False, tuple(accs), stored, stored, stored, 1.0)

    rows = [row("aurora_r2", (0.93, 0.94, 0.95), 18672), row("lora_r2", (0.935, 0.94, 0.945), 18432),
            row("lora_r8", (0.90, 0.91, 0.92), 73728)]
    text = "\n".join(BQ.verdicts(rows))
    assert "bbc (matched size): aurora_r2 0.940 [0.930, 0.950] with 18,672 adapter params matches (+0.0 points" in text
    assert "(the paper's ratio): aurora_r2 0.940 [0.930, 0.950] with 18,672 adapter params beats (+3.0 points)" in text
    assert "(0.25x the parameters; seed ranges do not overlap)" in text


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
    setting = BQ.DataSetting("bbc", 12, 8, 24, 4, epochs=1)
    record = BQ.fit(_tiny_classifier(3), BQ.method_named(name), setting, (enc, enc, enc), 0, 5e-3, 0)
    assert 0.0 <= record.test_accuracy <= 1.0 and record.seconds > 0 and record.steps == 6
    head = 16 * 3 + 3
    assert record.trainable_params > (head if name != "head" else 0)
    if name != "full":
        assert record.trainable_params < sum(p.numel() for p in _tiny_classifier(3).parameters()) / 2
    if name.startswith("aroma"):
        assert record.extra["ranks"] and record.stored_params > 0
    if name in ("lora_r8", "peft_lora_r8"):
        assert record.adapter_params == record.stored_params == 2 * 2 * 8 * (16 + 16)


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




def test_a_named_recipe_trains_aurora_rows_before_the_study_decides_without_its_runs(tmp_path):
    from dataclasses import replace

    store = BQ.RunStore(tmp_path / "runs.json")
    mode = replace(BQ.FULL, methods=("aurora_r4",), recipe=(("dropout", 0.05),))
    ready = {key.method for key, _, _ in BQ.ready_runs(store, mode)}
    assert ready == {"aurora_r4[dropout=0.05]"}  # no study runs, no other rows
    assert BQ.adopted_recipe(store, mode) is None  # the report still waits for the study


def test_the_seed_check_trains_more_seeds_at_the_chosen_rate_and_pairs_them_seed_by_seed(tmp_path):
    from dataclasses import replace

    store = BQ.RunStore(tmp_path / "runs.json")
    mode = replace(BQ.FULL, methods=("lora_r1", "aroma_r1"), seed_check=True)
    for method in ("lora_r1", "aroma_r1"):
        _finish_grid(store, method, best_k=1)
    rows = ("lora_r1", "aroma_r1")

    def ready(mode):  # the rows' bbc runs (the study's own runs are ready too)
        return {(k.method, k.k, k.seed) for k, _, _ in BQ.ready_runs(store, mode) if k.dataset == "bbc"
                and k.method in rows}

    assert ready(mode) == {(m, 1, s) for m in rows for s in (1, 2, 3, 4, 5)}
    assert ready(replace(mode, seed_check=False)) == {(m, 1, s) for m in rows for s in (1, 2)}  # the table's only
    assert BQ.check_seeds(BQ.FULL, BQ.method_named("aurora_r4")) == (4, 5, 6)  # after AuroRA's fresh 1-3
    lora = (0.8, 0.7, 0.6, 0.7, 0.8, 0.9)
    aroma = (0.7, 0.7, 0.7, 0.7, 0.7, 0.7)
    for seed in range(6):
        store.put(_record("lora_r1", 1, seed=seed, val=0.8 if seed == 0 else 0.1, test=lora[seed]))
        store.put(_record("aroma_r1", 1, seed=seed, val=0.8 if seed == 0 else 0.1, test=aroma[seed]))
    assert not ready(mode)
    checks = {c.method: c for c in BQ.seed_checks(store, mode)}
    assert checks["aroma_r1"].seeds == (0, 1, 2, 3, 4, 5) and checks["aroma_r1"].tests == aroma
    assert checks["aroma_r1"].paired == (-10.0, 0.0, 10.0, 0.0, -10.0, -20.0)
    assert checks["aroma_r1"].paired_median == -5.0 and checks["lora_r1"].paired is None
    assert BQ.summarize(store, mode, "bbc", BQ.method_named("aroma_r1")).tests == aroma[:3]  # the table's seeds
    assert checks["aroma_r1"].peer == "lora_r1"
    assert "lora_r1: -10.0 +0.0 +10.0 +0.0 -10.0 -20.0" in BQ.format_seed_checks(list(checks.values()))


def test_the_seed_check_pairs_an_aurora_recipe_variant_with_the_adopted_recipe(tmp_path):
    from dataclasses import replace

    store = BQ.RunStore(tmp_path / "runs.json")
    _run_study(store, {})  # adopts dropout 0 (nothing beats it)
    mode = replace(BQ.FULL, methods=("aurora_r4",))
    adopted, variant = "aurora_r4", "aurora_r4[dropout=0.05]"
    runs = {adopted: (0.70, 0.72, 0.74, 0.70, 0.72, 0.74), variant: (0.71, 0.74, 0.77, 0.7, 0.7, 0.7)}
    for method, tests in runs.items():
        _finish_grid(store, method)
        for seed, test in zip(range(1, 7), tests, strict=True):
            store.put(_record(method, 0, seed=seed, test=test))
    checks = {c.method: c for c in BQ.seed_checks(store, mode) if c.dataset == "bbc"}
    assert checks[variant].peer == adopted and checks[variant].seeds == (1, 2, 3, 4, 5, 6)
    assert checks[variant].paired == (1.0, 2.0, 3.0, 0.0, -2.0, -4.0) and checks[variant].paired_median == 0.5
    assert checks[adopted].peer == "lora_r1" and checks[adopted].paired is None  # LoRA r=1 has other seeds
    assert BQ.summarize(store, mode, "bbc", BQ.method_named("aurora_r4")).tests == (0.70, 0.72, 0.74)
