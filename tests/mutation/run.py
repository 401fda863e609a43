"""``make mutants``: plant each listed bug in a temporary copy of the repository and run the tests that guard it.

Each mutation (``tests/mutation/mutants.py``) is ``(file, old, new, tests)``: ``old`` must occur exactly once
in ``file`` (so a refactor that moves the code fails loudly here instead of silently testing nothing). The
copy is made once; each mutant is applied, its test files run (``pytest -x -q``), and the file is restored.
A mutant is *caught* when pytest fails. The table is printed and written to
``benchmarks/results/mutants.json``. Not part of ``make test`` (about 20 minutes on 2 cores).

Usage: ``python tests/mutation/run.py [NAME ...]`` (default: every mutant).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

from mutants import MUTANTS, Mutant  # noqa: E402


def _copy(target: Path) -> None:
    ignore = shutil.ignore_patterns(".venv*", ".git", "__pycache__", ".pytest_cache", "out", "runs", "*.onnx")
    shutil.copytree(ROOT, target, ignore=ignore, dirs_exist_ok=True)


def _run(mutant: Mutant, copy: Path) -> tuple[str, float]:
    path = copy / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return f"stale: the text occurs {original.count(mutant.old)} times", 0.0
    path.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                              cwd=copy, capture_output=True, text=True, timeout=900)
        verdict = "caught" if done.returncode != 0 else "MISSED"
    except subprocess.TimeoutExpired:
        verdict = "caught (timeout)"
    finally:
        path.write_text(original)
    return verdict, time.perf_counter() - start


def main() -> int:
    wanted = set(sys.argv[1:])
    chosen = [m for m in MUTANTS if not wanted or m.name in wanted]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aurora_fx_mutants.") as tmp:
        _copy(Path(tmp))
        for i, mutant in enumerate(chosen, 1):
            verdict, seconds = _run(mutant, Path(tmp))
            rows.append({"name": mutant.name, "file": mutant.file, "what": mutant.what, "verdict": verdict,
                         "seconds": round(seconds, 1), "tests": list(mutant.tests), "commit": commit})
            print(f"[{i}/{len(chosen)}] {verdict:8s} {mutant.name}: {mutant.what}", flush=True)
    out = ROOT / "benchmarks" / "results" / "mutants.json"
    if wanted and out.exists():  # a partial run updates its rows of the last table (each row keeps its commit)
        last = json.loads(out.read_text())
        fresh = {r["name"]: r for r in rows}
        rows = [fresh.pop(r["name"], {"commit": last["commit"], **r}) for r in last["rows"]] + list(fresh.values())
    caught = sum(r["verdict"].startswith("caught") for r in rows)
    print(f"\n{caught} of {len(rows)} mutants caught")
    commits = sorted({r["commit"] for r in rows})
    out.write_text(json.dumps({"commit": commit, "row_commits": commits, "caught": caught, "total": len(rows),
                               "rows": rows}, indent=2))
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
