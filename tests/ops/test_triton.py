"""The Triton kernels against the oracle, on CPU through the Triton interpreter (TRITON_INTERPRET=1).

The interpreter must be switched on before Triton is imported, so ``tests/ops/triton_worker.py`` runs
in a fresh process; this test reads its JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

WORKER = Path(__file__).with_name("triton_worker.py")
TOL = {"torch.float32": 1e-5, "torch.bfloat16": 3e-2}  # relative to the largest value


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(WORKER.parents[2])}
    result = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_case_ran(cases):
    assert len([c for c in cases if c["op"] == "aurora"]) == 2 * 4 * 2 + 2
    assert len([c for c in cases if c["op"] == "lora"]) == 2 * 4 + 2
    assert any(c["op"] == "aurora" and c["n"] > 2 * 64 and c["d_out"] > 2 * 64 for c in cases)  # multi-block
    assert any(c["op"] == "aurora" and c["z_outside"] > 0.1 for c in cases)  # z beyond the grid was seen


@pytest.mark.parametrize("op", ["aurora", "lora"])
def test_kernels_equal_the_oracle_forward_and_backward(cases, op):
    for case in (c for c in cases if c["op"] == op):
        tol = TOL[case["dtype"]]
        assert case["forward"] <= tol and case["backward"] <= tol, case


def test_the_inplace_variant_accumulates_into_base(cases):
    (case,) = [c for c in cases if c["op"] == "inplace"]
    assert case["same_tensor"] and case["forward"] <= 1e-6


def test_opcheck_and_float32_gradcheck_of_the_triton_ops(cases):
    (case,) = [c for c in cases if c["op"] == "opcheck"]
    assert {k: v for k, v in case.items() if k != "op"} == {
        "aurora_delta_add_triton": "ok", "lora_delta_add_triton": "ok", "anl_forward_triton": "ok",
        "anl_backward_triton": "ok", "rank_update_triton": "ok", "rank_update_inplace_triton": "ok",
        "aurora_delta_add_triton_gradcheck": True, "lora_delta_add_triton_gradcheck": True}
