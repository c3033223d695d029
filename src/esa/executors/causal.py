"""Executing dose-response and bit-scan runs (:mod:`esa.study_causal`) on a loaded model.

A runner is ``(lm, run, ctx: RunContext) -> (metrics, arrays)``, as in :mod:`esa.executors.sections`; the
arrays become the run's ``per_window.npz``. Weights change only inside the protocols'
:func:`esa.perturb.context.perturbed` (bit-exact restore).

* **dose_response** — :func:`~esa.perturb.protocols.dose_experiment` with :func:`dose_config`. Metrics:
  ``parameter``, ``op``; ``rows`` — per value, in the study's order: ``value``, ``op`` and the names of its
  ``target`` and ``random_k`` comparisons, each arm's seed spread, and how many elements the op changed;
  ``comparisons`` — {name: paired statistics vs the unperturbed model (mean ΔNLL, bootstrap-t CI, PPL ratio,
  Wilcoxon/t-test p with Holm and BH across the run, collapsed)}, named ``"<arm> @ <parameter>=<value>"``;
  the targets (kind, size, k, super-weight candidates), the baseline, notes. Arrays: window_index,
  n_scored, baseline_nll (W,), ``<arm>_nll__<i>`` (S, W) per value index i, ``delta__<comparison>`` (W,).
* **bitscan** — :func:`~esa.perturb.protocols.bitscan_experiment` with :func:`bitscan_config`. Metrics:
  ``weights`` (the scanned elements and their values), ``bits``, ``comparisons`` — {flip label: ΔNLL stats of
  that single flip, with ``weight``, ``bit`` and ``value_after``}, ``greedy`` — the collapse search (steps
  with the PPL after each added flip, ``n_flips``, whether it is the exact minimum), the baseline, notes.
  Arrays: base arrays, ``grid_mean_delta_nll`` (N, bits), ``flip_nll`` (F, W).

A ranking target's ranking comes from the sensitivity run it depends on (the :class:`RunContext`, filled by
this process or from the store); temporary ranking file names in stored text are replaced by that run's id.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np

from esa.executors.sections import write_dependency_ranking
from esa.models import LoadedModel
from esa.perturb.protocols.bitscan import greedy_verdict


def _targets(run, ranking_file: str | None) -> str:
    return run.spec if run.spec is not None else f"topk:{ranking_file}:{run.k}"


def _eval(run, collapse_ppl: float | None = None):
    from esa.perturb.protocols import EvalConfig

    data = EvalConfig(run.dataset, run.context_len, run.max_eval_tokens, run.seed, run.batch_tokens)
    return data if collapse_ppl is None else dataclasses.replace(data, collapse_ppl=collapse_ppl)


def dose_config(run, ranking_file: str | None = None):
    """The :class:`DoseConfig` of a dose-response run, given its ranking file (ranking targets)."""
    from esa.perturb.protocols import DoseConfig

    return DoseConfig(_targets(run, ranking_file), run.op, tuple(run.values), run.control_seeds,
                      _eval(run, run.collapse_ppl))


def bitscan_config(run, ranking_file: str | None = None):
    """The :class:`BitscanConfig` of a bit-scan run, given its ranking file (ranking targets)."""
    from esa.perturb.protocols import BitscanConfig

    return BitscanConfig(_targets(run, ranking_file), run.top_n, tuple(run.bits), run.max_flips, run.greedy_pool,
                         _eval(run, run.collapse_ppl))


def _scrub(obj, files: dict[str, str]):
    """``obj`` with every temporary ranking path replaced by ``<ranking of run ID>`` (recursively)."""
    if isinstance(obj, str):
        for path, rid in files.items():
            obj = obj.replace(path, f"<ranking of run {rid}>")
        return obj
    if isinstance(obj, dict):
        return {k: _scrub(v, files) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, files) for v in obj]
    return obj


def _common(doc: dict) -> dict:
    data = {k: v for k, v in doc["data"].items() if k not in ("window_indices", "calibration_indices")}
    targets = {k: v for k, v in doc["targets"].items() if k not in ("spec", "ranking", "elements")}
    return {"baseline_perplexity": doc["baseline"]["perplexity"], "baseline": doc["baseline"], "data": data,
            "targets": targets, "notes": doc["notes"], "wall_seconds": doc["wall_seconds"]}


def _dose_metrics(doc: dict) -> dict:
    comps, rows = {}, []
    for r in doc["rows"]:  # r[arm]: that arm's comparison, Holm/BH-adjusted across the whole run
        row = {"value": r["value"], "op": r["op"]}
        for arm in ("target", "random_k"):
            if arm in r:
                comps[r[arm]["name"]] = r[arm]
                row[arm] = r[arm]["name"]
                row[f"{arm}_seeds"] = r[f"{arm}_seeds"]
                row[f"{arm}_n_changed"] = [t["n_changed"] for t in r[f"{arm}_trials"]]
        rows.append(row)
    return {"parameter": doc["parameter"], "op": doc["config"]["op"], "rows": rows, "comparisons": comps,
            "n_elements": doc["targets"]["n_elements"], **_common(doc)}


def _bitscan_metrics(doc: dict) -> dict:
    comps = {c["label"]: {**{k: v for k, v in c.items() if k != "label"}, "name": c["label"]} for c in doc["cells"]}
    weights = [{k: w[k] for k in ("param", "row", "col", "flat", "value", "label") if k in w}
               for w in doc["weights"]]
    return {"weights": weights, "bits": doc["bits"], "comparisons": comps, "greedy": doc["greedy"],
            **_common(doc)}


def _execute(lm: LoadedModel, run, ctx, experiment, make_config, to_metrics) -> tuple[dict, dict[str, np.ndarray]]:
    from esa.executors import resolved_config

    fingerprint = lm.fingerprint.to_dict()
    deps = resolved_config(run, fingerprint).get("depends_on", {})
    with tempfile.TemporaryDirectory(prefix="esa-causal-") as tmp:
        ranking_file = write_dependency_ranking(run, ctx, deps, Path(tmp), fingerprint)
        doc, arrays = experiment(lm, make_config(run, ranking_file))
    files = {ranking_file: deps["ranking"]} if ranking_file else {}
    return _scrub(to_metrics(doc), files), arrays


def execute_dose_response(lm: LoadedModel, run, ctx) -> tuple[dict, dict[str, np.ndarray]]:
    """Protocol 2 (target and random_k arms at each op strength) for one target, k and op."""
    from esa.perturb.protocols import dose_experiment

    return _execute(lm, run, ctx, dose_experiment, dose_config, _dose_metrics)


def execute_bitscan(lm: LoadedModel, run, ctx) -> tuple[dict, dict[str, np.ndarray]]:
    """Protocol 3 (single bit flips of the top weights, then the greedy collapse search) for one target."""
    from esa.perturb.protocols import bitscan_experiment

    return _execute(lm, run, ctx, bitscan_experiment, bitscan_config, _bitscan_metrics)


# ------------------------------------------------------------------------------------------ one-line summary
def severity(comparison: dict) -> float:
    """Mean ΔNLL for ranking "most damaging", a non-finite one (a collapse) counted as +inf."""
    from esa.runs import as_float

    x = as_float(comparison.get("mean_delta_nll"))
    return x if x == x and x != -math.inf else math.inf


def causal_summary(record) -> str:
    """What `esa run` prints for a finished dose-response or bit-scan run."""
    from esa.runs import as_float

    m = record.metrics
    if record.kind == "dose_response":
        worst = max(m["rows"], key=lambda r: severity(m["comparisons"][r["target"]]))
        c = m["comparisons"][worst["target"]]
        ctrl = m["comparisons"].get(worst.get("random_k") or "", {})
        return (f"largest target ΔNLL {as_float(c['mean_delta_nll']):.4g} at {m['parameter']}={worst['value']} "
                f"(ppl {as_float(m['baseline_perplexity']):.4g} → {as_float(c['ppl_perturbed']):.4g})"
                + (f", random_k {as_float(ctrl['mean_delta_nll']):.4g}" if ctrl else ""))
    g = m["greedy"]
    worst = max(m["comparisons"].values(), key=severity)
    head = f"worst single flip ΔNLL {as_float(worst['mean_delta_nll']):.4g} ({worst['name']}); "
    return head + greedy_verdict(g)


# ------------------------------------------------------------------------------------------- cost estimate
def causal_cost(run) -> tuple[int | None, float]:
    """(tokens, forward-equivalent passes) of a dose-response or bit-scan run, for `esa plan` (an upper bound:
    the prefix cache re-runs only the layers from the first perturbed one)."""
    from esa.perturb.protocols import STOCHASTIC_OPS

    if run.kind == "dose_response":
        target = len(run.control_seeds) if run.op.partition(":")[0] in STOCHASTIC_OPS and run.control_seeds else 1
        return run.max_eval_tokens, 1.0 + len(run.values) * (target + len(run.control_seeds))
    singles = run.top_n * len(run.bits)
    pool = min(run.greedy_pool, singles)
    greedy = sum(pool - step for step in range(1, min(run.max_flips, pool)))  # steps after the first
    return run.max_eval_tokens, 1.0 + singles + greedy
