"""Ray executor: model replicas on a Ray cluster, each run split across a group's replicas; only the driver
writes the database.

Each model group gets ``replicas`` Ray actors (:class:`ModelWorker`), each loading the model once (requesting
``num_gpus`` GPUs — 0 on a CPU cluster — and ``num_cpus`` CPUs) and keeping it, with its prefix caches and the
rankings its runs made, for all the group's runs. Groups run side by side as far as the cluster's resources go.

**Data parallelism inside a run** (:mod:`esa.core.parallel`). With ``replicas = n > 1`` every run of the group
is sent to all ``n`` replicas. Each executes the whole run, computes only every n-th unit (a micro-batch of
windows, of zero-shot requests, or of a trial's re-scoring) and takes the other units from the group's
:class:`UnitBoard` — so each replica ends with the same, complete record, equal to a single process's. The
driver commits the first completed record of a run once; the others are compared with it (a difference is
logged: a non-deterministic kernel). A replica that dies is marked lost on the board: the survivors compute its
units from then on, for this run and the group's later runs, so a run completes while one replica lives.

The driver collects each finished record as soon as it returns (``ray.wait``) and commits it — artifacts, then
one transaction — so a crash of the driver or of every replica loses only the runs in flight. Workers never
touch the database: results travel back in memory, so workers need no shared filesystem with the driver.

Ray is optional: ``pip install 'esa[cluster]'``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from esa.core.errors import EsaError
from esa.core.parallel import LocalBoard
from esa.executors.core import (EventFn, Summary, commit, group_by_model, known_complete, load_dependencies,
                                model_key, run_key)
from esa.store import LeaseKeeper, Store, new_holder

log = logging.getLogger(__name__)


def import_ray():
    """Import ray lazily, with the install command when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise EsaError("--executor ray needs Ray, which is not installed: pip install 'esa[cluster]' "
                       "(or use --executor local)") from exc
    return ray


class UnitBoard:
    """A Ray actor: the unit values of the runs of one model group's ``count`` replicas, posted and read by them
    — one :class:`esa.core.parallel.LocalBoard` per run id. A replica marked lost stays gone for every run."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.runs: dict[str, LocalBoard] = {}
        self.lost: set[int] = set()

    def _run(self, rid: str) -> LocalBoard:
        if rid not in self.runs:
            self.runs[rid] = LocalBoard(self.count)
            self.runs[rid].gone |= self.lost
        return self.runs[rid]

    def post(self, rid: str, u: int, tag: str, value) -> None:
        self._run(rid).post(u, tag, value)

    def look(self, rid: str, u: int, owner: int, me: int):
        return self._run(rid).look(u, owner, me)

    def leave(self, rid: str, index: int) -> None:
        self._run(rid).leave(index)

    def mark_lost(self, index: int) -> None:
        self.lost.add(index)
        for board in self.runs.values():
            board.leave(index)

    def forget(self, rid: str) -> None:
        self.runs.pop(rid, None)


class _RunBoard:
    """The :class:`esa.core.parallel.Board` of one run, on a replica: calls into the group's UnitBoard actor."""

    def __init__(self, ray, actor, rid: str) -> None:
        self.ray, self.actor, self.rid = ray, actor, rid

    def post(self, u: int, tag: str, value) -> None:
        self.actor.post.remote(self.rid, u, tag, value)  # calls from one replica arrive in order

    def look(self, u: int, owner: int, me: int):
        return self.ray.get(self.actor.look.remote(self.rid, u, owner, me))

    def leave(self, index: int) -> None:
        self.ray.get(self.actor.leave.remote(self.rid, index))


class ModelWorker:
    """Runs on a Ray worker: loads one model once, then executes runs of that model on request."""

    def __init__(self, spec) -> None:
        from esa.core.provenance import provenance
        from esa.kinds.base import RunContext
        from esa.models import load_model

        self.lm = load_model(spec)
        self.prov = provenance(self.lm.device, self.lm.model)
        self.ctx = RunContext()  # rankings made here stay here for the perturbation runs that follow

    def fingerprint(self) -> dict:
        return self.lm.fingerprint.to_dict()

    def add_rankings(self, rankings: dict) -> None:
        """Rankings of sensitivity runs completed before (read by the driver from the store)."""
        self.ctx.rankings.update(rankings)

    def run(self, run, rid: str, index: int = 0, count: int = 1, board=None):
        """Execute ``run`` as replica ``index`` of ``count`` (its record's provenance says so)."""
        import ray

        from esa.core import parallel
        from esa.executors.core import execute_run

        if count == 1:
            return execute_run(self.lm, run, rid, self.ctx, self.prov)
        with parallel.share(index, count, _RunBoard(ray, board, rid)) as share:
            record = execute_run(self.lm, run, rid, self.ctx, self.prov)
        record.provenance = {**record.provenance, "data_parallel": share.stats()}
        return record


