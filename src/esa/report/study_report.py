"""The study report: ``report.md`` + a self-contained ``report.html``, computed only from a results database.

``esa report study.db --out DIR`` reads the ``runs`` and ``studies`` tables of an ESA results database
(:mod:`esa.store`), opened read-only, and builds one list of blocks (:mod:`esa.report.html`) that both files
render. Order:

1. **Warnings** first: sanity-guard warnings, non-finite losses, collapsed perturbations, failed runs, and —
   when perturbation runs exist — target effects that are not significant (Holm-adjusted Wilcoxon p ≥
   :data:`ALPHA`, or undefined).
2. **Executive summary of baselines**: per model × dataset × context × method, mean ± 95 % CI across seeds
   (t-based, :func:`esa.stats.aggregate_seeds`; no CI from one seed; "seed-invariant" when the whole split was
   scored, so seeds cannot change the number). Perplexity is aggregated on the log scale: the geometric mean
   across seeds, with the t-interval of log perplexity exponentiated (asymmetric, always positive).
3. One section per other run kind present, as the kind declares it (``RunKind.report``, :mod:`esa.kinds`):
   e.g. sensitivity (:mod:`esa.report.study_sensitivity`, which also reads the runs' ranking artifacts), causal
   validation (:mod:`esa.report.study_perturbation`, :mod:`esa.report.study_causal`), scaling
   (:mod:`esa.report.study_scaling`); a kind this ESA does not know still gets a generic table of its scalar
   metrics, so no stored run is ever hidden. This module never imports a kind: kinds import it.

Every sentence is formatted from stored numbers. A run's metrics are JSON with non-finite numbers stored as
"nan"/"inf" strings (decoded with :func:`esa.core.files.as_float`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from esa.core.errors import EsaError
from esa import kinds
from esa.report.html import Block, Bullets, Figure, Heading, Paragraph, Table, to_html, to_markdown
from esa.core.files import as_float
from esa.stats import SeedAggregate, few_windows_caveat
from esa.store import SQLITE_MAGIC, Reader, StoredRun

ALPHA = 0.05  # significance level of the "not significant" warnings (Holm-adjusted p-values)
Run = StoredRun  # a stored run as reports read it (esa.store.reader)


# ----------------------------------------------------------------------------------------------- reading
def is_sqlite_file(path: Path) -> bool:
    """True when ``path`` is a file that starts with SQLite's magic header."""
    if not Path(path).is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


def load_runs(db: Path, study: str | None = None) -> tuple[list[Run], list[str]]:
    """(runs, study names) of ``db`` (read-only); with ``study`` only that study's runs (by name or id)."""
    with Reader(db) as reader:
        runs, names = reader.runs(study), [name for name, _ in reader.studies()]
    if study is not None and not runs:
        raise EsaError(f"no runs of study {study!r} in {db}; studies there: {', '.join(names) or 'none'}")
    return runs, ([study] if study is not None else names)


# ------------------------------------------------------------------------------------------- formatting
def fnum(x: float, digits: int = 3) -> str:
    """Fixed-point number; ``nan``/``inf`` spelled out (a collapse must stay visible)."""
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def fbound(x: float, digits: int = 3) -> str:
    """A bound of a positive quantity: fixed-point, or ``digits + 1`` significant digits where fixed-point
    would round it to 0 or run long (a CI of perplexity from few, scattered seeds spans decades)."""
    return fnum(x, digits) if not math.isfinite(x) or 10**-digits <= abs(x) < 1e9 else f"{x:.{digits + 1}g}"


def fmt_agg(agg: SeedAggregate, digits: int = 3) -> str:
    """``mean ± half-width`` of the 95 % CI; the bare mean when no CI exists (one seed, non-finite seeds).

    A log-scale aggregate (perplexity) shows its geometric mean alone: its CI is asymmetric, so a half-width
    would misstate it — give it as ``[low, high]``.
    """
    if math.isnan(agg.ci_low) or agg.scale == "log":
        return fnum(agg.mean, digits)
    return f"{fnum(agg.mean, digits)} ± {fnum((agg.ci_high - agg.ci_low) / 2, digits)}"


# config keys that tell runs of one kind apart, most telling first (the kinds' run configs)
LABEL_KEYS = ("target", "task", "scorer", "op", "k", "bottom", "mode", "context_len", "seed")


def run_label(run: Run) -> str:
    c = run.config
    if run.kind == "baseline":
        return f"{run.model_name} / {c.get('dataset')} / ctx {c.get('context_len')} / seed {c.get('seed')}"
    extra = [f"{k}={c[k]}" for k in LABEL_KEYS if _scalar(c.get(k)) and c.get(k) is not False][:5]
    return f"{run.kind} {run.model_name} ({', '.join(extra)})" if extra else f"{run.kind} {run.model_name}"


def _scalar(v) -> bool:
    return isinstance(v, (str, int, float, bool)) and len(str(v)) <= 60


# --------------------------------------------------------------------------------------------- warnings
def _comparisons(run: Run) -> list[dict]:
    """A perturbation run's paired comparisons: stored as {name: stats} (or a list of stats with names)."""
    comps = run.metrics.get("comparisons")
    if isinstance(comps, dict):
        return [{"name": name, **c} for name, c in comps.items() if isinstance(c, dict)]
    return [c for c in comps if isinstance(c, dict)] if isinstance(comps, list) else []


def _p_holm(comp: dict) -> float:
    return as_float(comp.get("p_wilcoxon_holm", comp.get("p_wilcoxon")))


