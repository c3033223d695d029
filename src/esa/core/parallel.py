"""Data parallelism inside one run: every replica executes the whole run, computing only its share of the work.

A run is split across ``n`` model replicas (one per GPU, or per CPU worker) without any kind knowing how. Each
expensive, independent step of a run — one micro-batch of evaluation windows, of zero-shot requests, or of a
perturbation trial's re-scoring — goes through :func:`unit`. Units are numbered in the order a run reaches them;
unit ``u`` belongs to replica ``u % n``. The owner computes it and posts the value on a shared board; every other
replica takes the value from the board instead of computing it. So every replica follows the same control flow
with the same values (an adaptive step — a greedy search, a screening stop rule — decides identically
everywhere), each computes about 1/n of the units, and each ends the run holding the complete, identical result.
Because a unit is computed exactly as a single process computes it (the same micro-batch, the same code path),
the result equals a single-process run's, bit for bit, whatever ``n``.

Example with ``n = 2``: a baseline of 5 micro-batches runs batches 0, 2, 4 on replica 0 and 1, 3 on replica 1;
a perturbation run's build pass (not a unit: each replica needs its own prefix cache) runs on both, then trial
re-scorings alternate between them.

Robustness: a value carries its unit's ``tag`` (which step, which batch); a replica that reaches unit ``u`` with
another tag than the owner posted has diverged and computes the unit itself (logged). When the owner is lost
(its process died) the board answers :data:`LOST` and the waiting replica computes the unit itself, so a run
survives the loss of any replica but the last. Steps that are not units (gradient passes, the prefix cache's
build, corpus tokenisation) are repeated by every replica.

Outside :func:`share` (every single-process run) :func:`unit` is just ``compute(*args)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Lost:
    def __repr__(self) -> str:
        return "LOST"

    def __reduce__(self) -> str:  # unpickled (from a Ray board) as this module's LOST, so `is LOST` holds
        return "LOST"


LOST = _Lost()  # the board's answer for a unit whose owner is gone: compute it yourself
POLL_SECONDS = (0.0005, 0.05)  # first and longest wait between two looks at the board


class Board(Protocol):
    """Where replicas of one run post and read unit values (a Ray actor on a cluster, a dict in tests).

    ``post(u, tag, value)`` keeps the first value posted for ``u``. ``look(u, owner, me)`` returns
    ``(tag, value)`` once ``u`` is posted; while it is not, None (wait) — or :data:`LOST` when ``owner`` is gone
    (it left the run, or its process died) and replica ``me`` is the unit's heir (:func:`heir`), who computes it.
    ``leave(index)``: replica ``index`` ends its part of the run (also on an error), so nobody waits for a unit
    it will never post.
    """

    def post(self, u: int, tag: str, value: Any) -> None: ...

    def leave(self, index: int) -> None: ...

    def look(self, u: int, owner: int, me: int) -> tuple[str, Any] | _Lost | None: ...


def heir(u: int, count: int, gone: set[int]) -> int | None:
    """Who computes unit ``u`` once its owner is gone: the ``u``-th of the replicas still there, in turn, so a
    lost replica's units are spread over the survivors (None: none is left)."""
    there = [i for i in range(count) if i not in gone]
    return there[u % len(there)] if there else None


@dataclass
class Share:
    """This replica's place in a data-parallel run: replica ``index`` of ``count``, reading and posting on
    ``board``. The counters say what it did (stored with the run)."""

    index: int
    count: int
    board: Board
    next_unit: int = 0
    computed: int = 0  # units this replica computed (its own, plus any it took over)
    taken_over: int = 0  # units of a lost owner, or of a diverged one, computed here
    waited_seconds: float = 0.0
    diverged: list[int] = field(default_factory=list)

    def stats(self) -> dict:
        return {"replicas": self.count, "replica": self.index, "units": self.next_unit, "computed": self.computed,
                "taken_over": self.taken_over, "waited_seconds": round(self.waited_seconds, 3),
                "diverged_units": len(self.diverged)}


_active: ContextVar[Share | None] = ContextVar("esa_data_parallel_share", default=None)


@contextmanager
def share(index: int, count: int, board: Board) -> Iterator[Share]:
    """Run the enclosed code as replica ``index`` of ``count``; yields the :class:`Share` (its counters)."""
    if not 0 <= index < count:
        raise ValueError(f"replica index {index} outside 0..{count - 1}")
    current = Share(index, count, board)
    token = _active.set(current)
    try:
        yield current
    finally:
        _active.reset(token)
        board.leave(index)


