"""The training path on CUDA: run on a GPU machine (skipped without CUDA).

``pytest -m gpu tests/gpu`` runs: the fused op under bf16 and fp16 autocast against the unfused
graph, a bf16 model with float32 adapters training, AROMA merges on CUDA parameters, and (with two or
more GPUs) the AROMA decision-sync worker under NCCL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aurora_fx
from tests.models import CASES, randomize_adapters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pair(name: str):
    models = []
    for fuse in (True, False):
        torch.manual_seed(0)
        case = CASES[name]
        model = aurora_fx.apply(case.build().cuda(), case.pattern, fuse=fuse, dropout=0.0)
        randomize_adapters(model, std=0.1)
        models.append(model)
    return case, models


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fused_op_under_cuda_autocast_matches_the_unfused_graph(name, amp):
    case, (fused, unfused) = _pair(name)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.inputs(2, 16).items()}
    with torch.autocast("cuda", dtype=amp):
        a, b = case.output(fused(**inputs)), case.output(unfused(**inputs))
        (a.float().pow(2).mean() + b.float().pow(2).mean()).backward()
    assert a.dtype == b.dtype == amp
    torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    for p, q in zip(aurora_fx.trainable_parameters(fused), aurora_fx.trainable_parameters(unfused), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-3)


def test_a_bf16_model_trains_with_float32_adapters_on_cuda():
    case = CASES["llama"]
    model = aurora_fx.apply(case.build().cuda().to(torch.bfloat16), case.pattern)
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-3)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.inputs(2, 16).items()}
    for _ in range(3):
        loss = case.output(model(**inputs)).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in aurora_fx.trainable_parameters(model))


def test_aroma_merges_on_cuda_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).cuda()
    aurora_fx.apply(net, "^0$|^2$", method="aroma", dropout=0.0)
    optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(net), lr=1e-2)
    controller = aurora_fx.AromaController(net, optimizer, inner_check_every=2, max_inner_steps=6)
    x, y = torch.randn(64, 32, device="cuda"), torch.randn(64, 8, device="cuda")
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step()
    assert controller.outer >= 3 and net[0].adapter.U.is_cuda and net[0].adapter.U.shape[1] >= 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_aroma_decisions_sync_under_nccl(tmp_path):
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "AURORA_FX_BACKEND": "nccl"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "tests" / "sync_worker.py"), "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["fresh"] == ranks[1]["fresh"]


def test_full_opcheck_of_the_triton_ops_on_cuda():
    """The fake-tensor and AOT-dispatch checks the CPU interpreter cannot run (tests/ops/triton_worker.py)."""
    pytest.importorskip("triton")
    ops = torch.ops.aurora_fx

    def leaf(*shape):
        return torch.randn(*shape, device="cuda").requires_grad_()

    x, base, A, B, H, Ws = leaf(7, 6), leaf(7, 5), leaf(2, 6), leaf(5, 2), leaf(2, 2), leaf(2, 8)
    torch.library.opcheck(ops.aurora_delta_add_triton.default, (base, x, A, B, H, Ws, 2.0, -1.0, 0.4))
    torch.library.opcheck(ops.lora_delta_add_triton.default, (base, x, A, B, 2.0))
