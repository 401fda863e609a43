"""onnxruntime CPU latency of MiniLM-L6 exports: base, AuroRA unmerged, LoRA r=8 unmerged and merged.

    python benchmarks/bench_onnx.py [--repeats 60]

Real MiniLM-L6 weights (sequence classifier, 5 labels), adapters on query/value with random non-zero
weights (latency does not depend on their values). Each model is exported once with
aurora_fx.export.to_onnx (verified in onnxruntime), then timed at batch 1 and 8, seq 128, with the
CPU provider and 2 intra-op threads; the four sessions run interleaved, one call each per round in
a shuffled order. Prints a table (median latency; ratio to the base = median over rounds of the
same round's ratio) and writes benchmarks/results/onnx.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, paired_ratio, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402
from aurora_fx.export import to_onnx  # noqa: E402
from aurora_fx.zoo import load_model  # noqa: E402

SEQ = 128


def models() -> dict[str, tuple[torch.nn.Module, bool]]:
    def fresh():
        torch.manual_seed(0)
        return load_model("minilm", num_labels=5).model

    aurora, lora = fresh(), fresh()
    aurora_fx.apply(aurora, "query|value")
    aurora_fx.apply(lora, "query|value", method="lora", rank=8)
    with torch.no_grad():
        for m in (aurora, lora):
            for name, p in m.named_parameters():
                if ".adapter." in name:
                    p.normal_(0, 0.02)
    return {"base": (fresh(), False), "aurora_unmerged": (aurora, False), "lora_r8_unmerged": (lora, False),
            "lora_r8_merged": (lora, True)}


def feeds(batch: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(batch)
    return {"input_ids": torch.randint(1000, 20000, (batch, SEQ), generator=g).numpy(),
            "attention_mask": np.ones((batch, SEQ), dtype=np.int64)}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle sessions' thread pools must not spin: with four sessions alive on 2 cores, spinning
    # workers steal the CPU from the session being timed (bimodal 23 ms / 50 ms runs otherwise).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(2)
    example = {k: torch.from_numpy(v) for k, v in feeds(2).items()}
    exports, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, merge) in models().items():
            result = to_onnx(model, Path(tmp) / f"{name}.onnx", example_kwargs=example, merge=merge)
            exports[name] = {"export_seconds": result.seconds, "megabytes": result.bytes / 2**20,
                             "max_abs_diff": max(result.max_abs_diff.values()), "nodes": sum(result.op_counts.values())}
            sessions[name] = session(result.path)
        latency, ratio = {}, {}
        for batch in (1, 8):
            data = feeds(batch)
            runs = interleaved({n: (lambda s=s, data=data: s.run(None, data)) for n, s in sessions.items()},
                               repeats=args.repeats, warmup=3)
            latency[batch] = {n: median(t) for n, t in runs.items()}
            ratio[batch] = {n: paired_ratio(runs, n, "base") for n in runs}
    rows = []
    for name in sessions:
        rows.append((name, *(f"{1000 * latency[b][name]:.2f}" for b in (1, 8)),
                     *(f"{ratio[b][name]:.3f}" for b in (1, 8)),
                     f"{exports[name]['export_seconds']:.1f}", f"{exports[name]['megabytes']:.1f}",
                     exports[name]["nodes"], f"{exports[name]['max_abs_diff']:.1e}"))
    print(table(("model", "b1 ms", "b8 ms", "b1 vs base", "b8 vs base", "export s", "MiB", "nodes", "ORT diff"),
                rows))
    path = write_json("onnx.json", {"repeats": args.repeats, "seq": SEQ, "exports": exports,
                                    "median_latency_s": {str(b): v for b, v in latency.items()},
                                    "paired_ratio_to_base": {str(b): v for b, v in ratio.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
