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
    "ort": {"rtol": 0.0, "atol": 1e-4},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_close(actual, expected, dtype=None, **override):
    """``torch.testing.assert_close`` with the named tolerance of ``dtype`` (default: actual's)."""
    tol = dict(TOLERANCES[dtype if dtype is not None else actual.dtype])
    tol.update(override)
    torch.testing.assert_close(actual, expected, **tol)
