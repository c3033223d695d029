"""Name → implementation lookup with "did you mean" errors.

Every extension point (corpora, model aliases, window methods, profiles, scorers, perturbations, tasks) is a
:class:`Registry`. A failed lookup names the near matches and lists every valid name, so a typo never turns
into a silent default.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from esa.core.errors import EsaError

T = TypeVar("T")


def suggest(name: str, valid: list[str], what: str) -> str:
    """A one-line message for an unknown ``name`` among ``valid`` (near matches first)."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Valid {what}s: {', '.join(sorted(valid))}."


class Registry(Generic[T]):
    """A small ordered mapping from names to items that raises helpful errors."""

    def __init__(self, what: str) -> None:
        self.what = what  # noun used in error messages, e.g. "dataset"
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        assert name not in self._items, f"{self.what} {name!r} registered twice"
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise EsaError(suggest(name, list(self._items), self.what))
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
