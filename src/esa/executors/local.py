"""Local executor: one process runs every pending run, model by model, loading each model once.

Drivers may share a database: each run is claimed (:meth:`esa.store.Store.claim`, a lease renewed while the run
executes and freed when its holder dies) just before it runs, so a run another driver is computing is left to
it — counted in :attr:`Summary.elsewhere`, never computed twice."""

from __future__ import annotations

import logging

from esa.core.errors import EsaError
from esa.executors.core import (EventFn, RunContext, Summary, commit, execute_run, group_by_model,
                                known_complete, load_dependencies, model_key, release, run_key)
from esa.models import ModelSpec, load_model
from esa.core.provenance import provenance
from esa.store import Store, new_holder

log = logging.getLogger(__name__)


def _run_group(spec: ModelSpec, runs: list, store: Store, study_id: str, summary: Summary,
               on_event: EventFn, holder: str) -> None:
    """Load ``spec`` once, then execute and commit each of its runs that is not completed yet."""
    try:
        lm = load_model(spec)
    except EsaError as exc:
        summary.load_errors.append((spec.name, str(exc)))
        on_event("load_error", model=spec.name, error=str(exc))
        return
    fingerprint = lm.fingerprint.to_dict()
    key = model_key(spec)
    if key:
        store.remember_model(key, fingerprint)
    ids = [run_key(r, fingerprint) for r in runs]
    store.link_runs(study_id, ids)
    done = store.completed(ids)
    summary.skipped += len(done)
    on_event("group", model=spec.name, pending=len(ids) - len(done), completed=len(done))
    prov = provenance(lm.device, lm.model)
    ctx = RunContext()
    pending = [r for r, rid in zip(runs, ids) if rid not in done]
    ctx.rankings.update(load_dependencies(store, pending, fingerprint, ctx.rankings))
    for run, rid in zip(runs, ids):
        if rid in done:
            continue
        if not store.claim(rid, holder):  # another driver is computing it (or just finished it)
            summary.elsewhere.append(run.label())
            on_event("elsewhere", label=run.label(), run_id=rid)
            continue
        on_event("start", label=run.label(), index=summary.skipped + summary.completed + len(summary.failed) + 1,
                 total=summary.total)
        with store.holding(rid, holder):
            record = execute_run(lm, run, rid, ctx, prov)
            commit(store, record, holder)
        summary.add(record, run.label())
        on_event("run", record=record, label=run.label(), done=summary.skipped + summary.completed
                 + len(summary.failed), total=summary.total)
    del lm
    release()


def run_local(runs: list, store: Store, study_id: str, on_event: EventFn) -> Summary:
    """Execute ``runs`` in this process; each finished run is committed before the next one starts."""
    summary, holder = Summary(total=len(runs)), new_holder()
    for spec, group in group_by_model(runs):
        if known_complete(store, spec, group, study_id):
            summary.skipped += len(group)
            on_event("skip_group", model=spec.name, runs=len(group))
            continue
        _run_group(spec, group, store, study_id, summary, on_event, holder)
    return summary
