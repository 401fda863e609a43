"""Shared benchmark helpers: interleaved timing, medians, tables and JSON results."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def interleaved(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2,
                seed: int = 0) -> dict[str, list[float]]:
    """Run every variant once per round (A B C, C A B, ...) so drift on a shared machine hits all
    alike; the order inside each round is shuffled (seeded) so no variant always runs first."""
    rng = random.Random(seed)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            fn = variants[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``time[name] / time[reference]`` measured in the same round.

    Both ran within milliseconds of each other, so a slow spell of the shared machine cancels out
    of each round's ratio instead of landing on one variant's median.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def git_commit() -> str:
    """The checkout's commit (short hash, ``+dirty`` with uncommitted changes outside ``benchmarks/results/``,
    which benchmarks write as they go), for results files."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results")
        return commit + ("+dirty" if changed else "")
    except OSError:
        return "unknown"


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``: the peak since ``clear_refs``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": environment(), "commit": git_commit(), **payload}, indent=2))
    os.replace(tmp, path)
    return path
