"""AromaController on scripted toy problems with hand-checked answers (docs/methods.md §3.2)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import aurora_fx
from aurora_fx.aroma import AromaController, AromaLR

D_IN, D_OUT = 48, 64


def _toy(rank=1, **apply_kwargs):
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    aurora_fx.apply(model, "0", method="aroma", rank=rank, dropout=0.0, **apply_kwargs)
    return model, model[0].adapter


def _toy_exact(rank=1):
    """The toy with compaction keeping every non-zero singular value."""
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    aurora_fx.apply(model, "0", config=aurora_fx.AromaConfig(rank=rank, dropout=0.0, compact_tol=0.0))
    return model, model[0].adapter


def _frozen_step(model, optimizer):
    """An optimizer step with lr 0: Adam state exists, parameters do not move."""
    model(torch.randn(4, D_IN)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _controller(model, **kwargs):
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=0.0)
    return optimizer, AromaController(model, optimizer, **kwargs)


def test_inner_loop_stops_by_threshold_and_the_first_piece_is_merged():
    model, adapter = _toy()
    with torch.no_grad():
        adapter.B.normal_()
    optimizer, ctl = _controller(model, inner_check_every=2, max_inner_steps=100)
    piece_b, piece_a = adapter.B.detach().clone(), adapter.A.detach().clone()
    for _ in range(3):  # check at step 2 only records a snapshot
        _frozen_step(model, optimizer)
        ctl.step()
    assert ctl.outer == 0
    _frozen_step(model, optimizer)
    ctl.step()  # step 4: relative change 0 < 0.1 → stabilized → outer step → merge
    assert ctl.outer == 1 and adapter.merged_rank == 1 and adapter.pieces == 1
    torch.testing.assert_close(adapter.U @ adapter.V, (piece_b * adapter.scale) @ piece_a)  # compacted, exact
    assert torch.equal(adapter.B, torch.zeros_like(adapter.B)) and not torch.equal(adapter.A, piece_a)


def test_inner_loop_is_capped_by_max_inner_steps():
    model, adapter = _toy()
    optimizer, ctl = _controller(model, inner_check_every=1, max_inner_steps=5)
    for step in range(1, 6):
        with torch.no_grad():
            adapter.B.normal_()  # keeps moving: never stabilizes
        _frozen_step(model, optimizer)
        ctl.step()
        assert ctl.outer == (1 if step == 5 else 0)
    assert adapter.merged_rank == 1


def test_first_piece_is_merged_even_if_tiny():
    model, adapter = _toy()
    with torch.no_grad():
        adapter.B.fill_(1e-12)
    optimizer, ctl = _controller(model, inner_check_every=1, max_inner_steps=2, outer_threshold=0.5)
    for _ in range(2):
        _frozen_step(model, optimizer)
        ctl.step()
    assert ctl.outer == 1 and adapter.merged_rank == 1 and not ctl.done


def test_outer_stop_discards_the_last_piece_and_finishes():
    model, adapter = _toy()
    with torch.no_grad():
        adapter.B.normal_()
    optimizer, ctl = _controller(model, inner_check_every=1, max_inner_steps=2, outer_threshold=1e-3)
    for _ in range(2):
        _frozen_step(model, optimizer)
        ctl.step()
    assert adapter.merged_rank == 1
    with torch.no_grad():
        adapter.B.fill_(1e-9)  # the second piece is negligible next to W_eff
    for _ in range(2):
        _frozen_step(model, optimizer)
        ctl.step()
    assert ctl.done and adapter.frozen and adapter.merged_rank == 1  # discarded, not merged
    assert torch.equal(adapter.B, torch.zeros_like(adapter.B))
    assert not adapter.A.requires_grad and ctl.trainable_params() == 0
    assert ctl.ranks() == {"0": 1}
    assert adapter.A not in optimizer.state


def test_moments_are_reset_keeping_about_one_in_a_thousand_and_the_step():
    model = nn.Sequential(nn.Linear(1000, 1000))
    aurora_fx.apply(model, "0", method="aroma", rank=16, dropout=0.0)
    adapter = model[0].adapter
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=0.0)
    ctl = AromaController(model, optimizer, inner_check_every=1, max_inner_steps=1)
    with torch.no_grad():
        adapter.B.normal_()  # a piece that adds directions: the site keeps growing
    model(torch.randn(2, 1000)).sum().backward()
    optimizer.step()
    for p in (adapter.A, adapter.B):
        optimizer.state[p]["exp_avg"].fill_(1.0)
        optimizer.state[p]["exp_avg_sq"].fill_(1.0)
    ctl.step()  # outer step: merge + reset
    kept = sum(int(optimizer.state[p]["exp_avg"].count_nonzero()) for p in (adapter.A, adapter.B))
    total = adapter.A.numel() + adapter.B.numel()  # 32,000 entries
    assert 0.0004 < kept / total < 0.0018, kept
    assert float(optimizer.state[adapter.A]["step"]) == 1.0
    for p in (adapter.A, adapter.B):  # one mask per parameter: no first moment survives over an emptied second one
        state = optimizer.state[p]
        assert torch.equal(state["exp_avg"] != 0, state["exp_avg_sq"] != 0)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values()) if torch.is_tensor(a)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:  # new memory only, not views
                self.numels.append((func.__name__, tuple(t.shape), t.numel()))
        return out


def test_no_m_by_n_product_is_formed():
    model, adapter = _toy_exact(rank=2)
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-2)
    ctl = AromaController(model, optimizer, inner_check_every=1, max_inner_steps=3, outer_threshold=1e-9)
    recorder = _ShapeRecorder()
    for _ in range(9):  # inner checks, three outer steps with merges
        model(torch.randn(4, D_IN)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with recorder:
            ctl.step()
    assert adapter.merged_rank == 6
    biggest = max(recorder.numels, key=lambda r: r[2])
    assert biggest[2] < D_IN * D_OUT, biggest  # largest tensor is U or V, never (m, n)


def test_calls_without_an_optimizer_step_are_skipped_and_warned_about(caplog):
    model, _ = _toy()
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-3)
    ctl = AromaController(model, optimizer)
    ctl.step()  # before any optimizer step (a GradScaler may skip the first ones)
    _frozen_step(model, optimizer)
    ctl.step()
    ctl.step()  # twice without an optimizer step in between
    assert (ctl.steps, ctl.skipped_steps) == (1, 2)
    with caplog.at_level("WARNING", logger="aurora_fx.aroma"):
        for _ in range(10):
            ctl.step()
    assert "saw no optimizer step for 10 calls in a row" in caplog.text and ctl.steps == 1


def test_misuse_is_caught():
    model, _ = _toy()
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-3)
    with pytest.raises(ValueError, match="needs AROMA adapters"):
        AromaController(aurora_fx.apply(nn.Sequential(nn.Linear(4, 4)), "0"), optimizer)
    with pytest.raises(ValueError, match="optimizer does not hold the AROMA parameters"):
        AromaController(model, torch.optim.Adam([nn.Parameter(torch.zeros(1))]))


def test_aroma_lr_rewarms_after_a_merge():
    model, _ = _toy()
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1.0)
    scheduler = AromaLR(optimizer, max_steps=1000, first_warmup=10, rewarm_steps=20, min_lr_ratio=0.1)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    before = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "get_lr() called outside step()")
        scheduler.rewarm()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before / 20, rel=0.05)
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    for _ in range(19):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before, rel=0.05)


def test_generic_rewarm_ramps_the_rate_after_a_merge_without_a_scheduler():
    model, adapter = _toy()
    with torch.no_grad():
        adapter.B.normal_()
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=0.1)
    ctl = AromaController(model, optimizer, inner_check_every=1, max_inner_steps=5, rewarm_steps=4)
    seen = []
    for _ in range(9):
        _frozen_step(model, optimizer)
        ctl.step()
        seen.append(round(optimizer.param_groups[0]["lr"], 6))
    assert seen == [0.1, 0.1, 0.1, 0.1, 0.025, 0.05, 0.075, 0.1, 0.1]  # merge at step 5, then a 4-step ramp


def _teacher_problem(seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(D_IN, D_OUT))
    update = torch.randn(D_OUT, 3) @ torch.randn(3, D_IN) * 0.05  # the rank-3 update to learn
    x = torch.randn(512, D_IN)
    with torch.no_grad():
        y = base(x) + x @ update.T
    return base, x, y


def test_training_grows_rank_and_the_model_is_base_plus_merged_pieces(tmp_path):
    base, x, y = _teacher_problem()
    model = copy.deepcopy(base)
    aurora_fx.apply(model, "0", method="aroma", rank=1, alpha=1.0, dropout=0.0)
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=3e-2)
    ctl = AromaController(model, optimizer, inner_check_every=5, inner_threshold=0.02, max_inner_steps=60,
                          outer_threshold=0.02)
    for _ in range(2000):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctl.step()
        if ctl.done:
            break
    ctl.finalize()
    adapter = model[0].adapter
    assert ctl.done and 2 <= adapter.merged_rank <= 6 and ctl.trainable_params() == 0
    assert loss.item() < 0.02 * nn.functional.mse_loss(base(x), y).item()
    with torch.no_grad():
        ours = model(x)
        manual = base(x) + x @ (adapter.U @ adapter.V).T
        path = aurora_fx.save_adapters(model, tmp_path / "aroma.safetensors")
        reloaded = aurora_fx.load_adapters(copy.deepcopy(base), path)
        merged = aurora_fx.merge(copy.deepcopy(model))
    assert (ours - manual).abs().max() <= 1e-5
    assert (ours - reloaded(x)).abs().max() <= 1e-5 and reloaded[0].adapter.method == "aroma"
    assert reloaded[0].adapter.frozen and reloaded[0].adapter.merged_rank == adapter.merged_rank
    assert (ours - merged(x)).abs().max() <= 1e-5
    assert aurora_fx.adapters(reloaded)[0].rank == adapter.merged_rank
    assert torch.equal(aurora_fx.unload(model)(x), base(x))


def test_the_tracked_effective_weight_norm_is_exact_after_merges():
    """‖W0 + U·V‖² is kept without forming U·V: after each merge it must equal the dense computation."""
    torch.manual_seed(0)
    model = aurora_fx.apply(nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)), "^0$|^2$",
                            method="aroma", dropout=0.0)
    controller = aurora_fx.AromaController(model, torch.optim.SGD(aurora_fx.trainable_parameters(model), lr=0.0),
                                           max_inner_steps=1, outer_threshold=0.0)
    for _ in range(3):
        with torch.no_grad():
            for t in controller.tracks:
                t.adapter.B.normal_(0, 0.5)
        controller._outer_step()
        for t in controller.tracks:
            dense = t.weight().double() + t.adapter.U.double() @ t.adapter.V.double()
            assert t.wnorm2 == pytest.approx(float((dense ** 2).sum()), rel=1e-6)  # (W·V is float32)
    assert all(t.adapter.merged_rank >= 2 for t in controller.tracks)


def test_an_outer_step_that_only_stops_sites_does_not_rewarm():
    model, _ = _toy()
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1.0)
    scheduler = AromaLR(optimizer, max_steps=1000, first_warmup=1, rewarm_steps=20)
    controller = AromaController(model, optimizer, scheduler, max_inner_steps=1, outer_threshold=1e9)
    with torch.no_grad():
        for t in controller.tracks:
            t.adapter.B.normal_(0, 0.1)
    controller._outer_step()  # the first piece is always merged: a re-warm
    assert scheduler.last_merge == 0
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    controller._outer_step()  # every site stops by the threshold, nothing merges: no re-warm
    assert controller.history[-1].merged == () and scheduler.last_merge == 0


def _bad_merge_run(tolerance, steps=150):
    """A regression toy whose second and later merges are forced bad (U gets large noise): the training loss jumps.

    Returns the controller, the loss after the first inner period (the first piece alone) and the final loss.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh(), nn.Linear(D_OUT, 4))
    x = torch.randn(256, D_IN)
    y = torch.tanh(x @ torch.randn(D_IN, 4) / 4)
    aurora_fx.apply(model, "0|2", method="aroma", dropout=0.0)
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-2)
    controller = AromaController(model, optimizer, inner_check_every=5, max_inner_steps=20, inner_threshold=1e-9,
                                 outer_threshold=0.0, rollback_tolerance=tolerance)
    original = AromaController._merge
    merges = {"n": 0}

    def bad_merge(self, t, gen):
        grows = original(self, t, gen)
        merges["n"] += 1
        if merges["n"] > 2:  # both sites' first merges are fine, every later one is broken
            t.adapter.U = t.adapter.U + 3.0 * torch.randn_like(t.adapter.U)
        return grows

    AromaController._merge = bad_merge
    first, seen = None, []
    try:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seen.append(loss.item())
            controller.step(loss)
            if first is None and controller.outer == 1:  # the first piece alone: its inner period's mean loss
                first = sum(seen) / len(seen)
            if controller.done:
                break
        controller.finalize()
    finally:
        AromaController._merge = original
    with torch.no_grad():
        return controller, first, nn.functional.mse_loss(model(x), y).item()


def test_a_bad_merge_is_rolled_back_so_the_run_never_ends_worse_than_its_first_piece():
    controller, first, final = _bad_merge_run(0.05)
    assert controller.rollback is not None and controller.rollback.loss > controller.rollback.best_loss * 1.05
    assert first is not None and final <= first * 1.05, (final, first)
    assert all(s.converged for s in controller.site_ranks())
    _, first_unguarded, final_unguarded = _bad_merge_run(None)
    assert final_unguarded > 2 * first_unguarded  # the forced bad merges really hurt without the guarantee


def test_the_guarantee_needs_losses_and_keeps_quiet_without_them():
    model, _ = _toy()
    optimizer, controller = _controller(model, inner_check_every=1, max_inner_steps=2)
    for _ in range(2):
        _frozen_step(model, optimizer)
        controller.step()
    assert controller.outer == 1 and controller.rollback is None and controller._best is None
