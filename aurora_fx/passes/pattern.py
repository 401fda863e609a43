"""Patterns that select sites or modules by path, compiled once into a ``Matcher``.

Rule (documented loudly, unlike PEFT's full match): a string is a Python regex **searched** in
the path with ``re.search``; ``"attn.*proj"`` matches ``blocks.0.attn.proj`` but not timm's fused
``blocks.0.attn.qkv``. Anchor with ``^…$`` for an exact match. A list of regexes matches if any
does; a callable ``(path, module) -> bool`` decides itself (``module`` is the site's owner, or
the module itself when selecting modules).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["Pattern", "Matcher", "compile_pattern"]

Pattern = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class Matcher:
    """A compiled pattern: call it as ``matcher(path, module) -> bool``."""

    pattern: Pattern
    predicate: Callable[[str, nn.Module], bool]

    def __call__(self, path: str, module: nn.Module) -> bool:
        """Whether the pattern selects ``path`` (owned by ``module``)."""
        return bool(self.predicate(path, module))

    @property
    def text(self) -> str | None:
        """The pattern when it is one string (for nearest-name hints), else None."""
        return self.pattern if isinstance(self.pattern, str) else None

    def describe(self) -> str:
        """The pattern as the user wrote it, for error messages."""
        p = self.pattern
        return repr(p) if not callable(p) else f"callable {getattr(p, '__name__', p)!r}"


def compile_pattern(pattern: Pattern | Matcher) -> Matcher:
    """Compile ``pattern`` (see the module docstring); a ``Matcher`` is returned as it is.

    Raises:
        ValueError: An invalid regex (the message names it and the regex error).
        TypeError: Not a str, list of str, callable or None.
    """
    if isinstance(pattern, Matcher):
        return pattern
    if pattern is None:
        return Matcher(None, lambda path, module: False)
    if callable(pattern):
        return Matcher(pattern, pattern)
    regexes = [pattern] if isinstance(pattern, str) else list(pattern) if isinstance(pattern, (list, tuple)) else None
    if not regexes or not all(isinstance(p, str) for p in regexes):
        raise TypeError(
            f"pattern must be a regex string, a list of regex strings or a callable (path, module) -> bool, "
            f"got {pattern!r}"
        )
    compiled = [_compile(p) for p in regexes]
    return Matcher(pattern, lambda path, module: any(c.search(path) for c in compiled))


def _compile(regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise ValueError(
            f"invalid regex {regex!r} in pattern: {exc}; patterns are Python regexes searched in module paths "
            f"(re.search), e.g. 'attn.*proj' or 'query|value'; use re.escape() for literal names"
        ) from None
