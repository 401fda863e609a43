"""Mixture-of-experts block: adapters on every expert against HF PEFT's ``target_parameters`` (CPU).

    python benchmarks/bench_moe.py [--repeats 7] [--quick]

One ``Qwen3MoeSparseMoeBlock`` (transformers 5, its default ``grouped_mm`` experts implementation) of a
Qwen3-MoE-shaped config, hidden 512, expert dim 1024, top-2, N=4096 tokens, at E=8 and E=32 experts; its input
requires grad, as inside a model. Variants, all adapting ``gate_up_proj`` and ``down_proj`` of every expert:

* ``bare``: the frozen block;
* ``ours_lora_r8``: aurora_fx LoRA r=8 (activation space, per expert);
* ``ours_aurora_r2``: aurora_fx AuroRA r̃=2;
* ``peft_lora_r8``: HF PEFT LoRA r=8 through ``target_parameters`` (``ParamWrapper``: the ``E × in × out`` delta
  rebuilt every forward).

Time: forward+backward, interleaved rounds (every variant once per round, shuffled), medians and the
spread (min-max of the paired ratios). Memory: bytes saved for backward (exact, saved-tensor hooks) and the
peak RSS rise over one fwd+bwd (each variant in its own process, glibc told to mmap every block over 64 KiB so
freed tensors leave the RSS). "Added" = the variant minus ``bare``, measured in the same run. Targets
(issue 30): ours LoRA ≤ 0.7× PEFT's added time and ≤ 0.5× its added peak memory; AuroRA r̃=2 no slower than
PEFT's LoRA. Writes ``benchmarks/results/moe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, median, paired_ratio, status_kib, table, write_json  # noqa: E402

import aurora_fx  # noqa: E402

VARIANTS = ("bare", "ours_lora_r8", "ours_aurora_r2", "peft_lora_r8")
SHAPE = {"hidden": 512, "expert_dim": 1024, "top_k": 2, "tokens": 4096}


def block(experts: int, variant: str, quick: bool = False) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    scale = 4 if quick else 1
    config = Qwen3MoeConfig(hidden_size=SHAPE["hidden"] // scale, moe_intermediate_size=SHAPE["expert_dim"] // scale,
                            num_experts=experts, num_experts_per_tok=SHAPE["top_k"], norm_topk_prob=True)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    module = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return _adapt(module, variant)


def _adapt(module: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant == "bare":
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    if variant == "peft_lora_r8":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=[],
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        return peft.inject_adapter_in_model(config, module)
    method, rank = {"ours_lora_r8": ("lora", 8), "ours_aurora_r2": ("aurora", 2)}[variant]
    return aurora_fx.apply(module, "experts", method=method, rank=rank, dropout=0.0)


def tokens(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 4 if quick else 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, SHAPE["tokens"] // scale, SHAPE["hidden"] // scale, generator=g)
    return x, torch.randn(x.shape, generator=g)


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    module(x).backward(grad)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = x.detach().requires_grad_()
        out = module(x)
    out.backward(grad)
    return sum(seen.values()) - x.numel() * x.element_size()  # the input is the caller's


def rss_child(experts: int, variant: str, quick: bool) -> None:
    """In a fresh process: the peak RSS rise over one forward+backward, after two warm-up steps."""
    torch.set_num_threads(2)
    module = block(experts, variant, quick)
    x, grad = tokens(quick)
    for _ in range(2):
        step(module, x, grad)
    Path("/proc/self/clear_refs").write_text("5")
    start = status_kib("VmRSS")
    step(module, x, grad)
    print(json.dumps({"rise_mib": (status_kib("VmHWM") - start) / 1024}))



def peak_rise(experts: int, variant: str, quick: bool, runs: int = 3) -> float:
    """Median over ``runs`` fresh processes of the peak RSS rise (MiB)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--rss-child", f"{experts}:{variant}"] + (["--quick"] if quick else [])
    rises = [json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                        .stdout.strip().splitlines()[-1])["rise_mib"] for _ in range(runs)]
    return statistics.median(rises)


def measure(experts: int, repeats: int, quick: bool) -> dict:
    x, grad = tokens(quick)
    built = {v: block(experts, v, quick) for v in VARIANTS}
    times = interleaved({v: (lambda m=m: step(m, x, grad)) for v, m in built.items()}, repeats=repeats, warmup=1)
    ratios = {v: paired_ratio(times, v, "bare") for v in VARIANTS}
    spread = {v: [min(a / b for a, b in zip(times[v], times["bare"], strict=True)),
                  max(a / b for a, b in zip(times[v], times["bare"], strict=True))] for v in VARIANTS}
    saved = {v: saved_bytes(m, x, grad) / 2**20 for v, m in built.items()}
    rise = {v: peak_rise(experts, v, quick) for v in VARIANTS}
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in built.items()}
    return {"experts": experts, "median_s": {v: median(t) for v, t in times.items()}, "ratio_to_bare": ratios,
            "ratio_spread": spread, "runs_s": times, "saved_for_backward_mib": saved, "peak_rss_rise_mib": rise,
            "trainable_params": trainable, **_targets(ratios, saved, rise)}


def _targets(ratios: dict, saved: dict, rise: dict) -> dict:
    added_time = {v: ratios[v] - 1.0 for v in VARIANTS}
    added_rise = {v: rise[v] - rise["bare"] for v in VARIANTS}
    time_vs_peft = added_time["ours_lora_r8"] / added_time["peft_lora_r8"] if added_time["peft_lora_r8"] > 0 else None
    mem_vs_peft = added_rise["ours_lora_r8"] / added_rise["peft_lora_r8"] if added_rise["peft_lora_r8"] > 0 else None
    return {"added_time_ratio": added_time, "added_peak_mib": added_rise,
            "ours_lora_added_time_vs_peft": time_vs_peft, "ours_lora_added_peak_vs_peft": mem_vs_peft,
            "targets": {"lora_time_le_0.7x_peft": time_vs_peft is not None and time_vs_peft <= 0.7,
                        "lora_peak_le_0.5x_peft": mem_vs_peft is not None and mem_vs_peft <= 0.5,
                        "aurora_r2_not_slower_than_peft_lora": ratios["ours_aurora_r2"] <= ratios["peft_lora_r8"]}}


def _x(value: float | None) -> str:
    return "n/a (PEFT added none)" if value is None else f"{value:.2f}×"


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        for v in VARIANTS:
            lo, hi = r["ratio_spread"][v]
            rows.append((f"E={r['experts']}", v, f"{r['median_s'][v] * 1e3:.0f}", f"{r['ratio_to_bare'][v]:.3f}",
                         f"{lo:.2f}-{hi:.2f}", f"{r['saved_for_backward_mib'][v]:.1f}",
                         f"{r['added_peak_mib'][v]:+.1f}", r["trainable_params"][v]))
    text = table(("block", "variant", "fwd+bwd ms", "× bare", "spread", "saved MiB", "added peak MiB", "trainable"),
                 rows)
    for r in results:
        text += (f"\nE={r['experts']}: ours LoRA added time {_x(r['ours_lora_added_time_vs_peft'])} PEFT's, added "
                 f"peak {_x(r['ours_lora_added_peak_vs_peft'])} PEFT's; targets {r['targets']}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a quarter of every size (a smoke run)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        experts, variant = args.rss_child.split(":")
        rss_child(int(experts), variant, args.quick)
        return
    torch.set_num_threads(2)
    results = [measure(e, args.repeats, args.quick) for e in (8, 32)]
    print(report(results))
    if not args.quick:
        path = write_json("moe.json", {"shape": SHAPE, "implementation": "grouped_mm", "results": results})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
