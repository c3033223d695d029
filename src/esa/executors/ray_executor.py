"""Ray executor: one actor per model group on a Ray cluster; only the driver writes the database.

Each model group becomes one Ray actor that loads the model once (requesting ``num_gpus`` GPUs — 0 on a
CPU cluster) and executes that group's pending runs one after another. The driver collects every finished
run as soon as it returns (``ray.wait``) and commits it — artifacts, then one transaction — so a crash of
the driver or a worker loses only the runs in flight. Workers never touch the database or the artifact
directory: results travel back in memory, so workers need no shared filesystem with the driver.

An actor rather than a single task per group: it keeps the load-once grouping but lets each run's result
reach the driver (and the database) as soon as it is done instead of when the whole group is.

Ray is optional: ``pip install 'esa[cluster]'``.
"""

from __future__ import annotations

import logging

from esa.core.errors import EsaError
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


class ModelWorker:
    """Runs on a Ray worker: loads one model once, then executes runs of that model on request."""

    def __init__(self, spec) -> None:
        from esa.models import load_model
        from esa.core.provenance import provenance

        self.lm = load_model(spec)
        self.prov = provenance(self.lm.device)
        from esa.kinds.base import RunContext

        self.ctx = RunContext()  # rankings made here stay here for the perturbation runs that follow

    def fingerprint(self) -> dict:
        return self.lm.fingerprint.to_dict()

    def add_rankings(self, rankings: dict) -> None:
        """Rankings of sensitivity runs completed before (read by the driver from the store)."""
        self.ctx.rankings.update(rankings)

    def run(self, run, rid: str):
        from esa.executors.core import execute_run

        return execute_run(self.lm, run, rid, self.ctx, self.prov)


def _start_groups(ray, runs: list, store: Store, study_id: str, summary: Summary, on_event: EventFn,
                  num_gpus: float, num_cpus: float) -> dict:
    """One actor per model group that still has work; returns {fingerprint ref: _Group}."""
    actor_cls = ray.remote(ModelWorker).options(num_gpus=num_gpus, num_cpus=num_cpus)
    started = {}
    for spec, group in group_by_model(runs):
        if known_complete(store, spec, group, study_id):
            summary.skipped += len(group)
            on_event("skip_group", model=spec.name, runs=len(group))
            continue
        actor = actor_cls.remote(spec)
        started[actor.fingerprint.remote()] = _Group(spec, group, actor)
    return started


class _Group:
    """A model group on the cluster: its actor and how many of its runs are still in flight."""

    def __init__(self, spec, runs: list, actor) -> None:
        self.spec, self.runs, self.actor, self.in_flight = spec, runs, actor, 0


def _on_fingerprint(ray, ref, grp: _Group, store: Store, study_id: str, summary: Summary,
                    on_event: EventFn, keeper: LeaseKeeper) -> dict:
    """The group's model is loaded: skip its completed runs and submit the rest; returns {ref: (run, group)}."""

    try:
        fingerprint = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 — the actor's constructor failed (model not loadable there)
        cause = getattr(exc, "cause", None) or exc
        summary.load_errors.append((grp.spec.name, str(cause)))
        on_event("load_error", model=grp.spec.name, error=str(cause))
        return {}
    key = model_key(grp.spec)
    if key:
        store.remember_model(key, fingerprint)
    ids = [run_key(r, fingerprint) for r in grp.runs]
    store.link_runs(study_id, ids)
    done = store.completed(ids)
    summary.skipped += len(done)
    on_event("group", model=grp.spec.name, pending=len(ids) - len(done), completed=len(done))
    pending = [r for r, rid in zip(grp.runs, ids) if rid not in done]
    grp.actor.add_rankings.remote(load_dependencies(store, pending, fingerprint, {}))  # actor calls run in order
    submitted = {}
    for run, rid in ((r, i) for r, i in zip(grp.runs, ids) if i not in done):
        if not store.claim(rid, keeper.holder):  # another driver is computing it
            summary.elsewhere.append(run.label())
            on_event("elsewhere", label=run.label(), run_id=rid)
            continue
        keeper.add(rid)
        submitted[grp.actor.run.remote(run, rid)] = (run, grp, rid)
    grp.in_flight = len(submitted)
    return submitted


def _collect(ray, ref, run, rid: str, store: Store, summary: Summary, on_event: EventFn,
             keeper: LeaseKeeper) -> None:
    """Commit one finished run (artifacts, then its row, dropping our claim); a lost worker is reported, not
    recorded, and its claim released so a rerun (or another driver) redoes it."""
    keeper.discard(rid)
    try:
        record = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 — the worker died (OOM kill, node lost): no row, rerun redoes it
        store.release(rid, keeper.holder)
        summary.failed.append((run.label(), f"worker lost: {exc}"))
        return
    commit(store, record, keeper.holder)
    summary.add(record, run.label())
    on_event("run", record=record, label=run.label(),
             done=summary.skipped + summary.completed + len(summary.failed), total=summary.total)


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 — already gone
        pass


def run_ray(runs: list, store: Store, study_id: str, on_event: EventFn, address: str | None = None,
            num_gpus: float = 0.0, num_cpus: float = 1.0) -> Summary:
    """Execute ``runs`` on a Ray cluster (``address=None`` starts or joins a local one).

    An actor is killed as soon as its group is finished, so its GPU goes to a group still waiting.
    """
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    summary = Summary(total=len(runs))
    loading = _start_groups(ray, runs, store, study_id, summary, on_event, num_gpus, num_cpus)
    groups = list(loading.values())
    in_flight: dict = {}
    keeper = LeaseKeeper(store.path, new_holder())  # renews the claims of every run in flight
    try:
        with keeper:
            _drive(ray, loading, in_flight, store, study_id, summary, on_event, keeper)
    finally:
        for rid in keeper.held():
            store.release(rid, keeper.holder)
        for grp in groups:
            _kill(ray, grp.actor)
    return summary


def _drive(ray, loading: dict, in_flight: dict, store: Store, study_id: str, summary: Summary, on_event: EventFn,
           keeper: LeaseKeeper) -> None:
    """Until every group is loaded and every submitted run collected: handle whichever finishes next."""
    while loading or in_flight:
        (ref,), _ = ray.wait(list(loading) + list(in_flight), num_returns=1)
        if ref in loading:
            grp = loading.pop(ref)
            in_flight.update(_on_fingerprint(ray, ref, grp, store, study_id, summary, on_event, keeper))
        else:
            run, grp, rid = in_flight.pop(ref)
            grp.in_flight -= 1
            _collect(ray, ref, run, rid, store, summary, on_event, keeper)
        if grp.in_flight == 0:
            _kill(ray, grp.actor)
