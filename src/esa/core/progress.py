"""Progress bars with ETA (rich) for long loops; off in library use and tests, switched on by the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_ENABLED = False
_COMMAND = ""  # the command line the CLI is running, for the log file's header


def enable(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = on


def set_command(argv: list[str]) -> None:
    global _COMMAND
    _COMMAND = " ".join(["esa", *argv])


def command_line() -> str:
    """``esa <args>`` as the CLI was called ('' in library use)."""
    return _COMMAND


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