@dataclass
class _Run:
    """One run in flight on its group's replicas: the refs not yet returned, and whether it is committed."""

    run: object
    rid: str
    refs: set = field(default_factory=set)
    committed: object = None  # the committed RunRecord
    failed_record: object = None  # a replica's failed record, committed if none completes
    lost: list[str] = field(default_factory=list)
    announced: bool = False  # its "start" event was sent


@dataclass
class _Group:
    """A model group on the cluster: its replicas (None where a replica failed to load) and its board."""

    spec: object
    runs: list
    replicas: list
    board: object = None
    fingerprints: dict = field(default_factory=dict)  # replica index → fingerprint, or the load error
    queue: list = field(default_factory=list)  # its submitted _Runs in execution order, not yet finished

    def live(self) -> list[int]:
        return [i for i, fp in self.fingerprints.items() if isinstance(fp, dict)]


def _start_groups(ray, runs: list, store: Store, study_id: str, summary: Summary, on_event: EventFn,
                  options: dict) -> dict:
    """``replicas`` actors per model group that still has work; returns {fingerprint ref: (group, index)}."""
    n = options["replicas"]
    actor_cls = ray.remote(ModelWorker).options(num_gpus=options["num_gpus"], num_cpus=options["num_cpus"])
    board_cls = ray.remote(UnitBoard).options(num_cpus=0)
    loading = {}
    for spec, group in group_by_model(runs):
        if known_complete(store, spec, group, study_id):
            summary.skipped += len(group)
            on_event("skip_group", model=spec.name, runs=len(group))
            continue
        grp = _Group(spec, group, [actor_cls.remote(spec) for _ in range(n)], board_cls.remote(n) if n > 1 else None)
        loading |= {actor.fingerprint.remote(): (grp, i) for i, actor in enumerate(grp.replicas)}
    return loading


def _on_fingerprint(ray, ref, grp: _Group, index: int, store: Store, study_id: str, summary: Summary,
                    on_event: EventFn, keeper: LeaseKeeper) -> dict:
    """One replica answered; once all have, skip the group's completed runs and submit the rest to every live
    replica. Returns {ref: _Run} of what was submitted."""
    try:
        grp.fingerprints[index] = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 — the actor's constructor failed (model not loadable there)
        grp.fingerprints[index] = str(getattr(exc, "cause", None) or exc)
    if len(grp.fingerprints) < len(grp.replicas):
        return {}
    live = grp.live()
    if not live:
        error = grp.fingerprints[0]
        summary.load_errors.append((grp.spec.name, error))
        on_event("load_error", model=grp.spec.name, error=error)
        return {}
    fingerprint = grp.fingerprints[live[0]]
    if any(grp.fingerprints[i] != fingerprint for i in live):
        raise EsaError(f"{grp.spec.name}: the replicas loaded different weights (fingerprints differ); "
                       "every worker must see the same model files")
    for i in set(range(len(grp.replicas))) - set(live):
        grp.board.mark_lost.remote(i)
    return _submit(grp, fingerprint, store, study_id, summary, on_event, keeper)


def _submit(grp: _Group, fingerprint: dict, store: Store, study_id: str, summary: Summary, on_event: EventFn,
            keeper: LeaseKeeper) -> dict:
    key = model_key(grp.spec)
    if key:
        store.remember_model(key, fingerprint)
    ids = [run_key(r, fingerprint) for r in grp.runs]
    store.link_runs(study_id, ids)
    done = store.completed(ids)
    summary.skipped += len(done)
    on_event("group", model=grp.spec.name, pending=len(ids) - len(done), completed=len(done))
    pending = [r for r, rid in zip(grp.runs, ids) if rid not in done]
    rankings = load_dependencies(store, pending, fingerprint, {})
    n = len(grp.replicas)
    for i in grp.live():
        grp.replicas[i].add_rankings.remote(rankings)  # an actor's calls run in submission order
    submitted = {}
    for run, rid in ((r, i) for r, i in zip(grp.runs, ids) if i not in done):
        if not store.claim(rid, keeper.holder):  # another driver is computing it
            summary.elsewhere.append(run.label())
            on_event("elsewhere", label=run.label(), run_id=rid)
            continue
        keeper.add(rid)
        state = _Run(run, rid)
        for i in grp.live():
            ref = grp.replicas[i].run.remote(run, rid, i, n, grp.board)
            state.refs.add(ref)
            submitted[ref] = (state, grp, i)
        grp.queue.append(state)
    _started(grp, summary, on_event)
    return submitted


def _started(grp: _Group, summary: Summary, on_event: EventFn) -> None:
    """Announce the run the group's replicas are at: they execute its runs in order, so it is the oldest one not
    committed yet (once per run)."""
    running = next((st for st in grp.queue if st.committed is None), None)
    if running is not None and not running.announced:
        running.announced = True
        on_event("start", label=running.run.label(),
                 index=summary.skipped + summary.completed + len(summary.failed) + 1, total=summary.total)


