"""Shared test settings: one table of tolerances, a fixed seed, offline HF, small thread count."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# assert_close defaults are the starting point; named once, used everywhere.
TOLERANCES = {
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float64: {"rtol": 0.0, "atol": 1e-10},
    "ort": {"rtol": 0.0, "atol": 1e-5},
}
ORT_ATOL = TOLERANCES["ort"]["atol"]  # onnxruntime vs PyTorch in float32: measured differences are ~1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts and ends with dynamo's caches empty.

    Compiled tests share code objects (the fused-op wrappers, HF forwards); without a reset, a test's
    compiles count toward a later test's recompile limit, and ``fullgraph=True`` then fails depending
    on the order the suite runs in.
    """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_close(actual, expected, dtype=None, **override):
    """``torch.testing.assert_close`` with the named tolerance of ``dtype`` (default: actual's)."""
    tol = dict(TOLERANCES[dtype if dtype is not None else actual.dtype])
    tol.update(override)
    torch.testing.assert_close(actual, expected, **tol)
