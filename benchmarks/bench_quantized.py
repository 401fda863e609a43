"""QLoRA on the CPU: AuroRA and LoRA on 4-bit and 8-bit bases against bf16/fp32 bases (step time, peak RSS, loss).

    python benchmarks/bench_quantized.py [--steps 12] [--quick]

A Llama-shaped model (hidden 2048, 8 layers, MLP 5632, 16 heads / 4 KV heads, vocabulary 2000: about 0.4 B
parameters, so the weights dominate memory) built from one seeded init, then stored as fp32, bf16, bitsandbytes
int8 (``Linear8bitLt``) or bitsandbytes NF4 (``Linear4bit``, float32 compute; ``aurora_fx.quantized.quantize_linears``),
every linear but the head. Adapters on q/v/o and the MLP projections: AuroRA r̃=2 and LoRA r=8 (float32 adapters).
One fixed batch of 2×64 tokens, AdamW lr 1e-3, ``--steps`` steps.

* **Step time**: all eight variants live in one process and take one step each per round, in a shuffled order
  (interleaved), median over the rounds after the first;
* **loss** after the last step, against the fp32 base from the same init;
* **peak RSS**: each variant alone in a fresh process, glibc told to mmap blocks over 64 KiB (freed tensors
  leave the RSS); the peak while training the same steps, above the RSS after imports (the model is built in
  fp32 and converted, a benchmark shortcut: the peak is reset once the converted model is in place).

Target (issue 32): the 4-bit run's rise at most 0.4× the fp32 run's. Writes ``benchmarks/results/quantized.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import status_kib, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402
from aurora_fx.quantized import quantize_linears  # noqa: E402

BASES = ("fp32", "bf16", "bnb-int8", "bnb-nf4")
METHODS = {"aurora_r2": ("aurora", 2), "lora_r8": ("lora", 8)}
PATTERN = r"(q_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
FULL = {"hidden": 2048, "layers": 8, "mlp": 5632, "heads": 16, "kv_heads": 4, "vocab": 2000, "batch": 2, "seq": 64}
QUICK = {"hidden": 256, "layers": 2, "mlp": 704, "heads": 4, "kv_heads": 2, "vocab": 500, "batch": 2, "seq": 32}


def build(base: str, method: str, shape: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"]))
    if base == "bf16":
        model = model.to(torch.bfloat16)
    elif base != "fp32":
        quantize_linears(model, base)
    name, rank = METHODS[method]
    aurora_fx.apply(model, PATTERN, method=name, rank=rank, dropout=0.0)
    model.train()
    return model, torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-3)


def batch(shape: dict) -> torch.Tensor:
    return torch.randint(3, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def interleaved(shape: dict, steps: int) -> dict:
    ids = batch(shape)
    variants = {f"{b}/{m}": build(b, m, shape) for b in BASES for m in METHODS}
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {v: [] for v in variants}
    order, rng = list(variants), random.Random(0)
    for _ in range(steps):
        rng.shuffle(order)
        for v in order:
            start = time.perf_counter()
            losses[v].append(step(*variants[v], ids))
            times[v].append(time.perf_counter() - start)
    return {"median_step_s": {v: statistics.median(t[1:]) for v, t in times.items()},
            "step_spread_s": {v: [min(t[1:]), max(t[1:])] for v, t in times.items()},
            "losses": losses, "final_loss": {v: run[-1] for v, run in losses.items()}}



def rss_child(variant: str, quick: bool, steps: int) -> None:
    """In a fresh process: the peak RSS while training one variant, above the RSS after imports.

    The model is built in fp32 and then converted (a benchmark shortcut; ``from_pretrained`` with a quantization
    config never holds the fp32 model), so the peak is reset once the built model is in place.
    """
    torch.set_num_threads(2)
    import bitsandbytes  # noqa: F401  (every variant imports the same before the baseline)
    import transformers  # noqa: F401

    start = status_kib("VmRSS")
    base, method = variant.split("/")
    shape = QUICK if quick else FULL
    model, optimizer = build(base, method, shape)
    ids = batch(shape)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the model in place, then training
    for _ in range(steps):
        step(model, optimizer, ids)
    print(json.dumps({"rise_mib": (status_kib("VmHWM") - start) / 1024, "after_imports_mib": start / 1024}))


def peak_rss(variant: str, quick: bool, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--rss-child", variant, "--steps", str(steps)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(result: dict) -> str:
    rows = []
    for v in result["median_step_s"]:
        base_loss = result["final_loss"][f"fp32/{v.split('/')[1]}"]
        rows.append((v, f"{result['median_step_s'][v]:.2f}", f"{result['step_spread_s'][v][0]:.2f}-"
                     f"{result['step_spread_s'][v][1]:.2f}", f"{result['peak_rss'][v]['rise_mib']:.0f}",
                     f"{result['final_loss'][v]:.4f}", f"{result['final_loss'][v] / base_loss - 1:+.2%}"))
    text = table(("base/method", "step s", "spread", "peak RSS rise MiB", "final loss", "vs fp32 loss"), rows)
    for m in METHODS:
        ratio = result["peak_rss"][f"bnb-nf4/{m}"]["rise_mib"] / result["peak_rss"][f"fp32/{m}"]["rise_mib"]
        verdict = "met" if ratio <= 0.4 else "NOT met"
        text += f"\n{m}: 4-bit peak RSS rise {ratio:.2f}× the fp32 run's (target ≤ 0.4: {verdict})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="a small model (a smoke run)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.quick, args.steps)
        return
    torch.set_num_threads(2)
    shape = QUICK if args.quick else FULL
    result = interleaved(shape, args.steps)
    result["peak_rss"] = {v: peak_rss(v, args.quick, args.steps) for v in result["median_step_s"]}
    print(report(result))
    if not args.quick:
        path = write_json("quantized.json", {"shape": shape, "steps": args.steps, "pattern": PATTERN, **result})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
