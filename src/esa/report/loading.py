"""Read baseline run directories back into flat rows for reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from esa.errors import EsaError
from esa.runs import as_float, read_json


@dataclass(frozen=True)
class BaselineRun:
    path: Path
    model: str  # model id as requested
    n_params: int
    results: dict
    manifest: dict


def load_runs(paths: list[Path]) -> list[BaselineRun]:
    """Load every run dir (a dir with results.json, or a parent holding several)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.glob("*/results.json")))
        else:
            raise EsaError(f"{p} is not a run directory (no results.json); pass directories written by "
                           "`esa baseline`")
    if not found:
        raise EsaError(f"no results.json found under {', '.join(map(str, paths))}; run `esa baseline` first")
    runs = []
    for p in found:
        results = read_json(p / "results.json")
        if results.get("schema") != "esa.baseline.v1":
            raise EsaError(f"{p}/results.json is not an ESA baseline result (schema {results.get('schema')!r})")
        runs.append(BaselineRun(p, results["model"]["model_id"], results["model"]["n_params"], results,
                                read_json(p / "manifest.json")))
    return runs


def entry_rows(runs: list[BaselineRun]) -> list[dict]:
    """One flat row per evaluated cell, floats decoded."""
    rows = []
    for run in runs:
        for e in run.results["entries"]:
            m = e["metrics"]
            rows.append({"model": run.model, "dataset": e["dataset"], "context_len": e["context_len"],
                         "method": e["method"], "seed": e["seed"], "seed_invariant": e["seed_invariant"],
                         "long_context": e["long_context"], "perplexity": as_float(m["perplexity"]),
                         "token_accuracy": as_float(m["token_accuracy"]),
                         "bits_per_byte": as_float(m["bits_per_byte"]), "scored_tokens": m["scored_tokens"],
                         "tokens_per_second": m["tokens_per_second"], "n_nonfinite": m["n_nonfinite_windows"],
                         "warnings": e["warnings"]})
    return rows
