"""Worker for the 2-rank DDP tests (run by torchrun; not collected by pytest).

Trains a tiny model with AROMA (controller) or AuroRA under DDP (gloo, CPU); each rank sees
different data; rank r writes its adapter tensors and ranks to <out>/rank<r>.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import aurora_fx
from aurora_fx.aroma import AromaController


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["aroma", "aurora"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same base model and adapter init on every rank
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    target = nn.Sequential(nn.Linear(16, 8))
    aurora_fx.apply(model, "^0$|^2$", method=args.method, **({"dropout": 0.0} if args.method == "aroma" else {}))
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.method == "aroma")
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=2e-2)
    controller = (AromaController(model, optimizer, inner_check_every=5, max_inner_steps=20, outer_threshold=1e-4)
                  if args.method == "aroma" else None)
    data = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(args.steps):
        x = torch.randn(32, 16, generator=data)
        loss = nn.functional.mse_loss(ddp(x), target(x).detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if controller is not None:
            controller.step()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "adapter" in k}
    meta = {"ranks": json.dumps(controller.ranks() if controller else {}),
            "outer": str(controller.outer if controller else 0)}
    save_file(tensors, os.path.join(args.out, f"rank{rank}.safetensors"), metadata=meta)
    dist.barrier()  # both ranks done with every collective before gloo tears down (an abort otherwise, rarely)
    dist.destroy_process_group()


if __name__ == "__main__":
    Path(os.environ.get("TMPDIR", "/tmp")).mkdir(exist_ok=True)
    main()
