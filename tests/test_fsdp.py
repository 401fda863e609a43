"""FSDP2 on 2 CPU ranks (torchrun, gloo): the same training as one process; AROMA's decisions kept in sync.

``tests/fsdp_worker.py`` shards an adapted Llama config (``fully_shard`` per decoder layer, then the
root) and trains it on one global batch split over the ranks; the test trains the same model in this
process on the whole batch and compares per-step losses, final adapters and the checkpoint that
``save_adapters`` wrote under FSDP2. ``tests/sync_worker.py`` gives each rank different data and
no gradient all-reduce, so only the controller's own sync keeps the AROMA decisions identical.
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
from tests import fsdp_worker as W

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
TOL = 1e-5


def _torchrun(worker: str, out: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / worker),
           "--out", str(out), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("method", sorted(W.VARIANTS))
def test_fsdp2_on_two_ranks_equals_one_process(method, tmp_path):
    _torchrun("fsdp_worker.py", tmp_path, "--method", method)
    sharded = json.loads((tmp_path / "result.json").read_text())
    assert sharded["sharded"]
    single_model = W.build(method)
    single = W.train(single_model, method)
    assert max(abs(a - b) for a, b in zip(single["losses"], sharded["losses"], strict=True)) <= TOL
    assert single["history"] == sharded["history"] and single["ranks"] == sharded["ranks"]
    if method == "aroma":
        assert max(single["ranks"].values()) >= 3  # it merged on the sharded pieces
    ckpt = aurora_fx.checkpoint.read_checkpoint(tmp_path / "adapters.safetensors")
    mine = {f"adapters/{site}/{name}": t for site, _, a in aurora_fx.inventory.adapter_modules(single_model)
            for name, t in a.stored_tensors().items()}
    assert mine.keys() == {k for k in ckpt.tensors if k.startswith("adapters/")}
    assert max((mine[k] - ckpt.tensors[k]).abs().max().item() for k in mine) <= TOL
    fresh = aurora_fx.unload(W.build(method))  # a fresh, unsharded base
    aurora_fx.load_adapters(fresh, tmp_path / "adapters.safetensors")
    batch = W.batch(0, 1)
    with torch.no_grad():
        diff = (fresh.eval()(**batch).logits - single_model.eval()(**batch).logits).abs().max().item()
    assert diff <= TOL


def test_aroma_decisions_stay_identical_when_only_the_controller_syncs(tmp_path):
    _torchrun("sync_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["history"]) >= 3
    assert ranks[0]["history"] == ranks[1]["history"]  # the same outer steps, merges and stops
    assert any(h[3] for h in ranks[0]["history"][:-1])  # a site stopped while another grew on: a decision to agree
    assert ranks[0]["fresh"] == ranks[1]["fresh"]  # re-initialised pieces from the seeded generator
    kept = [m for step in ranks[0]["masks"] for m in step]
    assert 0 < sum(map(sum, kept)) < sum(map(len, kept))  # the moment resets kept some entries, not all
    assert ranks[0]["masks"] == ranks[1]["masks"]  # the same reset masks on every rank
