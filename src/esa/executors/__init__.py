"""Executors: run a study's pending runs locally or on a Ray cluster, writing each result to the store.

:func:`run_study` is the one entry point (the CLI's ``esa run``, every command's one-off study, the Python
API). The protocol every executor follows, run identity, commits and cost estimates live in
:mod:`esa.executors.core`; :mod:`esa.executors.local` and :mod:`esa.executors.ray_executor` are the executors.
"""

from __future__ import annotations

from pathlib import Path

from esa.core.errors import EsaError
from esa.executors.core import (EventFn, PlanRow, RunContext, Summary, commit, execute_run, group_by_model,
                                known_complete, load_dependencies, model_identity, model_key, plan, quiet,
                                release, resolved_config, run_id, run_key, summary_line)
from esa.executors.local import run_local
from esa.executors.ray_executor import run_ray
from esa.core.registry import suggest
from esa.store import Store
from esa.study import expand

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS", "EventFn", "PlanRow", "RunContext", "Summary", "commit", "execute_run", "group_by_model",
           "known_complete", "load_dependencies", "model_identity", "model_key", "plan", "release",
           "resolved_config", "run_id", "run_key", "run_study", "summary_line"]


def run_study(study, db: str | Path, executor: str = "local", source_path: str | None = None,
              on_event: EventFn = quiet, **options) -> Summary:
    """Expand ``study``, record it in the database at ``db`` and execute its pending runs.

    ``options`` go to the executor (Ray: ``address``, ``num_gpus``, ``num_cpus``, ``replicas``).
    """
    if executor not in EXECUTORS:
        raise EsaError(suggest(executor, list(EXECUTORS), "executor"))
    runs = expand(study)
    with Store(db) as store:
        study_id = store.record_study(study.name, study.to_dict(), source_path)
        if executor == "local":
            return run_local(runs, store, study_id, on_event)
        return run_ray(runs, store, study_id, on_event, **options)
