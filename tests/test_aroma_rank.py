"""AROMA finds the rank: compaction to the effective rank, stopping when a piece adds nothing, honest sizes.

The toy has three independent linear maps on separate slices of the input, so each map's target
update is identifiable on its own; the teacher changes them by updates of known rank.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aurora_fx
from aurora_fx import functional as AF
from aurora_fx.aroma import AromaController


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is several times faster than two fighting over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Slices(nn.Module):
    """Independent bias-free linear maps, each on its own slice of the input; outputs concatenated."""

    def __init__(self, widths: list[tuple[int, int]]) -> None:
        super().__init__()
        self.widths = widths
        self.maps = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, [i for i, _ in self.widths], dim=-1)
        return torch.cat([m(p) for m, p in zip(self.maps, parts, strict=True)], dim=-1)


def _delta(d_in: int, d_out: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A rank-``rank`` update with singular values spread over [1, 2]."""
    if rank == 0:
        return torch.zeros(d_out, d_in)
    u = torch.linalg.qr(torch.randn(d_out, rank, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(d_in, rank, generator=gen))[0]
    return u @ torch.diag(torch.linspace(2.0, 1.0, rank)) @ v.T


def _teach(widths, ranks, seed=0, steps=3000):
    """Train AROMA on every map towards the teacher; returns the student, controller and loss drop."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = Slices(widths)
    teacher = [m.weight.detach() + _delta(i, o, r, gen) for m, (i, o), r in zip(student.maps, widths, ranks,
                                                                                   strict=True)]
    aurora_fx.apply(student, r"maps\.\d", method="aroma", dropout=0.0)
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(student), lr=1e-2)
    controller = AromaController(student, optimizer, inner_check_every=5, inner_threshold=0.05, max_inner_steps=150,
                                 outer_threshold=1e-2, rewarm_steps=20)
    d_in = sum(i for i, _ in widths)

    def loss(x):
        parts = torch.split(x, [i for i, _ in widths], dim=-1)
        y = torch.cat([p @ t.T for p, t in zip(parts, teacher, strict=True)], dim=-1)
        return (student(x) - y).pow(2).mean()

    probe = torch.randn(2048, d_in, generator=gen)
    with torch.no_grad():
        before = loss(probe).item()
    for _ in range(steps):
        value = loss(torch.randn(256, d_in, generator=gen))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        controller.step()
        if controller.done:
            break
    done = controller.done
    controller.finalize()
    with torch.no_grad():
        drop = 1 - loss(probe).item() / before
    return student, controller, done, drop


def _check_found(widths, ranks, student, done, drop):
    infos = aurora_fx.adapters(student)
    found = [a.rank for a in infos]
    for true, got in zip(ranks, found, strict=True):
        assert (got <= 1) if true == 0 else abs(got - true) <= 1, (found, ranks)
    stored = sum(a.num_params for a in infos)
    assert stored <= 1.5 * sum(r * (i + o) for (i, o), r in zip(widths, ranks, strict=True)) + 1e-9
    assert drop >= 0.99 and done


def test_the_controller_finds_known_ranks_and_stops_by_itself():
    widths, ranks = [(48, 48), (48, 32), (32, 48)], [3, 0, 5]
    student, controller, done, drop = _teach(widths, ranks)
    _check_found(widths, ranks, student, done, drop)
    assert [s.pieces for s in controller.site_ranks()] >= [3, 1, 5]  # it merged at least that many pieces


@pytest.mark.slow
def test_it_finds_ranks_drawn_from_a_seeded_generator():
    gen = torch.Generator().manual_seed(3)
    widths = [tuple(int(v) for v in torch.randint(24, 65, (2,), generator=gen)) for _ in range(3)]
    ranks = [int(torch.randint(0, 7, (1,), generator=gen)) for _ in range(3)]
    student, _, done, drop = _teach(widths, ranks, seed=1)
    _check_found(widths, ranks, student, done, drop)


def _planted(m, n, rank, noise, gen):
    u, v = torch.randn(m, rank, generator=gen, dtype=torch.float64), torch.randn(rank, n, generator=gen,
                                                                                  dtype=torch.float64)
    pieces = torch.randn(m, 9, generator=gen, dtype=torch.float64) @ torch.randn(9, rank, generator=gen,
                                                                                 dtype=torch.float64)
    U = torch.cat([u, pieces * 0.1, noise * torch.randn(m, 4, generator=gen, dtype=torch.float64)], 1)
    V = torch.cat([v, torch.randn(rank, n, generator=gen, dtype=torch.float64),
                   torch.randn(4, n, generator=gen, dtype=torch.float64)], 0)
    return U, V


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.3])
def test_compaction_changes_the_update_by_exactly_the_dropped_tail(tol):
    gen = torch.Generator().manual_seed(0)
    U, V = _planted(40, 30, 3, 1e-3, gen)
    new_u, new_v, tail = AF.compact_factors(U, V, tol)
    exact = torch.linalg.svdvals(U @ V)
    k = int((exact > max(tol, 1e-12) * exact[0]).sum())  # (the dense SVD has float-noise values past rank P)
    assert new_u.shape == (40, k) and new_v.shape == (k, 30)
    assert tail == pytest.approx(exact[k:].norm().item(), rel=1e-9, abs=1e-12)
    assert (U @ V - new_u @ new_v).norm().item() == pytest.approx(tail, rel=1e-6, abs=1e-10)
    if tol == 0.0:
        assert tail < 1e-9  # tolerance 0 keeps every non-zero singular value: exact


def test_every_compaction_in_training_stays_within_its_bound_and_save_load_merge_is_exact(tmp_path):
    widths, ranks = [(24, 20), (16, 24)], [2, 3]
    tails = []
    original = aurora_fx.methods.aroma.AF.compact_factors

    def recording(U, V, tol):
        new_u, new_v, tail = original(U, V, tol)
        tails.append(((U.double() @ V.double() - new_u.double() @ new_v.double()).norm().item(), tail))
        return new_u, new_v, tail

    aurora_fx.methods.aroma.AF.compact_factors = recording
    try:
        student, _, _, _ = _teach(widths, ranks, steps=600)
    finally:
        aurora_fx.methods.aroma.AF.compact_factors = original
    assert tails and all(abs(measured - bound) <= 1e-5 + 1e-6 * bound for measured, bound in tails)
    x = torch.randn(16, 40)
    with torch.no_grad():
        expected = student(x)
    path = aurora_fx.save_adapters(student, tmp_path)
    fresh = Slices(widths)
    fresh.load_state_dict({k: v for k, v in student.state_dict().items() if ".adapter" not in k}, strict=False)
    aurora_fx.load_adapters(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(aurora_fx.merge(fresh)(x), expected, rtol=0, atol=1e-5)


def _fit_one(d_in, d_out, steps=400, **controller):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    target = nn.Linear(d_in, d_out)
    aurora_fx.apply(model, "^0$", method="aroma", dropout=0.0)
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=2e-2)
    ctl = AromaController(model, optimizer, **{"inner_check_every": 2, "max_inner_steps": 10,
                                               "outer_threshold": 1e-6, **controller})
    for _ in range(steps):
        x = torch.randn(64, d_in)
        loss = (model(x) - target(x).detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctl.step()
        if ctl.done:
            break
    return model, ctl


def test_a_site_never_grows_past_its_full_rank_and_then_stops():
    model, ctl = _fit_one(8, 64)
    adapter = model[0].adapter
    assert adapter.merged_rank <= 8 and ctl.done and adapter.frozen
    assert aurora_fx.adapters(model)[0].num_params <= 8 * (8 + 64)  # never more than a full-rank update stores


def test_a_stopped_site_computes_and_stores_only_its_frozen_factors():
    model, ctl = _fit_one(8, 64)
    code = model[0].code
    assert "adapter_u" in code.lower() and "adapter.A" not in code and "adapter_a" not in code.lower()
    info = aurora_fx.adapters(model)[0]
    assert info.num_params == info.rank * (8 + 64) and info.trainable_params == 0
    assert info.details["active"] is False and info.details["effective rank"] == info.rank


def test_finalize_keeps_an_active_piece_only_if_it_trained():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    aurora_fx.apply(model, "^0$|^1$", method="aroma", dropout=0.0)
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-2)
    ctl = AromaController(model, optimizer)
    with torch.no_grad():
        model[0].adapter.B.normal_()  # trained; site 1's B is still zero
    result = ctl.finalize()
    assert result.kept == ("0",) and result.discarded == ("1",)
    assert model[0].adapter.merged_rank == 1 and model[1].adapter.merged_rank == 0  # no zero column in U


def test_adams_step_resets_with_the_moments_when_asked():
    for reset_step, expected in ((True, 0.0), (False, 3.0)):
        model = nn.Sequential(nn.Linear(8, 8))
        aurora_fx.apply(model, "^0$", method="aroma", dropout=0.0)
        optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=1e-2)
        ctl = AromaController(model, optimizer, inner_check_every=1, max_inner_steps=3, reset_step=reset_step)
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            ctl.step()
        assert ctl.outer == 1 and float(optimizer.state[model[0].adapter.A]["step"]) == expected
