"""Every code block of README.md and docs/*.md runs: Python blocks in one namespace per page (in a
temporary folder), shell blocks of docs/*.md in one folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
BLOCK = re.compile(r"^```(?P<lang>\w+)\n(?P<code>.*?)^```", re.M | re.S)


def _blocks(path: Path, lang: str) -> list[str]:
    return [m["code"] for m in BLOCK.finditer(path.read_text()) if m["lang"] == lang]


@pytest.mark.parametrize("doc", PAGES, ids=[d.name for d in PAGES])
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write runs/..., out/...
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(_blocks(doc, "python")):
        try:
            exec(compile(code, f"{doc.name}[python block {i}]", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"{doc.name} python block {i} failed: {exc!r}\n{code}") from exc


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_shell_blocks_run(doc, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for i, code in enumerate(_blocks(doc, "sh")):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{doc.name} sh block {i} failed:\n{code}\n{result.stderr[-2000:]}"
