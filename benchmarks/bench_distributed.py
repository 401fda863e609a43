"""Per-rank memory of DDP vs FSDP2 on 2 ranks: parameters, gradients and optimizer state.

A Llama config (8 layers, hidden 512, intermediate 1376, vocab 8000; 40M parameters) with AuroRA on
q, k, v, o and full fine-tuning, trained a few AdamW steps on 2 CPU ranks (gloo) wrapped in DDP or
sharded with FSDP2 (``fully_shard`` per decoder layer, then the root). Each rank counts the bytes of
what it holds itself (a ``DTensor``'s local shard), after the last step, plus its peak RSS; the
table gives rank 0's numbers (the ranks agree within a shard's padding) and FSDP2 / DDP ratios. Each
configuration runs in its own torchrun, so the peak RSS is that configuration's.

    python benchmarks/bench_distributed.py              # launches torchrun --nproc_per_node=2 itself

Writes ``results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, table, write_json  # noqa: E402

CONFIG = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
          "intermediate_size": 1376, "vocab_size": 8000}
STEPS, BATCH, SEQ = 3, 4, 64


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors if t is not None)


def _build(method: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import aurora_fx

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).train()
    if method == "aurora":
        aurora_fx.apply(model, r"self_attn\.(q|k|v|o)_proj")
    return model


def _wrap(model, engine: str):
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def worker(engine: str, method: str) -> dict:
    """One rank: build, wrap, train, count."""
    rank = dist.get_rank()
    model = _build(method)
    wrapped = _wrap(model, engine)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    start = time.perf_counter()
    for _ in range(STEPS):
        loss = wrapped(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - start) / STEPS
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"engine": engine, "method": method, "rank": rank,
            "param_bytes": _bytes(model.parameters()), "trainable_bytes": _bytes(params),
            "grad_bytes": _bytes(p.grad for p in params), "optimizer_bytes": _bytes(state),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_s": seconds}


def _launch(engine: str, method: str) -> list[dict]:
    """One torchrun per configuration, so each process's peak RSS is its own."""
    out = RESULTS / "distributed_ranks.tmp"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", str(out), "--engine", engine, "--method", method]
    subprocess.run(cmd, env=env, check=True)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    for f in out.glob("*"):
        f.unlink()
    out.rmdir()
    return rows


def _report(rows: list[dict]) -> None:
    rank0 = {(r["engine"], r["method"]): r for r in rows if r["rank"] == 0}
    mib = 2**20
    lines, ratios = [], {}
    for method in ("aurora", "full"):
        ddp, fsdp = rank0[("ddp", method)], rank0[("fsdp2", method)]
        for name, r in (("DDP", ddp), ("FSDP2", fsdp)):
            lines.append((method, name, f"{r['param_bytes'] / mib:.1f}", f"{r['grad_bytes'] / mib:.2f}",
                          f"{r['optimizer_bytes'] / mib:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['step_s']:.2f}"))
        ratios[method] = {k: fsdp[k] / max(ddp[k], 1) for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}
        lines.append((method, "FSDP2 / DDP", f"{ratios[method]['param_bytes']:.3f}x",
                      f"{ratios[method]['grad_bytes']:.3f}x", f"{ratios[method]['optimizer_bytes']:.3f}x", "", ""))
    print(table(("method", "engine", "params MiB", "grads MiB", "optimizer MiB", "peak RSS MiB", "step s"), lines))
    write_json("distributed.json", {"config": CONFIG, "steps": STEPS, "batch_per_rank": BATCH, "seq": SEQ,
                                    "rows": rows, "fsdp2_over_ddp_rank0": ratios, "env": environment()})
    print(f"\nwrote {RESULTS / 'distributed.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        _report([r for engine in ("ddp", "fsdp2") for method in ("aurora", "full") for r in _launch(engine, method)])
        return
    dist.init_process_group("gloo")
    row = worker(args.engine, args.method)
    Path(args.worker, f"rank{dist.get_rank()}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