def run_warnings(run: Run) -> list[str]:
    """The warnings one run contributes (empty for a clean run)."""
    label, m = run_label(run), run.metrics
    if run.status != "completed":
        return [f"{label}: run failed — {run.error or 'no error message stored'}"]
    out = [f"{label}: {w}" for w in (m.get("sanity") or {}).get("warnings", []) if "non-finite" not in w]
    n_bad = int(m.get("n_nonfinite_windows") or 0)
    hook = kinds.get(run.kind).warnings if run.kind in kinds.names() else None
    if n_bad:
        out.append(f"{label}: {n_bad} window(s) with non-finite loss; perplexity {fnum(as_float(m.get('perplexity')))}")
    out += [f"{label}: {w}" for w in (hook(run) if hook else [])]
    if caveat := few_windows_caveat(_comparisons(run)):
        out.append(f"{label}: {caveat}")
    for c in _comparisons(run):
        if c.get("collapsed"):
            out.append(f"{label}: '{c.get('name')}' collapsed the model (perturbed perplexity "
                       f"{fnum(as_float(c.get('ppl_perturbed')))})")
        elif str(c.get("name", "")).startswith("target") and not _p_holm(c) < ALPHA:
            out.append(f"{label}: '{c.get('name')}' is not significant (Holm-adjusted Wilcoxon p = "
                       f"{_p_holm(c):.3g} ≥ {ALPHA})")
    return out


def version_warnings(runs: list[Run]) -> list[str]:
    """One warning per kind whose rows were made by another kind version than this ESA makes (rows stored
    before versions were recorded count as version 1)."""
    out = []
    for name in sorted({r.kind for r in runs} & set(kinds.names())):
        versions = Counter(int(r.config.get("kind_version", 1)) for r in runs if r.kind == name)
        current = kinds.get(name).version
        if set(versions) != {current}:
            made = ", ".join(f"{n} by version {v}" for v, n in sorted(versions.items()))
            out.append(f"{name} runs: {made}, but this ESA makes version {current} — rows of another version may "
                       f"mean something else (see esa/kinds/{name}.py); rerun the study into a new database")
    return out


def warnings_section(runs: list[Run]) -> list[Block]:
    found = version_warnings(runs) + [w for run in runs for w in run_warnings(run)]
    if found:
        return [Heading(2, f"Warnings ({len(found)})"), Bullets(tuple(found), callout=True)]
    return [Heading(2, "Warnings (0)"),
            Paragraph(f"None of the {len(runs)} run(s) failed, had non-finite losses, collapsed, tripped the "
                      "sanity guard or showed a non-significant target effect.")]


# --------------------------------------------------------------------------------------------- baselines


# ------------------------------------------------------------------------------ any other kind of run
def _flat(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar leaves of a metrics dict as (dotted key, formatted value); long lists are skipped."""
    out = []
    for k, v in sorted(d.items()):
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat(v, key + ".")
        elif isinstance(v, list) and len(v) <= 8 and all(_scalar(x) for x in v):
            out.append((key, ", ".join(map(str, v))))
        elif isinstance(v, float) or v in ("nan", "inf", "-inf"):
            out.append((key, f"{as_float(v):.6g}"))
        elif _scalar(v):
            out.append((key, str(v)))
    return out


def generic_section(runs: list[Run]) -> list[Block]:
    """Every scalar metric of every completed run, one row per (run, metric)."""
    done = [r for r in runs if r.status == "completed"]
    rows = tuple((run_label(r), k, v) for r in done for k, v in _flat(r.metrics))
    text = f"{len(done)} completed run(s) of {len(runs)}; every scalar metric stored for them:"
    return [Paragraph(text), Table(("run", "metric", "value"), rows)] if rows else [Paragraph(text + " none.")]


# ------------------------------------------------------------------------------------- sections per kind
def kind_sections(runs: list[Run]) -> list[Block]:
    """One section per run kind present, as its kind declares it (:attr:`esa.kinds.base.RunKind.report`), in
    report order; a kind this ESA does not know still gets a generic table of its scalar metrics, so no stored
    run is ever hidden."""
    present = list(dict.fromkeys(r.kind for r in runs))
    known = [k for k in kinds.ordered() if k.name in present]
    blocks: list[Block] = []
    for kind in sorted(known, key=lambda k: k.report.order):
        section = kind.report
        blocks += ([Heading(2, section.title)] if section.title else []) + section.render(
            [r for r in runs if r.kind == kind.name])
    for name in (k for k in present if k not in kinds.names()):
        blocks += [Heading(2, f"Runs of kind {name!r}"), *generic_section([r for r in runs if r.kind == name])]
    return blocks


# ------------------------------------------------------------------------------------------------ writing
def build_report(runs: list[Run], db: Path, studies: list[str]) -> list[Block]:
    kinds = {k: sum(r.kind == k for r in runs) for k in dict.fromkeys(r.kind for r in runs)}
    failed = sum(r.status != "completed" for r in runs)
    overview = (f"Database {Path(db).name}: {len(runs)} run(s) ({len(runs) - failed} completed, {failed} failed) "
                f"of {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} ({', '.join(studies) or 'none'}); "
                f"run kinds: {', '.join(f'{k} ({n})' for k, n in kinds.items()) or 'none'}.")
    return [Heading(1, "ESA study report"), Paragraph(overview), *warnings_section(runs), *kind_sections(runs)]


def write_study_report(db: str | Path, out_dir: str | Path, study: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ its PNGs) and a self-contained ``report.html`` into ``out_dir``."""
    runs, studies = load_runs(Path(db), study)
    if not runs:
        raise EsaError(f"{db} holds no runs yet; execute a study first: `esa run STUDY.yaml --db {db}`")
    blocks = build_report(runs, Path(db), studies)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fig in (b for b in blocks if isinstance(b, Figure)):
        (out / fig.name).write_bytes(fig.png)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks, {}), encoding="utf-8")
    page.write_text(to_html(blocks, f"ESA study report — {Path(db).name}"), encoding="utf-8")
    return md, page
