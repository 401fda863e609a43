"""Worker for the AROMA decision-sync test (torchrun, 2 ranks, gloo; not collected by pytest).

Nothing but the controller's own sync keeps the ranks together here: no DDP, no gradient
all-reduce, different data on each rank, and a different global RNG on each rank. Each rank
writes its outer-step history and, after every outer step, the freshly re-initialised pieces.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import aurora_fx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    backend = os.environ.get("AURORA_FX_BACKEND", "gloo")  # tests/gpu runs it under NCCL
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same model on every rank ...
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(device)
    target = nn.Sequential(nn.Linear(16, 8)).to(device)
    # compact_tol 0.2 (default 0.05): sites stop by the span rule within the run (at 0.05 none did), and rank 0's
    # rank-1 target below makes that happen at another outer step on each rank unless the decision is agreed
    aurora_fx.apply(model, "^0$|^2$", config=aurora_fx.AromaConfig(dropout=0.0, compact_tol=0.2))
    torch.manual_seed(1000 + rank)  # ... then a different global RNG on each
    optimizer = torch.optim.Adam(aurora_fx.trainable_parameters(model), lr=2e-2)
    controller = aurora_fx.AromaController(model, optimizer, inner_check_every=3, inner_threshold=0.3,
                                           max_inner_steps=40, outer_threshold=2e-2,
                                           prune_ratio=0.5)  # half the moments kept: the masks are visible
    data = torch.Generator().manual_seed(100 + rank)  # different data on each rank, no all-reduce
    fresh, masks = [], []
    for _ in range(150):
        if all(t.converged for t in controller.tracks):  # every site stopped: nothing trains any more
            break
        x = torch.randn(32, 16, generator=data).to(device)
        y = target(x).detach()
        y = y[:, :1].expand_as(y) if rank == 0 else 2 * y  # rank 0: a rank-1 target, whose sites stop growing
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        outer = controller.outer
        controller.step()
        if controller.outer != outer:
            fresh.append([t.adapter.A.detach().flatten()[:4].cpu().tolist() for t in controller.tracks])
            masks.append([(optimizer.state[p]["exp_avg"] != 0).int().flatten().tolist()  # which moments survived
                          for t in controller.tracks if not t.converged for p in (t.adapter.A, t.adapter.B)])
    history = [[h.outer, h.step, list(h.merged), list(h.converged)] for h in controller.history]
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"history": history, "fresh": fresh,
                                                                       "masks": masks}))
    dist.barrier()  # both ranks done with every collective before gloo tears down (an abort otherwise, rarely)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
