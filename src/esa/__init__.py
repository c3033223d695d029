"""ESA — Extreme Sensitivity Analysis of causal language models.

The Python API (README, "Python API"): ``import esa`` exposes the functions the ``esa`` commands call — load a
model, cut and score windows, find super weights, score and rank weights, perturb them inside a restoring
context manager, compare paired window losses, run a study into a results database and read it back as a
DataFrame. :data:`PUBLIC` names each one and the module that defines it; a name is imported on first use, so
``import esa`` (and ``esa --version``) loads no torch, pandas or matplotlib. The convenience functions of
:mod:`esa.api` wrap the calls where the underlying ones take a config object; everything else is the library's
own object, not a copy.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name → module defining it. Imported by name (importlib), like the run-kind registry (esa.kinds): the package
# root never imports the modules that import it back, so no import cycle can form (tests/architecture).
PUBLIC: dict[str, str] = {
    # convenience functions (esa.api)
    **{name: "esa.api" for name in ("load", "windows", "score", "perplexity", "super_weights", "rank", "run",
                                    "baseline", "results", "arrays", "write_report")},
    # models
    "ModelSpec": "esa.models", "LoadedModel": "esa.models", "load_model": "esa.models",
    # data and scoring
    "load_corpus": "esa.data.corpora", "make_windows": "esa.data.windows", "select_windows": "esa.data.windows",
    "evaluate_windows": "esa.evals.perplexity", "perplexity_metrics": "esa.evals.perplexity",
    # sensitivity: scorers, rankings, super weights
    "SCORERS": "esa.sensitivity.scorers", "select_params": "esa.sensitivity.scorers",
    "score_parameters": "esa.sensitivity.scorers",
    "CalibrationSpec": "esa.sensitivity.calibration", "calibration_batches": "esa.sensitivity.calibration",
    "score_and_rank": "esa.sensitivity.ranking", "RankingResult": "esa.sensitivity.ranking",
    "find_super_weights": "esa.sensitivity.superweights", "SuperWeightReport": "esa.sensitivity.superweights",
    "Thresholds": "esa.sensitivity.superweights",
    # perturbations: the restoring context manager, ops and targets
    **{name: "esa.perturb" for name in ("perturbed", "make_op", "parse_op", "OPS", "TargetSet", "from_coordinates",
                                        "from_ranking", "from_glob", "random_k", "parse_targets")},
    # damage prediction
    "curvature": "esa.predict.taylor", "edit_delta": "esa.predict.taylor", "vulnerability_map": "esa.predict.vmap",
    # statistics
    "paired_compare": "esa.stats", "aggregate_seeds": "esa.stats",
    # studies, execution, results
    "Study": "esa.study", "parse_study": "esa.study", "load_study": "esa.study", "expand": "esa.study",
    "run_study": "esa.executors", "plan": "esa.executors", "run_one_off": "esa.executors.one_off",
    "Reader": "esa.store", "StoredRun": "esa.store",
    "EsaError": "esa.core.errors",
}

__all__ = ["PUBLIC", "__version__", *PUBLIC]


def __getattr__(name: str):
    """Import a public name on first use (PEP 562) and keep it, so later lookups are plain attributes."""
    if name not in PUBLIC:
        import difflib

        close = difflib.get_close_matches(name, list(PUBLIC), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; esa.PUBLIC lists the {len(PUBLIC)} names"
        raise AttributeError(f"module 'esa' has no attribute {name!r}{hint}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *PUBLIC})
