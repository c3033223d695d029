"""The Python API: what the ``esa`` commands compute, from a script or a notebook.

``import esa`` exposes the functions below and the library objects under them — ``esa.load_model``,
``esa.find_super_weights``, ``esa.perturbed``, ``esa.paired_compare``, ``esa.Reader`` … (``esa.PUBLIC`` maps every
name to the module that defines it) — each imported on first use, so ``import esa`` stays instant. The functions
here add no logic of their own: each one makes the calls the matching command or run kind makes, where doing
that by hand would take several imports and a config object. Results of :func:`run` and :func:`baseline` go
through the one engine (:mod:`esa.study` → :mod:`esa.executors` → :mod:`esa.store`), so a study run from Python
is the same rows, with the same run ids, as ``esa run`` would store; :func:`results` reads them as a DataFrame.

A super-weight hunt (README, "Python API", has a longer one that ``tests/test_api.py`` runs)::

    import esa
    lm = esa.load("smollm2-135m")
    ws = esa.windows(lm, "python-docs", context_len=128, max_eval_tokens=2048, seed=1)
    base = esa.score(lm, ws)  # per-window NLL of the unmodified model
    found = esa.super_weights(lm)  # one forward pass over 4 calibration windows
    targets = esa.from_coordinates(lm.model, [(w.param_name, w.row, w.col) for w in found.candidates])
    with esa.perturbed(lm.model, targets, esa.make_op("zero")):  # weights restored bit-exactly on exit
        zeroed = esa.score(lm, ws)
    print(esa.paired_compare(base.nll, zeroed.nll, base.n_scored).mean_delta_nll)  # nats/token
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from esa.core.errors import EsaError
from esa.data.windows import Window
from esa.evals.perplexity import WindowScores
from esa.executors.core import EventFn, Summary, quiet
from esa.models import LoadedModel, ModelSpec
from esa.sensitivity.ranking import RankingResult
from esa.sensitivity.superweights import SuperWeightReport, Thresholds
from esa.study import Study

__all__ = ["arrays", "baseline", "load", "perplexity", "rank", "results", "run", "score", "super_weights",
           "windows", "write_report"]


# ---- models and windows ----------------------------------------------------------------------------------

def load(model: str | ModelSpec = "smollm2-135m", *, dtype: str = "fp32", device: str = "auto",
         revision: str | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
         attention: str = "auto") -> LoadedModel:
    """Load a model as every command does (:func:`esa.models.load_model`): in eval mode, with its fingerprint.

    Args:
        model: a suite alias (``esa check-models``; ``smollm2-135m`` is embedded and offline), a hub id, a local
            directory, a ``.gguf`` file, or a ready :class:`~esa.models.ModelSpec` (the other arguments are then
            ignored).
        dtype: ``fp32`` | ``bf16`` | ``fp16``, the weights' dtype (log-probabilities are always fp32).
        device: ``auto`` (CUDA when present) | ``cpu`` | ``cuda`` | ``cuda:N``.
        revision, trust_remote_code, allow_pickle, attention: as the CLI flags of the same names (``attention``:
            ``auto`` | ``sdpa`` | ``eager`` | ``flash_attention_2`` … — the kernel, see ``esa.models.ATTENTION_NAMES``).

    Returns:
        :class:`~esa.models.LoadedModel`: ``.model`` (the ``nn.Module``), ``.tokenizer``, ``.fingerprint``, ``.device``.
    """
    from esa.models import load_model

    spec = model if isinstance(model, ModelSpec) else ModelSpec(model, dtype, device, revision, trust_remote_code,
                                                                allow_pickle, attention)
    return load_model(spec)


def windows(lm: LoadedModel, dataset: str = "python-docs", *, context_len: int = 128,
            max_eval_tokens: int | None = 2048, seed: int = 0, method: str = "chunks", stride: int | None = None,
            bos: str = "auto") -> tuple[Window, ...]:
    """The evaluation windows of one baseline cell, cut and chosen as ``esa baseline`` does (README, "Window
    methods").

    Args:
        lm: the model whose tokenizer cuts the text (and whose context length bounds ``context_len``).
        dataset: a corpus name (``python-docs`` is embedded) or a ``.txt``/``.jsonl``/``.parquet`` path.
        context_len: tokens per window. With ``chunks`` every token but each window's first is scored, so 128
            gives 127 scored tokens per window.
        max_eval_tokens: scored-token budget; ``seed`` picks which windows fill it (``None``: every window).
        method, stride, bos: as ``esa baseline --method/--stride/--bos``.

    Returns:
        The chosen windows in corpus order; pass them to :func:`score` or :func:`perplexity`.
    """
    from esa.data.corpora import for_method, load_corpus
    from esa.data.windows import corpus_windows, select_windows
    from esa.models import check_context

    check_context(lm, context_len, "context_len")
    corpus = for_method(load_corpus(dataset), method)  # gptq / rolling read their own rows
    ws = corpus_windows(lm.tokenizer, corpus, method, context_len, stride=stride, bos=bos)
    return select_windows(ws, max_eval_tokens, seed).windows.windows


def score(lm: LoadedModel, windows: Sequence[Window], *, batch_tokens: int = 4096) -> WindowScores:
    """Per-window summed NLL, scored and correct token counts (:func:`esa.evals.perplexity.evaluate_windows`).

    Scores the model *as it is now*: inside :func:`esa.perturbed` it scores the perturbed model. Pair two calls
    on the same windows with :func:`esa.paired_compare` (``base.nll, other.nll, base.n_scored``).

    Args:
        batch_tokens: micro-batch token budget (halved on out-of-memory).
    """
    from esa.evals.perplexity import evaluate_windows
    from esa.models import pad_id

    return evaluate_windows(lm.model, tuple(windows), pad_id(lm.tokenizer, lm.model), batch_tokens)


def perplexity(lm: LoadedModel, windows: Sequence[Window], *, batch_tokens: int = 4096) -> dict:
    """The perplexity family of :func:`score` (:func:`esa.evals.perplexity.perplexity_metrics`): ``perplexity``,
    ``nll_per_token``, ``token_accuracy``, ``bits_per_byte``, word/byte perplexity, token counts, tokens/s."""
    from esa.data.windows import scored_text_counts
    from esa.evals.perplexity import perplexity_metrics

    return perplexity_metrics(score(lm, windows, batch_tokens=batch_tokens), *scored_text_counts(windows))


# ---- sensitivity ------------------------------------------------------------------------------------------

def super_weights(lm: LoadedModel, *, dataset: str = "python-docs", context_len: int = 128, max_samples: int = 4,
                  seed: int = 0, iterations: int = 1, thresholds: Thresholds | None = None) -> SuperWeightReport:
    """Super-weight candidates, as ``esa superweights`` finds them: ``max_samples`` seeded chunks windows in one
    forward pass (:func:`esa.sensitivity.superweight_run.window_batch`), hooks on every MLP output projection
    (:func:`esa.find_super_weights`).

    Args:
        iterations: search rounds in all; above 1 the weights found are zeroed and the search repeated (they are
            restored before this returns).
        thresholds: spike thresholds (default :class:`~esa.sensitivity.superweights.Thresholds`).

    Returns:
        The report: ``.candidates`` (each with ``param_name``, ``row`` (out), ``col`` (in), ``weight``, ``layer``),
        ``.massive_activations`` and the per-layer profiles of each round (``esa.sensitivity.superweight_plots``).
    """
    from esa.sensitivity.superweight_run import SuperWeightRun, window_batch
    from esa.sensitivity.superweights import find_super_weights

    cfg = SuperWeightRun(dataset, context_len, max_samples, seed, iterations, thresholds or Thresholds())
    ids, _, _ = window_batch(lm, cfg)  # (B, T)
    return find_super_weights(lm.model, ids, thresholds=cfg.thresholds, iterate=iterations > 1,
                              max_iterations=iterations)


def rank(lm: LoadedModel, scorer: str = "magnitude", *, k: int = 100, mode: str = "global",
         dataset: str = "python-docs", max_samples: int = 8, context_len: int = 128, seed: int = 0,
         batch_size: int = 8, params: Sequence[str] = ("*",), bottom: bool = False) -> RankingResult:
    """Score every selected weight with ``scorer`` and keep the top (``bottom``: the lowest) ``k``, as the
    ``sensitivity`` run kind does (:func:`esa.score_and_rank` on seeded calibration windows).

    Args:
        scorer: a name in ``esa.SCORERS`` (``magnitude``, ``grad_x_weight``, ``wanda``, …); a data-free scorer
            (``magnitude``) reads no calibration windows.
        k, mode: ``k`` weights over the model (``global``) or per tensor (``per_layer``).
        max_samples, context_len, seed, batch_size: the calibration windows (:class:`esa.CalibrationSpec`).
        params: fnmatch globs of parameter names; embeddings, norms and biases are left out.

    Returns:
        ``.table`` (param, layer, role, row, col, score, weight, rank — feed it to :func:`esa.from_ranking`),
        ``.floor`` (per tensor, its lowest scores: the ``bottom_k`` control) and heavy-tail statistics ``.tail``.
    """
    from esa.models import check_context
    from esa.sensitivity.calibration import CalibrationSpec, calibration_batches
    from esa.sensitivity.ranking import score_and_rank
    from esa.sensitivity.scorers import SCORERS, ScoreOptions, select_params

    batches = ()
    if SCORERS.get(scorer).needs_data:
        check_context(lm, context_len, "context_len")
        spec = CalibrationSpec(dataset, max_samples, context_len, seed, batch_size)
        batches = calibration_batches(lm.tokenizer, spec).batches
    chosen = select_params(lm.model, tuple(params))
    return score_and_rank(lm.model, chosen, batches, scorer, k, mode, not bottom, ScoreOptions(seed=seed))


# ---- studies and their results ----------------------------------------------------------------------------

def _study(study: Study | Mapping | str | Path) -> tuple[Study, str | None]:
    """(validated study, its file's absolute path or None) from a Study, a mapping or a YAML path."""
    from esa.study import load_study, parse_study

    if isinstance(study, Study):
        return study, None
    if isinstance(study, Mapping):
        return parse_study(dict(study), "study"), None
    if isinstance(study, (str, Path)):
        return load_study(study), str(Path(study).resolve())
    raise EsaError(f"a study is a dict, a YAML path or an esa.Study, not {type(study).__name__}")


def run(study: Study | Mapping | str | Path, db: str | Path | None = None, *, executor: str = "local",
        on_event: EventFn = quiet, strict: bool = True, **options) -> Summary:
    """Run a study into a results database, as ``esa run STUDY.yaml --db DB`` does (:func:`esa.run_study`).

    Rerunning resumes: completed runs are found by run id and not computed again.

    Args:
        study: a mapping with a study file's keys (``name``, ``models``, ``datasets``, ``context_lens``, ``seeds``,
            ``kinds``, sections …; validated strictly), the path of a study YAML, or an :class:`esa.Study`.
        db: the SQLite results database (default ``runs/<study name>.db``, as the CLI).
        executor: ``local`` or ``ray`` (``options``: ``address``, ``num_gpus``, ``num_cpus``).
        on_event: called as ``on_event(kind, **info)`` for progress (``run``, ``group``, ``load_error`` …).
        strict: raise :class:`esa.EsaError` when a run failed or a model could not be loaded (the completed runs
            stay in ``db``); with ``False`` return the summary anyway.

    Returns:
        The executor's :class:`~esa.executors.core.Summary` (``completed``, ``skipped``, ``failed``, ``ok``).
    """
    from esa.executors import run_study

    parsed, source = _study(study)
    db = Path(db) if db is not None else Path("runs") / f"{parsed.name}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    summary = run_study(parsed, db, executor, source, on_event, **options)
    if strict and not summary.ok:
        what, error = (summary.failed or summary.load_errors)[0]
        raise EsaError(f"study {parsed.name}: {what}: {error} ({len(summary.failed)} failed run(s), "
                       f"{len(summary.load_errors)} unloadable model(s)); the completed runs are kept in {db}")
    return summary


def baseline(model: str | Sequence[str] = "smollm2-135m", db: str | Path = "runs/baseline/esa.db", *,
             datasets: Sequence[str] = ("python-docs",), context_lens: Sequence[int] = (512,),
             seeds: Sequence[int] = (0,), max_eval_tokens: int | None = 65_536, batch_tokens: int = 32_768,
             method: str = "chunks", stride: int | None = None, bos: str = "auto", dtype: str = "fp32",
             device: str = "auto", overwrite: bool = False) -> pd.DataFrame:
    """Baselines — perplexity family, token accuracy, throughput, memory per (dataset, context, seed) — as
    ``esa baseline`` measures them: the same one-off study (``esa.commands.baseline.one_off_study``) run into
    ``db`` (a rerun resumes; ``overwrite`` starts a fresh database). The defaults are the ``smoke`` profile's
    budgets on the embedded corpus.

    Args:
        model: one model or several (each with the same dtype and device), as :func:`load` takes them.
        max_eval_tokens: scored tokens per cell, the seed picks the windows (``None``: the whole split).

    Returns:
        One row per cell (this call's runs only): ``config.*`` (dataset, context_len, seed …), ``model.*``
        (the fingerprint) and the metrics (``perplexity``, ``bits_per_byte``, ``tokens_per_second`` …).
    """
    from esa.commands.baseline import one_off_study
    from esa.evals.baseline import BaselineConfig
    from esa.executors.one_off import run_one_off

    models = [model] if isinstance(model, str) else list(model)
    cfg = BaselineConfig(ModelSpec(models[0], dtype, device), "smoke", tuple(datasets), tuple(context_lens),
                         tuple(seeds), method, stride, bos, max_eval_tokens, batch_tokens).resolved()
    outcome = run_one_off(one_off_study(cfg, models), Path(db), "esa.baseline", overwrite)
    ids = [r.row.run_id for r in outcome.results]
    frame = results(db)
    return frame[frame["run_id"].isin(ids)].dropna(axis=1, how="all").reset_index(drop=True)


def _database(db: str | Path) -> Path:
    """A results database, or the ``--out-dir`` of a command that keeps ``esa.db`` there (as ``esa report``)."""
    from esa.commands.report import database_of

    return database_of(Path(db))


def results(db: str | Path, *, study: str | None = None, kind: str | None = None,
            completed: bool = False) -> pd.DataFrame:
    """The runs of a results database as one flat DataFrame (:meth:`esa.Reader.frame`, what ``esa results``
    exports), oldest first.

    Args:
        db: a database written by :func:`run`, ``esa run`` or any command (its ``--out-dir`` works too).
        study: only this study's runs (name or id).
        kind: only runs of this kind (``baseline``, ``perturbation`` …); columns no such run fills are dropped.
        completed: only completed runs (failed ones carry ``status == "failed"`` and their ``error``).

    Returns:
        Columns ``run_id``, ``kind``, ``status``, ``error``, ``started_at``, ``finished_at``, then ``config.*``,
        ``model.*``, the metrics unprefixed, ``provenance.*`` and ``artifacts.*`` (nested values as JSON text).
    """
    from esa.store import Reader

    with Reader(_database(db)) as reader:
        frame = reader.frame(study)
    if kind is not None:
        frame = frame[frame["kind"] == kind].dropna(axis=1, how="all")
    if completed:
        frame = frame[frame["status"] == "completed"]
    return frame.reset_index(drop=True)


def arrays(db: str | Path, run_id: str) -> dict[str, np.ndarray]:
    """The per-window arrays a run stored (``nll``, ``n_scored``, ``n_correct``, ``window_index`` for a
    baseline cell; each kind documents its own), by ``run_id`` (a column of :func:`results`)."""
    from esa.store import Reader

    with Reader(_database(db)) as reader:
        return reader.arrays(run_id)


def write_report(db: str | Path, out: str | Path | None = None, *, study: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and a self-contained ``report.html`` from a results database, as
    ``esa report`` does; ``out`` defaults to ``<db stem>-report`` beside the database. Returns both paths."""
    from esa.report.study_report import write_study_report

    path = _database(db)
    return write_study_report(path, Path(out) if out is not None else path.parent / f"{path.stem}-report", study)
