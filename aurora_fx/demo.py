"""``make demo``: fine-tune real MiniLM-L6 weights on BBC News with AuroRA, then ship it to ONNX.

Steps: load MiniLM (offline package) and BBC News (offline package) → held-out accuracy
before → ``aurora_fx.apply`` (AuroRA r̃=2 on query/value, new head trainable) → train with a
progress bar → held-out accuracy after → save the adapter checkpoint → export ONNX with the
adapter baked in → verify in onnxruntime and compare predictions on the held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import aurora_fx
from aurora_fx.data import load_bbc, split
from aurora_fx.export import run_onnx, to_onnx
from aurora_fx.train import TrainConfig, encode, evaluate, train_classifier
from aurora_fx.zoo import load_model

__all__ = ["DemoResult", "run_demo"]

PATTERN = "query|value"


@dataclass(frozen=True)
class DemoResult:
    """Numbers the demo prints."""

    accuracy_before: float
    accuracy_after: float
    trainable_params: int
    full_params: int
    onnx_path: Path
    onnx_max_abs_diff: float
    onnx_agreement: float


def _say(text: str) -> None:
    print(text, flush=True)


def _onnx_agreement(path: Path, model, data) -> float:
    """Share of held-out predictions where onnxruntime and PyTorch agree."""
    agree = 0
    for start in range(0, len(data), 32):
        index = torch.arange(start, min(start + 32, len(data)))
        batch = data.batch(index)
        ort_logits = run_onnx(path, batch)[0]
        with torch.no_grad():
            torch_logits = model(**batch).logits.numpy()
        agree += int((ort_logits.argmax(-1) == torch_logits.argmax(-1)).sum())
    return agree / len(data)


def run_demo(steps: int = 60, test_size: int = 400, lr: float = 5e-3, seed: int = 0,
             out_dir: str | Path = "out/demo", progress: bool = True) -> DemoResult:
    """Run the end-to-end demo and print what happens (see the module docstring)."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    data = load_bbc()
    train, test = split(data, test_size, seed=seed)
    _say(f"BBC News: {len(data)} articles, labels {', '.join(data.label_names)}; "
         f"train {len(train)}, held-out {len(test)}")
    loaded = load_model("minilm", num_labels=len(data.label_names))
    model, tokenizer = loaded.model, loaded.tokenizer
    full = sum(p.numel() for p in model.parameters())
    train_enc, test_enc = encode(tokenizer, train, 128), encode(tokenizer, test, 128)
    before = evaluate(model, test_enc, progress=progress)
    _say(f"MiniLM-L6 (real weights, new 5-way head): held-out accuracy before = {before:.3f}")

    aurora_fx.apply(model, PATTERN, method="aurora", trainable_modules="classifier")
    report = aurora_fx.inspect(model)
    _say(report.table())
    trainable = report.trainable_params
    _say(f"trainable parameters: {trainable:,} (AuroRA {report.adapter_params:,} + head "
         f"{trainable - report.adapter_params:,}) vs full fine-tuning {full:,} = {100 * trainable / full:.3f}%")

    result = train_classifier(model, train_enc, TrainConfig(steps=steps, lr=lr, seed=seed), progress=progress)
    after = evaluate(model, test_enc, progress=progress)
    _say(f"trained {steps} steps in {result.seconds:.0f}s; loss {np.mean(result.losses[:5]):.3f} -> "
         f"{np.mean(result.losses[-5:]):.3f}")
    _say(f"held-out accuracy: before {before:.3f} -> after {after:.3f}")

    ckpt = aurora_fx.save_adapters(model, out_dir / "adapters.safetensors",
                                   extra={"base_model": "minilm", "num_labels": len(data.label_names),
                                          "labels": list(data.label_names)})
    _say(f"adapter checkpoint: {ckpt} ({ckpt.stat().st_size / 1024:.0f} KiB)")
    example = test_enc.batch(torch.arange(2))
    exported = to_onnx(model, out_dir / "minilm_bbc_aurora.onnx", example_kwargs=example)
    diff = max(exported.max_abs_diff.values())
    _say(f"ONNX: {exported.path} ({exported.bytes / 2**20:.1f} MiB, {exported.adapter_nodes} AuroRA nodes, "
         f"inputs {list(exported.input_names)} dynamic {exported.dynamic_axes}); onnxruntime vs PyTorch max abs diff "
         + ", ".join(f"{shape}: {d:.2e}" for shape, d in exported.max_abs_diff.items()))
    agreement = _onnx_agreement(exported.path, model, test_enc)
    _say(f"onnxruntime predictions agree with PyTorch on {100 * agreement:.1f}% of the held-out set")
    return DemoResult(before, after, trainable, full, exported.path, diff, agreement)
