"""The adapters' overhead on a bf16 LLM layer, on a GPU: Triton kernels, eager and compiled.

    python benchmarks/bench_gpu.py [--repeats 50]          # needs CUDA (exits with a message otherwise)

At 8,192 tokens and the shapes of a 7B LLM (4096→4096 and 4096→14336), bf16: the bare frozen linear,
fused AuroRA r̃=2 (aurora_fx's Triton path), aurora_fx LoRA r=8 (Triton), HF PEFT LoRA r=8, and the
composite op (the CPU/generic ``aurora_fx::aurora_delta_add`` kernel run on CUDA), each eager and
under ``torch.compile``, forward (no grad) and forward+backward. Every ratio is to the bare linear,
the median over rounds of the same round's ratio (interleaved runs, CUDA-synchronised timing).

The **bandwidth floor** of an adapter is the time its unavoidable extra memory traffic takes at this
GPU's copy bandwidth, measured in the same run (a large ``copy_``): forward, reading x once more for
``x·Aᵀ`` and reading plus writing the output once for the rank-r̃ update; forward+backward adds reading
the output gradient twice (``g·B`` and ``gᵀ·σ``), reading x again (``∂L/∂A``) and one more read and
write of ``∂L/∂x``. ``floor ratio`` = (bare time + floor) / bare time.

Writes ``results/gpu.json``; the README quotes its table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json  # noqa: E402

import aurora_fx  # noqa: E402

TOKENS = 8192
SHAPES = ((4096, 4096), (4096, 14336))


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / statistics.median(times)


def variants(d_in: int, d_out: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    bare = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)).cuda().to(torch.bfloat16)
    bare.requires_grad_(False)
    out = {"bare": bare}
    out["aurora_fused"] = aurora_fx.apply(copy.deepcopy(bare), "^0$", dtype=torch.bfloat16, dropout=0.0)
    out["aurora_composite"] = copy.deepcopy(out["aurora_fused"])
    out["lora_r8"] = aurora_fx.apply(copy.deepcopy(bare), "^0$", method="lora", rank=8, dtype=torch.bfloat16)
    try:
        from peft import LoraConfig, get_peft_model

        out["peft_lora_r8"] = get_peft_model(copy.deepcopy(bare), LoraConfig(r=8, lora_alpha=16,
                                                                            target_modules=["0"]))
    except ImportError:
        pass
    for name, model in out.items():
        if name != "bare":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "adapter" in n or "lora_" in n:
                        p.normal_(0, 0.02)
    return out


def _composite(model):
    """Force the generic composite op (not Triton) for the 'composite' row."""
    import aurora_fx.ops.fused as fused

    def run(x):
        saved = fused._use_triton
        fused._use_triton = lambda x: False
        try:
            return model(x)
        finally:
            fused._use_triton = saved
    return run


def measure(d_in: int, d_out: int, repeats: int) -> dict:
    x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = torch.randn(TOKENS, d_out, device="cuda", dtype=torch.bfloat16)
    calls = {}
    for name, model in variants(d_in, d_out).items():
        runs = {"eager": _composite(model) if name == "aurora_composite" else model}
        if name != "aurora_composite":
            runs["compiled"] = torch.compile(model, fullgraph=name != "peft_lora_r8")
        for mode, fn in runs.items():
            calls[f"{name}/{mode}/fwd"] = lambda fn=fn: _no_grad(fn, x)
            calls[f"{name}/{mode}/fwd+bwd"] = lambda fn=fn: torch.autograd.grad(fn(x), [x], g)
    for fn in calls.values():  # warm-up and compile
        fn()
        fn()
    rounds = [{k: statistics.median(_timed(fn, 3)) for k, fn in calls.items()} for _ in range(repeats)]
    return {"d_in": d_in, "d_out": d_out, "median_s": {k: statistics.median(r[k] for r in rounds) for k in calls},
            "ratio": {k: statistics.median(r[k] / r[_bare(k)] for r in rounds) for k in calls}}


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


def _bare(key: str) -> str:
    """The bare linear's timing in the same mode (eager against eager, compiled against compiled)."""
    _, mode, kind = key.split("/")
    return f"bare/{'eager' if mode == 'eager' else 'compiled'}/{kind}"


def floors(d_in: int, d_out: int, bandwidth: float, bare_fwd: float, bare_fb: float) -> dict[str, float]:
    b = 2  # bf16 bytes
    fwd_bytes = TOKENS * b * (d_in + 2 * d_out)
    fb_bytes = fwd_bytes + TOKENS * b * (2 * d_out + d_in + 2 * d_in)
    return {"fwd": (bare_fwd + fwd_bytes / bandwidth) / bare_fwd, "fwd+bwd": (bare_fb + fb_bytes / bandwidth) / bare_fb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; this machine has none (the CPU tables are bench_adapter.py)")
    bandwidth = copy_bandwidth()
    results, rows = [], []
    for d_in, d_out in SHAPES:
        res = measure(d_in, d_out, args.repeats)
        res["floor"] = floors(d_in, d_out, bandwidth, res["median_s"]["bare/eager/fwd"],
                              res["median_s"]["bare/eager/fwd+bwd"])
        results.append(res)
        for key, ratio in res["ratio"].items():
            name, mode, kind = key.split("/")
            rows.append((f"{d_in}→{d_out}", name, mode, kind, f"{1000 * res['median_s'][key]:.3f}", f"{ratio:.3f}",
                         f"{res['floor'][kind]:.3f}"))
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, {TOKENS} tokens, bf16")
    print(table(("shape", "variant", "mode", "pass", "ms", "vs bare", "floor ratio"), rows))
    write_json("gpu.json", {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "tokens": TOKENS,
                            "results": results})


if __name__ == "__main__":
    main()
