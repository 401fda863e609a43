"""2-process torchrun (gloo, CPU): replicas never diverge (AROMA merges, AuroRA training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(method: str, out: Path) -> list[tuple[dict, dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), "--method", method, "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    states = []
    for rank in (0, 1):
        with safe_open(str(out / f"rank{rank}.safetensors"), framework="pt") as fh:
            states.append(({k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()))  # noqa: SIM118
    return states


def _assert_identical(states):
    (t0, m0), (t1, m1) = states
    assert t0.keys() == t1.keys()
    for key in t0:
        assert t0[key].shape == t1[key].shape and (t0[key] == t1[key]).all(), key  # bit-identical
    assert m0 == m1


def test_aroma_ranks_merge_identically(tmp_path):
    states = _run("aroma", tmp_path)
    _assert_identical(states)
    meta = states[0][1]
    assert int(meta["outer"]) >= 2  # merged at least twice
    assert max(json.loads(meta["ranks"]).values()) >= 2


def test_aurora_training_gives_the_same_weights_on_both_ranks(tmp_path):
    _assert_identical(_run("aurora", tmp_path))