def _same_arrays(a: dict, b: dict) -> bool:
    """Equal keys and values (NaN equal to NaN in float arrays)."""
    def equal(x, y) -> bool:
        x, y = np.asarray(x), np.asarray(y)
        return np.array_equal(x, y, equal_nan=x.dtype.kind in "fc" and y.dtype.kind in "fc")
    return set(a) == set(b) and all(equal(a[k], b[k]) for k in a)


def _collect(ray, ref, state: _Run, grp: _Group, index: int, store: Store, summary: Summary, on_event: EventFn,
             keeper: LeaseKeeper) -> None:
    """One replica's answer for a run: commit the run's first completed record; a replica that died is marked
    lost on the board (the others take over its units). When no replica of the run is left: a run that no
    replica finished is reported, not recorded, and its claim released so a rerun (or another driver) redoes it."""
    state.refs.discard(ref)
    try:
        record = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 — the worker died (OOM kill, node lost): its units move on
        state.lost.append(str(exc))
        if grp.board is not None:
            grp.board.mark_lost.remote(index)
        grp.fingerprints[index] = f"lost: {exc}"
        record = None
    if record is not None and state.committed is not None:
        if record.status == "completed" and not _same_arrays(record.arrays, state.committed.arrays):
            log.warning("%s: replica %d's arrays differ from the committed ones (a non-deterministic kernel?)",
                        state.run.label(), index)
    elif record is not None and record.status == "completed":
        _commit(store, state, record, summary, on_event, keeper)
        _started(grp, summary, on_event)
    elif record is not None:
        state.failed_record = state.failed_record or record
    if state.refs:
        return
    grp.queue.remove(state)
    if grp.board is not None:
        grp.board.forget.remote(state.rid)
    if state.committed is None and state.failed_record is not None:
        _commit(store, state, state.failed_record, summary, on_event, keeper)
    elif state.committed is None:
        keeper.discard(state.rid)
        store.release(state.rid, keeper.holder)
        summary.failed.append((state.run.label(), f"worker lost: {state.lost[-1]}"))
    _started(grp, summary, on_event)


def _commit(store: Store, state: _Run, record, summary: Summary, on_event: EventFn, keeper: LeaseKeeper) -> None:
    keeper.discard(state.rid)
    commit(store, record, keeper.holder)
    state.committed = record
    summary.add(record, state.run.label())
    on_event("run", record=record, label=state.run.label(),
             done=summary.skipped + summary.completed + len(summary.failed), total=summary.total)


def _kill_group(ray, grp: _Group) -> None:
    for actor in (a for a in [*grp.replicas, grp.board] if a is not None):
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 — already gone
            pass


def run_ray(runs: list, store: Store, study_id: str, on_event: EventFn, address: str | None = None,
            num_gpus: float = 0.0, num_cpus: float = 1.0, replicas: int = 1) -> Summary:
    """Execute ``runs`` on a Ray cluster (``address=None`` starts or joins a local one), each model group on
    ``replicas`` model replicas that split every run between them (module docstring).

    A group's actors are killed as soon as its runs are finished, so their GPUs go to a group still waiting.
    """
    if replicas < 1:
        raise EsaError(f"--replicas must be ≥ 1, got {replicas}")
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    summary = Summary(total=len(runs))
    options = {"num_gpus": num_gpus, "num_cpus": num_cpus, "replicas": replicas}
    loading = _start_groups(ray, runs, store, study_id, summary, on_event, options)
    groups = {id(grp): grp for grp, _ in loading.values()}
    for grp in groups.values():
        on_event("replicas", model=grp.spec.name, actors=grp.replicas)
    keeper = LeaseKeeper(store.path, new_holder())  # renews the claims of every run in flight
    try:
        with keeper:
            _drive(ray, loading, store, study_id, summary, on_event, keeper)
    finally:
        for rid in keeper.held():
            store.release(rid, keeper.holder)
        for grp in groups.values():
            _kill_group(ray, grp)
    return summary


def _drive(ray, loading: dict, store: Store, study_id: str, summary: Summary, on_event: EventFn,
           keeper: LeaseKeeper) -> None:
    """Until every replica answered and every submitted run is collected: handle whichever finishes next."""
    in_flight: dict = {}
    while loading or in_flight:
        (ref,), _ = ray.wait(list(loading) + list(in_flight), num_returns=1)
        if ref in loading:
            grp, index = loading.pop(ref)
            in_flight.update(_on_fingerprint(ray, ref, grp, index, store, study_id, summary, on_event, keeper))
        else:
            state, grp, index = in_flight.pop(ref)
            _collect(ray, ref, state, grp, index, store, summary, on_event, keeper)
        if len(grp.fingerprints) == len(grp.replicas) and not grp.queue:
            _kill_group(ray, grp)
