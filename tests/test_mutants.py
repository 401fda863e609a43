"""The mutation harness's planted bugs still point at code (``tests/mutation/mutants.py``).

A refactor that moves a guarded line leaves its mutant *stale*: ``tests/mutation/run.py`` then reports it and
tests nothing, but only when someone runs the 20-minute harness (four went stale unnoticed before issue 34's
last stop). This runs in ``make test``: every mutant's text occurs exactly once in its file, the replacement
differs, the tests it names exist, and the names are unique.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutation"))
from mutants import MUTANTS  # noqa: E402


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_plants_a_change_in_code_that_exists(mutant):
    text = (ROOT / mutant.file).read_text()
    found = text.count(mutant.old)
    assert found == 1, f"{mutant.name}: its text occurs {found} times in {mutant.file}; retarget it"
    assert mutant.new != mutant.old
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).is_file(), f"{mutant.name}: no test file {test}"
