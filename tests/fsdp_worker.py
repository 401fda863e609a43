"""Worker for the FSDP2 tests (run by torchrun, 2 ranks, gloo; not collected by pytest).

``train`` is also what the tests run in one process: an adapted Llama config trained a few steps
on one global batch (rank r of a world of size w takes rows r::w); with ``--shard`` each decoder
layer and then the root are wrapped with ``fully_shard``. Rank 0 writes the per-step losses (mean
over the global batch), the AROMA history and ``save_adapters``' checkpoint to <out>.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import aurora_fx
from tests.models import CASES, randomize_adapters

STEPS, BATCH, SEQ = 6, 8, 12
VARIANTS = {"aurora": {"method": "aurora", "dropout": 0.0}, "lora": {"method": "lora", "rank": 4},
            "aroma": {"config": aurora_fx.AromaConfig(dropout=0.0, compact_tol=0.0)}}  # exact compaction: it grows
# (dropout 0: each rank would draw its own masks, and the test compares with one process exactly)


def build(method: str) -> torch.nn.Module:
    """The same adapted model on every rank (seeded), adapters random and non-zero."""
    torch.manual_seed(0)
    model = CASES["llama"].build()
    aurora_fx.apply(model, r"self_attn\.(q|v)_proj|mlp\.down_proj", **VARIANTS[method])
    randomize_adapters(model, std=0.05)
    return model.train()


def batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids[rank::world], "labels": ids[rank::world]}


def train(model: torch.nn.Module, method: str, rank: int = 0, world: int = 1) -> dict:
    """Train STEPS steps; returns the global losses and (AROMA) the controller's history."""
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=5e-3)
    controller = (aurora_fx.AromaController(model, optimizer, inner_check_every=1, max_inner_steps=2,
                                            outer_threshold=1e-9) if method == "aroma" else None)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch(rank, world)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if controller is not None:
            controller.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    history = [[h.outer, h.step, list(h.merged), list(h.converged)] for h in controller.history] if controller else []
    return {"losses": losses, "history": history, "ranks": controller.ranks() if controller else {}}


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args.method)
    shard(model)
    result = train(model, args.method, rank, world)
    path = aurora_fx.save_adapters(model, Path(args.out) / "adapters.safetensors")  # every rank; rank 0 writes
    result["sharded"] = any(aurora_fx.distributed.is_sharded(p) for p in model.parameters())
    if rank == 0:
        (Path(args.out) / "result.json").write_text(json.dumps(result))
    assert path.is_file()
    dist.barrier()  # both ranks done with every collective before gloo tears down (an abort otherwise, rarely)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
