"""Progress bars with ETA (rich) for long loops; off in library use and tests, switched on by the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_ENABLED = False


def enable(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = on


@contextmanager
def bar(total: int, description: str) -> Iterator:
    """Yield ``advance(n=1)``; renders a rich progress bar with ETA when enabled."""
    if not _ENABLED:
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