def active() -> Share | None:
    """The enclosing :func:`share`, or None in a single-process run."""
    return _active.get()


def units(tag: str, compute: Callable[..., T], calls: list[tuple], owners: list[int | None] | None = None
          ) -> list[T]:
    """``[compute(*args) for args in calls]`` — in a data-parallel run, each replica computes the calls it owns
    first, posting each value, and only then reads the others' values, so no replica waits while it still has
    work of its own (the replicas of one loop run side by side).

    ``tag`` names the step (e.g. ``"windows"``; call k is ``"windows/k"``); it must be the same on every replica.
    A value must be a small picklable result (CPU tensors or arrays), never model state. ``owners[k]``: the
    replica that computes call k (e.g. the one holding the prefix-cache states of its batch); None or absent:
    unit number ``u % n``.
    """
    current = _active.get()
    if current is None or current.count == 1:
        return [compute(*args) for args in calls]
    n, base = current.count, current.next_unit
    current.next_unit += len(calls)
    owners = [(base + k) % n if o is None else o % n for k, o in enumerate(owners or [None] * len(calls))]
    out = {k: _compute(current, base + k, f"{tag}/{k}", compute, args)
           for k, args in enumerate(calls) if owners[k] == current.index}
    for k, args in enumerate(calls):
        if k not in out:
            out[k] = _receive(current, base + k, f"{tag}/{k}", owners[k], compute, args)
    return [out[k] for k in range(len(calls))]


def unit(tag: str, compute: Callable[..., T], *args, owner: int | None = None) -> T:
    """One call of :func:`units`: ``compute(*args)``, or its value from the replica that owns it."""
    return units(tag, compute, [args], [owner])[0]


def _receive(current: Share, u: int, tag: str, owner: int, compute: Callable[..., T], args: tuple) -> T:
    """Unit ``u`` of another replica: its posted value, or computed here when its owner is lost or diverged."""
    answer = _wait(current, u, owner)
    if answer is LOST:
        current.taken_over += 1
        return _compute(current, u, tag, compute, args)
    posted_tag, value = answer
    if isinstance(value, Raised) and posted_tag == tag:  # e.g. out of memory: every replica takes the same path
        raise value.error
    if posted_tag != tag:
        log.warning("data-parallel unit %d: this replica is at %r, its owner posted %r; computing it here",
                    u, tag, posted_tag)
        current.diverged.append(u)
        current.taken_over += 1
        return _alone(compute, args)
    return value


@dataclass(frozen=True)
class Raised:
    """Posted instead of a value when the owner's ``compute()`` raised: the others raise the same error, so an
    out-of-memory retry (a smaller micro-batch) happens on every replica alike."""

    error: Exception


def _alone(compute: Callable[..., T], args: tuple) -> T:
    """``compute(*args)`` with no share active: units inside a unit are this replica's own work."""
    token = _active.set(None)
    try:
        return compute(*args)
    finally:
        _active.reset(token)


def _compute(current: Share, u: int, tag: str, compute: Callable[..., T], args: tuple) -> T:
    try:
        value = _alone(compute, args)
    except Exception as exc:
        current.board.post(u, tag, Raised(exc))
        raise
    current.computed += 1
    current.board.post(u, tag, value)
    return value


def _wait(current: Share, u: int, owner: int):
    """Look at the board until unit ``u`` is posted or its owner is lost (backing off up to 50 ms)."""
    start, pause = time.perf_counter(), POLL_SECONDS[0]
    while (answer := current.board.look(u, owner, current.index)) is None:
        time.sleep(pause)
        pause = min(2 * pause, POLL_SECONDS[1])
    current.waited_seconds += time.perf_counter() - start
    return answer


class LocalBoard:
    """A :class:`Board` in one process (threads as replicas, tests): a dict and the set of replicas gone."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.values: dict[int, tuple[str, Any]] = {}
        self.gone: set[int] = set()

    def post(self, u: int, tag: str, value: Any) -> None:
        self.values.setdefault(u, (tag, value))

    def leave(self, index: int) -> None:
        self.gone.add(index)

    def look(self, u: int, owner: int, me: int):
        if u in self.values:
            return self.values[u]
        if owner in self.gone and heir(u, self.count, self.gone) == me:
            return LOST
        return None
