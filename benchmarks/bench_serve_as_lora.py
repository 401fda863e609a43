"""Train nonlinear, serve as LoRA: what exporting to the standard PEFT LoRA format costs in accuracy.

MiniLM-L6 (real weights) fine-tuned on BBC News and on tweets with the protocol of
``bench_quality.py`` (same de-duplicated splits, budget and batch; seed 0; each method at the rate
the quality benchmark chose for it when its results are there, else the grid centre). Each trained
model is exported with ``aurora_fx.export.to_peft`` and loaded with **real PEFT**
(``peft.PeftModel.from_pretrained`` onto a fresh MiniLM): held-out test accuracy of

* AuroRA r̃=2 dynamic (our model) against its ``static`` export and its ``fit`` exports at LoRA rank
  k = 2, 4, 8 (calibrated on 64 training texts), with the fit's per-site fidelity (median relative
  error of the linear map on held-out calibration inputs);
* AROMA and LoRA r=8 against their ``exact`` exports (identical by construction: the max logit
  difference is reported).

    python benchmarks/bench_serve_as_lora.py              # about 40 minutes on 2 cores

Writes ``results/serve_as_lora.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_quality as BQ  # noqa: E402
from common import RESULTS, environment, table, write_json  # noqa: E402

ROWS = ("aurora_r2", "aroma_r1_all", "lora_r8")
FIT_RANKS = (2, 4, 8)


def chosen_rate(dataset: str, method: BQ.Method) -> float:
    """The rate bench_quality chose on validation, or the grid centre when it has not run."""
    store = BQ.RunStore(RESULTS / "quality_runs.json")
    plan = BQ.plan_for(store, dataset, method, BQ.FULL.grid(method.center), BQ.FULL.seeds)
    k = plan.chosen()
    return plan.grid.rate(k) if k is not None else method.center


def _minilm(num_labels: int):
    from aurora_fx.zoo import load_model

    torch.manual_seed(0)
    return load_model("minilm", num_labels=num_labels).model


def _peft_accuracy(folder: Path, num_labels: int, test) -> tuple[float, object]:
    import peft

    loaded = peft.PeftModel.from_pretrained(_minilm(num_labels), str(folder)).eval()
    return BQ._evaluate(loaded, test)[0], loaded


def _logit_gap(a, b, test) -> float:
    batch = test.batch(torch.arange(min(32, len(test))))
    with torch.no_grad():
        return float((a.eval()(**batch).logits - b(**batch).logits).abs().max())


def _lora_params(folder: Path) -> int:
    """LoRA parameters in the folder (the head in modules_to_save not counted)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        return sum(fh.get_slice(k).get_shape()[0] * fh.get_slice(k).get_shape()[1] for k in fh.keys()  # noqa: SIM118
                   if ".lora_" in k and k.endswith(".weight"))


def _calibration(train, count: int = 64, batch: int = 16) -> list[dict]:
    return [train.batch(torch.arange(i, min(i + batch, count))) for i in range(0, count, batch)]


def run_dataset(setting: BQ.DataSetting) -> list[dict]:
    """Train the three rows on one data set and measure every export through real PEFT."""
    from aurora_fx.export import to_peft

    splits, train, val, test = BQ.prepared(setting)
    labels = len(splits.train.label_names)
    rows = []
    for name in ROWS:
        method = BQ.method_named(name)
        model = _minilm(labels)
        lr = chosen_rate(setting.name, method)
        record = BQ.fit(model, method, setting, (train, val, test), 0, lr, 0)
        rows.append({"data": setting.name, "method": name, "export": "dynamic (ours)", "rank": "",
                     "accuracy": record.test_accuracy, "stored": record.stored_params, "lr": lr})
        modes = [("fit", k) for k in FIT_RANKS] + [("static", None)] if method.kind == "aurora" else [("exact", None)]
        for mode, k in modes:
            with tempfile.TemporaryDirectory() as folder:
                result = to_peft(model, folder, mode=mode, rank=k,
                                 calibration=_calibration(train) if mode == "fit" else None)
                accuracy, loaded = _peft_accuracy(Path(folder), labels, test)
                errors = [s.heldout_error for s in result.sites if s.heldout_error is not None]
                rows.append({"data": setting.name, "method": name, "export": f"PEFT {mode}", "rank": k or "",
                             "accuracy": accuracy, "stored": _lora_params(Path(folder)),
                             "fidelity": statistics.median(errors) if errors else None,
                             "logit_gap": _logit_gap(copy.deepcopy(model), loaded, test)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="bbc,tweets")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    settings = {s.name: s for s in BQ.FULL.data}
    rows = [row for name in args.data.split(",") for row in run_dataset(settings[name])]
    print(table(("data", "method", "served as", "rank k", "test acc", "adapter params", "fit error (median, held-out)",
                 "max logit gap vs ours"),
                [(r["data"], r["method"], r["export"], r["rank"], f"{r['accuracy']:.3f}", f"{r['stored']:,}",
                  "" if r.get("fidelity") is None else f"{100 * r['fidelity']:.1f}%",
                  "" if "logit_gap" not in r else f"{r['logit_gap']:.2e}") for r in rows]))
    write_json("serve_as_lora.json", {"rows": rows, "env": environment()})
    print(f"\nwrote {RESULTS / 'serve_as_lora.json'}")


if __name__ == "__main__":
    main()
