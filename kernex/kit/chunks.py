"""Long id lists in slices: bounded `IN (...)` clauses, and fleet-wide work done in rounds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items`, each at most `size` long (the last may be shorter)."""
    if size < 1:
        raise ValueError("a chunk holds at least one item")
    for start in range(0, len(items), size):
        yield items[start : start + size]
