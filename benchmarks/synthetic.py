"""Teacher–student test of AuroRA's approximation claim, with the library's own adapters.

A frozen random linear layer ``W0`` (d→d) is the base.  The student is ``W0 x + adapter(x)``,
trained full-batch with Adam to fit a teacher ``W0 x + Δ(x)`` on isotropic Gaussian inputs:

* ``linear``: ``Δ(x) = ΔW x`` with ``ΔW`` of rank 8 and decaying singular values.  For
  isotropic inputs the best rank-r map is the truncated SVD (Eckart–Young), and no adapter whose
  output lies in an r-dimensional subspace can beat it, nonlinear or not: the optimum over such
  maps is a linear projection.  So AuroRA r̃ can at best *equal* LoRA r=r̃ here.
* ``nonlinear``: ``Δ(x) = B* g(A* x)`` with a rank-2 projection ``A*`` and an elementwise
  ``g = (tanh 3z₁, sin 2z₂)``.  Every linear map, of any rank, is stuck at the best linear
  approximation of ``Δ`` (which has rank ≤ 2); a nonlinear rank-2 adapter can go below it.

Errors are relative: test MSE of ``Δ`` divided by ``E‖Δ(x)‖²``.  Each student is trained from
``restarts`` random inits; the one with the lowest training loss is reported (and the median).
Parameter counts come from ``aurora_fx.adapters``.

    python benchmarks/synthetic.py          # prints the table (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch
from torch import nn

import aurora_fx

__all__ = ["SyntheticConfig", "Fit", "Teacher", "make_teacher", "fit", "run_synthetic", "format_fits"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and optimisation budget of the teacher–student runs."""

    dim: int = 64
    n_train: int = 2048
    n_test: int = 2048
    steps: int = 1500
    lrs: tuple[float, ...] = (3e-3,)
    restarts: int = 3
    lora_ranks: tuple[int, ...] = (1, 2, 4, 8)
    aurora_ranks: tuple[int, ...] = (1, 2, 4)
    seed: int = 0


@dataclass(frozen=True)
class Teacher:
    """A target update ``delta(x)`` and, for linear targets, the best rank-r relative errors."""

    name: str
    delta: object  # Callable[[Tensor], Tensor]
    optimum: dict[int, float] | None = None


@dataclass(frozen=True)
class Fit:
    """One student's result."""

    target: str
    method: str
    rank: int
    params: int
    rel_error: float
    rel_error_median: float
    optimum: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def make_teacher(name: str, dim: int, gen: torch.Generator) -> Teacher:
    """The ``linear`` (rank 8) or ``nonlinear`` (rank-2 projection) target update."""
    if name == "linear":
        u, _ = torch.linalg.qr(torch.randn(dim, 8, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(dim, 8, generator=gen))
        s = torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
        dw = u @ torch.diag(s) @ v.T
        total = float((s ** 2).sum())
        optimum = {r: float((s[r:] ** 2).sum()) / total for r in range(1, 9)}
        return Teacher(name, lambda x: x @ dw.T, optimum)
    if name == "nonlinear":
        a, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen))
        b = torch.randn(dim, 2, generator=gen) / math.sqrt(2)

        def delta(x: torch.Tensor) -> torch.Tensor:
            z = x @ a
            return torch.stack((torch.tanh(3 * z[:, 0]), torch.sin(2 * z[:, 1])), dim=1) @ b.T

        return Teacher(name, delta)
    raise ValueError(f"unknown teacher {name!r}; use 'linear' or 'nonlinear'")


def _student(base: nn.Linear, method: str, rank: int, seed: int) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(base.in_features, base.out_features))
    model[0].load_state_dict(base.state_dict())
    alpha = {"lora": 2.0 * rank, "aurora": 4.0}[method]
    aurora_fx.apply(model, pattern="0", method=method, rank=rank, alpha=alpha, dropout=0.0)
    return model, sum(a.trainable_params for a in aurora_fx.adapters(model))


def _train(base: nn.Linear, x: torch.Tensor, y: torch.Tensor, method: str, rank: int, lr: float, seed: int,
           cfg: SyntheticConfig) -> tuple[nn.Module, int, float]:
    model, params = _student(base, method, rank, seed)
    opt = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    model.train()
    for _ in range(cfg.steps):
        loss = (model(x) - y).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return model, params, float((model(x) - y).pow(2).sum(1).mean())


def fit(base: nn.Linear, teacher: Teacher, x: torch.Tensor, x_test: torch.Tensor, method: str, rank: int,
        cfg: SyntheticConfig) -> Fit:
    """Train students full-batch (Adam, cosine decay) for every learning rate in ``cfg.lrs`` and
    ``cfg.restarts`` random inits.  ``rel_error`` is the test error of the student with the lowest
    *training* loss; ``rel_error_median`` the median test error over all students (nonlinear
    students can stall in a bad basin, so a single init would misreport what the model class can do).
    """
    with torch.no_grad():
        y, y_test = base(x) + teacher.delta(x), base(x_test) + teacher.delta(x_test)
        scale = float(teacher.delta(x_test).pow(2).sum(1).mean())
    runs = [_train(base, x, y, method, rank, lr, cfg.seed + k, cfg) for lr in cfg.lrs for k in range(cfg.restarts)]
    with torch.no_grad():
        errors = [float((m(x_test) - y_test).pow(2).sum(1).mean()) / scale for m, _, _ in runs]
    best = min(range(len(runs)), key=lambda i: runs[i][2])
    optimum = teacher.optimum.get(rank) if teacher.optimum else None
    return Fit(teacher.name, method, rank, runs[0][1], errors[best], statistics.median(errors), optimum)


def run_synthetic(cfg: SyntheticConfig = SyntheticConfig(), progress: bool = False) -> list[Fit]:
    """Every (target, method, rank) student of ``cfg``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    base = nn.Linear(cfg.dim, cfg.dim)
    with torch.no_grad():
        base.weight.copy_(torch.randn(cfg.dim, cfg.dim, generator=gen) / math.sqrt(cfg.dim))
        base.bias.zero_()
    x = torch.randn(cfg.n_train, cfg.dim, generator=gen)
    x_test = torch.randn(cfg.n_test, cfg.dim, generator=gen)
    jobs = [(t, m, r) for t in ("linear", "nonlinear")
            for m, ranks in (("lora", cfg.lora_ranks), ("aurora", cfg.aurora_ranks)) for r in ranks]
    teachers = {t: make_teacher(t, cfg.dim, gen) for t in ("linear", "nonlinear")}
    from tqdm.auto import tqdm

    return [fit(base, teachers[t], x, x_test, m, r, cfg)
            for t, m, r in tqdm(jobs, desc="synthetic", disable=not progress, dynamic_ncols=True)]


def format_fits(fits: list[Fit]) -> str:
    """A plain-text table of ``fits``."""
    lines = [f"{'target':10s} {'method':7s} {'rank':>4s} {'params':>7s} {'rel. error':>10s} {'median':>8s} "
             f"{'best rank-r':>11s}"]
    for f in fits:
        best = f"{f.optimum:.4f}" if f.optimum is not None else "-"
        lines.append(f"{f.target:10s} {f.method:7s} {f.rank:4d} {f.params:7d} {f.rel_error:10.4f} "
                     f"{f.rel_error_median:8.4f} {best:>11s}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_fits(run_synthetic(progress=True)))
