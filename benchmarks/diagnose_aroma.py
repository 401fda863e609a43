"""Why AROMA r=1 learns less than the LoRA r=1 it starts as (issue 34): one instrumented run per variant.

    python benchmarks/diagnose_aroma.py [--data tweets] [--rate 2e-3] [--variants aroma,lora_r1,...] [--quick]

The quality protocol's setting (``bench_quality.py``: MiniLM-L6, q/v, its splits, budget, batch and AROMA
controller settings; seed 0), with every step recorded:

* the training loss, and validation accuracy and loss every ``--eval-every`` steps;
* per site, the pieces merged over time and the steps each piece trained before its merge (the outer steps);
* at each merge, the norm of the site's update before and after the merge + compaction (``‖ΔW‖_F``, from the
  factors), the compaction's dropped tail, and the re-warmed learning rate;
* the *update size*: per step, the RMS of the change of the active pieces' A and B divided by the step's learning
  rate. Calibrated Adam moves each element by about the rate (ratio ≈ 1 or below); after a moment reset with the
  step count kept, the bias correction no longer compensates the emptied second moment and the ratio rises.

Variants: ``aroma`` (the library's controller as ``bench_quality.py`` runs it), ``lora_r1`` (its schedule: linear
warm-up and decay), ``aroma_reset_step`` (the step count reset with the moments), ``aroma_no_reset``
(``prune_ratio=0``: moments kept), ``aroma_lora_schedule`` (the LoRA schedule, no re-warm), ``aroma_no_merge``
(one piece, never merged: LoRA r=1 under the AROMA schedule), ``aroma_tin_200`` / ``aroma_tin_300`` (the inner
loop's cap T_in at 200 / 300 steps instead of steps/6). Each inner check's relative change of the active pieces
(``‖B_t·A_t − B_{t−5}·A_{t−5}‖_F / ‖B_{t−5}·A_{t−5}‖_F``, median over sites; a piece "settles" below ε_in = 0.05)
is recorded too. Writes ``benchmarks/results/aroma_diagnosis.json`` and
a plot ``aroma_diagnosis.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import AROMA, FULL, QUICK, QV, _evaluate, prepared  # noqa: E402
from common import RESULTS, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402
from aurora_fx import functional as AF  # noqa: E402
from aurora_fx.aroma import AromaController, AromaLR  # noqa: E402
from aurora_fx.inventory import adapter_modules  # noqa: E402
from aurora_fx.train import make_scheduler  # noqa: E402

VARIANTS = ("aroma", "lora_r1", "aroma_reset_step", "aroma_no_reset", "aroma_lora_schedule", "aroma_no_merge",
            "aroma_tin_200", "aroma_tin_300")


def _controller_kwargs(variant: str, steps: int) -> dict:
    kwargs = {**AROMA, "max_inner_steps": max(10, steps // 6), "rollback_tolerance": None}
    if variant == "aroma_reset_step":
        kwargs["reset_step"] = True
    if variant == "aroma_no_reset":
        kwargs["prune_ratio"] = 0.0
    if variant.startswith("aroma_tin_"):  # a longer inner-loop cap: fewer, longer-trained pieces
        kwargs["max_inner_steps"] = int(variant.rsplit("_", 1)[1])
    if variant == "aroma_no_merge":
        kwargs["max_inner_steps"] = steps + 1
        kwargs["inner_threshold"] = 0.0
    return kwargs


def _update_norm(adapter) -> float:
    """``‖U·V + s·B·A‖_F`` of a site (Gram traces, no d×d product)."""
    u = torch.cat([adapter.U, adapter.B.detach() * adapter.scale], dim=1).double()
    v = torch.cat([adapter.V, adapter.A.detach()], dim=0).double()
    return float(AF.lowrank_norm2(u, v).sqrt())


class Recorder:
    """The per-step and per-merge records of one run."""

    def __init__(self, model, optimizer, controller) -> None:
        self.model, self.optimizer, self.controller = model, optimizer, controller
        self.sites = adapter_modules(model)
        self.prev = self._actives()
        self.checked = self.prev
        self.checks: list[dict] = []
        self.steps: list[dict] = []
        self.merges: list[dict] = []
        self.evals: list[dict] = []
        if controller is not None:
            self._wrap_merge(controller)

    def _actives(self) -> list[torch.Tensor]:
        return [t.detach().clone() for _, _, a in self.sites for t in (a.A, a.B)]

    def _wrap_merge(self, controller) -> None:
        original = controller._merge

        def merge(track, gen):
            before = _update_norm(track.adapter)
            step, lr = controller.steps, self.optimizer.param_groups[0]["lr"]
            grows = original(track, gen)
            after = float(AF.lowrank_norm2(track.adapter.U.double(), track.adapter.V.double()).sqrt())
            self.merges.append({"step": step, "site": track.path, "pieces": track.adapter.pieces,
                                "rank": track.adapter.merged_rank, "norm_before": before, "norm_after": after,
                                "relative_change": abs(after - before) / max(before, 1e-12), "lr": lr,
                                "grows": bool(grows)})
            return grows

        controller._merge = merge

    def snapshot(self) -> None:
        """Remember the active pieces after the controller acted (a merge re-initialises them)."""
        self.prev = self._actives()

    def inner_check(self, step: int) -> None:
        """The relative change of each site's active piece since the last check (the controller's ε_in test)."""
        now = self._actives()
        rel = []
        for i in range(0, len(now), 2):
            a, b, a0, b0 = now[i].double(), now[i + 1].double(), self.checked[i].double(), self.checked[i + 1].double()
            denom = AF.lowrank_norm2(b0, a0).sqrt()
            if a.shape == a0.shape and denom > 0:
                rel.append(float(AF.lowrank_diff_norm2(b, a, b0, a0).sqrt() / denom))
        self.checked = now
        if rel:
            self.checks.append({"step": step, "rel_change_median": statistics.median(rel)})

    def on_step(self, step: int, loss: float, lr: float) -> None:
        now = self._actives()
        ratios = [float((n - p).pow(2).mean().sqrt()) / max(lr, 1e-12) for n, p in zip(now, self.prev, strict=True)
                  if n.shape == p.shape and p.abs().sum() > 0]
        pieces = [a.pieces for _, _, a in self.sites] if self.controller is not None else []
        self.steps.append({"step": step + 1, "loss": loss, "lr": lr,
                           "update_over_lr": statistics.fmean(ratios) if ratios else 0.0,
                           "pieces_mean": statistics.fmean(pieces) if pieces else 0.0})


def run(variant: str, setting, rate: float, eval_every: int, seed: int = 0) -> dict:
    """One instrumented run of ``variant`` at ``rate``."""
    from aurora_fx.zoo import load_model

    splits, train, val, _ = prepared(setting)
    torch.manual_seed(seed)
    model = load_model("minilm", num_labels=len(splits.train.label_names)).model
    method = "lora" if variant == "lora_r1" else "aroma"
    aurora_fx.apply(model, QV, method=method, rank=1, alpha=4.0 if method == "aroma" else 2.0, dropout=0.0,
                    trainable_modules="classifier")
    steps = setting.budget(len(train))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate, weight_decay=0.0)
    controller = None
    if method == "lora" or variant == "aroma_lora_schedule":
        scheduler = make_scheduler(optimizer, steps, 0.06)
    else:
        scheduler = AromaLR(optimizer, max_steps=steps, first_warmup=max(1, steps // 16), rewarm_steps=10)
    if method == "aroma":
        controller = AromaController(model, optimizer, scheduler, **_controller_kwargs(variant, steps))
    recorder = Recorder(model, optimizer, controller)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    start = time.perf_counter()
    for step in range(steps):
        if pos + setting.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        index = order[pos:pos + setting.batch_size]
        pos += setting.batch_size
        model.train()
        logits = model(**train.batch(index)).logits
        loss = torch.nn.functional.cross_entropy(logits, train.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        recorder.on_step(step, loss.item(), lr)
        if controller is not None:
            controller.step()
        if (step + 1) % AROMA["inner_check_every"] == 0:
            recorder.inner_check(step + 1)
        recorder.snapshot()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc, vloss = _evaluate(model, val)
            recorder.evals.append({"step": step + 1, "val_acc": acc, "val_loss": vloss})
    if controller is not None:
        controller.finalize()
    acc, vloss = _evaluate(model, val)
    return {"variant": variant, "rate": rate, "steps": steps, "seconds": time.perf_counter() - start,
            "final_val_acc": acc, "final_val_loss": vloss, "step_records": recorder.steps,
            "evals": recorder.evals, "merges": recorder.merges, "inner_checks": recorder.checks,
            "outer_steps": [] if controller is None else [h.step for h in controller.history],
            "ranks": {} if controller is None else controller.ranks()}


def summary(result: dict) -> dict:
    """The figures the diagnosis table quotes."""
    recs = result["step_records"]
    outer = result["outer_steps"]
    after = [r["update_over_lr"] for r in recs if any(0 < r["step"] - s <= 20 for s in outer)]
    calm = [r["update_over_lr"] for r in recs if r["step"] > 20 and not any(0 < r["step"] - s <= 20 for s in outer)]
    pieces_trained = [b - a for a, b in zip([0, *outer], outer, strict=False)]
    merges = result["merges"]
    return {"final_val_acc": result["final_val_acc"], "best_val_acc": max(e["val_acc"] for e in result["evals"]),
            "final_train_loss": statistics.fmean(r["loss"] for r in recs[-50:]),
            "outer_steps": len(outer), "steps_per_piece_median": statistics.median(pieces_trained) if outer else None,
            "update_over_lr_after_reset_median": statistics.median(after) if after else None,
            "update_over_lr_otherwise_median": statistics.median(calm) if calm else None,
            "merge_relative_norm_change_median": statistics.median(m["relative_change"] for m in merges)
            if merges else None,
            "mean_pieces_end": statistics.fmean(r["pieces_mean"] for r in recs[-1:]),
            "settled_checks": sum(c["rel_change_median"] < AROMA["inner_threshold"] for c in result["inner_checks"]),
            "rel_change_median": statistics.median(c["rel_change_median"] for c in result["inner_checks"])
            if result["inner_checks"] else None}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for r in results:
        recs = r["step_records"]
        steps = [x["step"] for x in recs]
        window = 25
        smooth = [statistics.fmean(x["loss"] for x in recs[max(0, i - window + 1):i + 1]) for i in range(len(recs))]
        axes[0].plot(steps, smooth, label=r["variant"])
        axes[1].plot([e["step"] for e in r["evals"]], [e["val_acc"] for e in r["evals"]], marker="o", ms=3,
                     label=r["variant"])
        axes[2].plot(steps, [x["update_over_lr"] for x in recs], lw=0.7, label=r["variant"])
        for s in r["outer_steps"]:
            axes[2].axvline(s, color="grey", lw=0.3)
    axes[0].set_ylabel("train loss (25-step mean)")
    axes[1].set_ylabel("validation accuracy")
    axes[2].set_ylabel("RMS step of A, B / lr")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("optimizer step (grey: AROMA outer steps of the runs)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tweets", choices=("bbc", "tweets"))
    parser.add_argument("--rate", type=float, default=2e-3, help="AROMA's chosen rate on tweets q/v (quality.json)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the results files (several variant sets per rate)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    mode = QUICK if args.quick else FULL
    setting = next(s for s in mode.data if s.name == args.data)
    results = [run(v, setting, args.rate, args.eval_every) for v in args.variants.split(",")]
    rows = []
    for r in results:
        s = summary(r)
        r["summary"] = s
        fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        rows.append((r["variant"], fmt(s["final_val_acc"]), fmt(s["best_val_acc"]), fmt(s["final_train_loss"]),
                     fmt(s["outer_steps"]), fmt(s["steps_per_piece_median"]),
                     fmt(s["update_over_lr_after_reset_median"]), fmt(s["update_over_lr_otherwise_median"]),
                     fmt(s["merge_relative_norm_change_median"]), fmt(s["rel_change_median"]),
                     fmt(s["settled_checks"])))
    print(f"\n{args.data} q/v, rate {args.rate:g}, seed 0 ({setting.budget(len(prepared(setting)[1]))} steps)")
    print(table(("variant", "val acc", "best val", "train loss", "outer", "steps/piece", "step/lr after reset",
                 "step/lr otherwise", "merge Δ‖ΔW‖", "inner Δ (median)", "checks < ε_in"), rows))
    if not args.quick:
        stem = f"aroma_diagnosis_{args.data}_{args.rate:g}" + (f"_{args.tag}" if args.tag else "")
        path = write_json(f"{stem}.json", {"data": args.data, "rate": args.rate, "controller": AROMA,
                                           "results": results})
        plot(results, RESULTS / f"{stem}.png")
        print(f"wrote {path} and {stem}.png")


if __name__ == "__main__":
    main()
