"""Scaling studies: one protocol along a model-size ladder, and log–log trends of its statistics vs size.

Every model of the ladder is loaded once, in order, and measured on the same corpus and window settings
(:class:`~esa.perturb.protocols.EvalConfig`: seeded ``chunks`` windows, fixed for all of that model's trials):

* **baseline** — perplexity, NLL per token and bits per byte on the evaluation windows. Tokenizers differ
  across a ladder (SmolLM2 49k, Gemma-3 262k, Pythia 50k entries), so a per-*token* perplexity is not comparable
  between families; bits per byte is: the same summed NLL divided by the UTF-8 bytes of the scored text
  (``bpb = Σ NLL / (bytes · ln 2)``). ``max_eval_tokens`` counts each model's own tokens, so models see
  different amounts of text; bpb normalises that too.
* **super weights** — :func:`~esa.sensitivity.superweights.find_super_weights` on the run's calibration
  windows: the number of candidates, the depth of the strongest one as ``layer / n_layers`` (0 = the first
  block; SmolLM2-135M's layer 11 of 30 → 0.367), the largest |output| of any MLP output projection and the
  largest massive residual-stream activation. The detector looks at the MLP output projection itself: in
  Gemma-2/3 a post-feed-forward norm rescales that output before the residual add, so a Gemma spike can be
  massive in the residual stream while no down_proj output clears the detector's floor (0 candidates).
* **perturbation** — :func:`~esa.perturb.protocols.perturb_experiment` with ``targets=superweights`` against the
  size-matched ``random_k`` control: mean ΔNLL per token (each window weighs the same, bootstrap-t 95 % CI) and
  the PPL ratio of each arm vs the unperturbed model, and their quotient. A model without candidates has no
  perturbation numbers (null, with a note) rather than zeros.
* **heavy tail** — the share of Σ|W| held by the largest ``tail_fraction`` (default 0.1 %) of |W|, over the
  weights :func:`~esa.sensitivity.scorers.select_params` takes by default (no embeddings, norms or biases),
  streamed through :class:`~esa.sensitivity.stability.TailStats`.

**Trends.** For each statistic, ordinary least squares of ``log10(statistic)`` on ``log10(N)`` (N = parameter
count) over the models where both are finite and > 0: ``statistic ≈ 10^intercept · N^slope``. The slope's
95 % CI is ``slope ± t_{0.975, n-2} · SE(slope)`` with SE from the OLS residuals. Worked example: PPL 20 at
N = 10⁸ and PPL 10 at N = 10⁹ give slope = log10(10/20) / 1 = -0.301 and intercept = log10(20) + 0.301 · 8
= 3.71; two points fit exactly, leave no residual degree of freedom, and so the CI is undefined (null).
Fewer than two usable points: no fit, and the reason is stored.

**Where the numbers live.** :func:`measure_model` is the one per-model measurement. ``esa scaling`` runs it
through a results database — a generated study with a ``scaling:`` section (:mod:`esa.kinds.scaling_point`),
executed by :func:`esa.executors.run_study`, one ``scaling_point`` run per model — and then writes its files
*from the database rows* (:mod:`esa.scaling.ladder`), so a killed ladder resumes where it stopped and
``esa report`` shows the same numbers. ``statistics`` picks what is measured: perplexity and bits per byte
always; super weights, the perturbation (which needs the super weights) and the heavy tail only when one of
their statistics is requested.

Outputs in ``<out-dir>``, next to the database (default ``<out-dir>/scaling.db``):

* ``scaling.json`` — schema ``esa.scaling/1``: provenance, resolved config, the database and run ids,
  ``statistics`` (key → label and whether higher is better), ``rows`` (one per model, in ladder order),
  ``fits`` (statistic → fit or reason), notes. Non-finite numbers are the strings "nan"/"inf".
* ``models/<slug>/perturb.json`` + ``perturb.npz`` — the full perturbation document and per-window arrays of
  each model with super-weight candidates (paired data for re-analysis), copied from the database.
* ``scaling.png`` (all statistics) and ``plots/<statistic>.png`` (fitted ones) — log–log points with model names and the
  fitted line (:mod:`esa.report.scaling_plots`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats as sps

from esa.data.windows import scored_text_counts
from esa.core.errors import EsaError
from esa.evals.perplexity import evaluate_windows, perplexity_metrics
from esa.models import LoadedModel, pad_id
from esa.perturb.protocols import EvalConfig, PerturbConfig, make_bench, perturb_experiment

SCHEMA = "esa.scaling/1"
X_AXES = ("n_params", "n_params_non_embedding")  # what "size" means on the trend's x axis


@dataclass(frozen=True)
class Statistic:
    key: str  # row key in scaling.json
    label: str  # axis label
    higher_is_better: bool | None  # None: neither (a description of the model, not a quality)
    needs: str = "baseline"  # the measurement that produces it: baseline | superweights | perturbation | tail
    effect_ci: str | None = None  # row key of the 95 % CI of the effect it rests on: a model whose CI holds 0
    #                               has no measured effect, and its log would be a trend of noise — left out


STATISTICS = (
    Statistic("perplexity", "perplexity (per own token)", False),
    Statistic("bits_per_byte", "bits per byte", False),
    Statistic("sw_count", "super-weight candidates", None, "superweights"),
    Statistic("sw_depth_fraction", "strongest super weight: layer / n_layers", None, "superweights"),
    Statistic("max_mlp_out_activation", "max |MLP output projection activation|", None, "superweights"),
    Statistic("max_massive_activation", "max massive residual-stream |h|", None, "superweights"),
    Statistic("sw_delta_nll", "super weights perturbed: mean ΔNLL/token", False, "perturbation", "sw_delta_nll_ci95"),
    Statistic("sw_ppl_ratio", "super weights perturbed: PPL ratio", False, "perturbation", "sw_delta_nll_ci95"),
    Statistic("random_delta_nll", "random_k perturbed: mean ΔNLL/token", False, "perturbation",
              "random_delta_nll_ci95"),
    Statistic("random_ppl_ratio", "random_k perturbed: PPL ratio", False, "perturbation", "random_delta_nll_ci95"),
    Statistic("sw_over_random", "ΔNLL super weights / ΔNLL random_k", None, "perturbation", "random_delta_nll_ci95"),
    Statistic("magnitude_top_share", "share of Σ|W| in the top tail_fraction of |W|", None, "tail"),
)
STATISTIC_KEYS = tuple(s.key for s in STATISTICS)


def resolve_statistics(names) -> tuple[str, ...]:
    """A requested subset in :data:`STATISTICS` order; empty → every statistic.

    Raises:
        EsaError: an unknown name (with "did you mean") or a name given twice.
    """
    from esa.core.registry import suggest

    names = tuple(names)
    for name in names:
        if name not in STATISTIC_KEYS:
            raise EsaError(suggest(name, list(STATISTIC_KEYS), "scaling statistic"))
    if len(set(names)) != len(names):
        raise EsaError(f"statistics {list(names)} lists a name twice; give each once")
    return tuple(k for k in STATISTIC_KEYS if k in names) if names else STATISTIC_KEYS


def measurements(statistics) -> set[str]:
    """What one model must run for ``statistics`` (perturbing super weights needs finding them first)."""
    needs = {s.needs for s in STATISTICS if s.key in resolve_statistics(statistics)} | {"baseline"}
    return needs | ({"superweights"} if "perturbation" in needs else set())


@dataclass(frozen=True)
class ScalingConfig:
    """One scaling study: the ladder and the protocol every model of it runs (stored resolved in the JSON)."""

    models: tuple[str, ...]  # suite aliases, hub ids, local dirs or .gguf files, smallest first by convention
    data: EvalConfig = EvalConfig()  # corpus, context length, eval-token budget, seed, calibration windows
    op: str = "zero"  # the perturbation applied to super weights and to the random_k control
    control_seeds: tuple[int, ...] = (0, 1, 2)  # random_k draws
    tail_fraction: float = 0.001  # heavy-tail share: the top 0.1 % of |W|
    x_axis: str = "n_params"  # n_params (all parameters, tied embeddings once) | n_params_non_embedding
    dtype: str = "fp32"
    device: str = "auto"
    statistics: tuple[str, ...] = ()  # STATISTICS keys to measure and fit; empty → all (see measurements())
    trust_remote_code: bool = False  # let hub repos of the ladder run their own Python
    allow_pickle: bool = False  # accept non-safetensors checkpoints
    attention: str = "auto"  # attention kernel of every model (esa.models.ATTENTION_NAMES)

    def check(self) -> None:
        if not self.models:
            raise EsaError("a scaling study needs at least one model: --models smollm2-135m pythia-70m …")
        dupes = sorted({m for m in self.models if self.models.count(m) > 1})
        if dupes:
            raise EsaError(f"--models lists {', '.join(dupes)} more than once; give each model once")
        if self.x_axis not in X_AXES:
            raise EsaError(f"unknown --x-axis {self.x_axis!r}; choose one of {', '.join(X_AXES)}")
        if not 0 < self.tail_fraction < 1:
            raise EsaError(f"--tail-fraction {self.tail_fraction} must be in (0, 1), e.g. 0.001 for the top 0.1 %")
        if not self.control_seeds:
            raise EsaError("the random_k control needs at least one --control-seeds value")
        try:
            resolve_statistics(self.statistics)
        except EsaError as exc:
            raise EsaError(f"--statistics: {exc}") from exc


# ---- log–log fits ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerLawFit:
    """``log10(y) = intercept + slope · log10(x)`` by OLS; SEs and CIs are None with 2 points (0 dof)."""

    n: int  # points used
    slope: float
    intercept: float  # log10 units: y = 10^intercept at x = 1
    slope_se: float | None
    intercept_se: float | None
    slope_ci95: tuple[float, float] | None  # slope ± t_{0.975, n-2} · slope_se
    r2: float | None  # None when every log10(y) is equal (no variance to explain)
    note: str = ""

    def predict(self, x) -> np.ndarray:
        return 10.0 ** (self.intercept + self.slope * np.log10(np.asarray(x, dtype=np.float64)))


def fit_power_law(x, y, level: float = 0.95) -> PowerLawFit:
    """Fit ``y ≈ 10^a · x^b`` on the points where x and y are finite and > 0 (see the module docstring).

    Raises:
        EsaError: fewer than two usable points, or all usable x equal (the slope is then undefined).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise EsaError(f"x and y must be 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        raise EsaError(f"a log–log fit needs at least 2 points with finite, positive x and y; got {int(ok.sum())}"
                       " — add models to the ladder (--models a b …)")
    lx, ly = np.log10(x[ok]), np.log10(y[ok])  # (n,)
    n, xm, ym = len(lx), lx.mean(), ly.mean()
    sxx = float(((lx - xm) ** 2).sum())
    if sxx == 0:
        raise EsaError("every model of the fit has the same parameter count; the slope is undefined — "
                       "use models of different sizes")
    slope = float(((lx - xm) * (ly - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    ss_res = float(((ly - intercept - slope * lx) ** 2).sum())
    ss_tot = float(((ly - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    if n == 2:
        return PowerLawFit(n, slope, intercept, None, None, None, r2,
                           "2 points: the line is exact, no residual degrees of freedom, CI undefined")
    s2 = ss_res / (n - 2)  # residual variance
    se_b = math.sqrt(s2 / sxx)
    se_a = math.sqrt(s2 * (1.0 / n + xm ** 2 / sxx))
    half = float(sps.t.ppf((1 + level) / 2, n - 2)) * se_b
    return PowerLawFit(n, slope, intercept, se_b, se_a, (slope - half, slope + half), r2)


def fit_trends(rows: list[dict], x_key: str = "n_params", statistics=()) -> dict[str, dict]:
    """Per statistic (``statistics``, default all): ``{"fit": PowerLawFit as dict, "models": [...],
    "excluded": [...], "why": {model: reason}}`` or, when no fit is possible, ``{"fit": None, "reason": …}``.
    Models whose value is missing, non-finite (also the JSON strings "nan"/"inf") or ≤ 0 are excluded: a
    log–log trend cannot place them; so are models whose effect's 95 % CI (``Statistic.effect_ci``) contains 0
    — e.g. random_k's ΔNLL of +1.7e-6 [-7.6e-6, +1.1e-5] is no measured effect, and its log is noise."""
    out = {}
    keys = resolve_statistics(statistics)
    for stat in (s for s in STATISTICS if s.key in keys):
        why = {r["model"]: reason for r in rows if (reason := _unusable(r, stat, x_key))}
        usable = [r for r in rows if r["model"] not in why]
        entry = {"models": [r["model"] for r in usable], "excluded": list(why), "why": why}
        try:
            fit = fit_power_law([r[x_key] for r in usable], [r[stat.key] for r in usable])
            entry["fit"] = asdict(fit)
        except EsaError as exc:
            entry.update(fit=None, reason=str(exc))
        out[stat.key] = entry
    return out


def _unusable(row: dict, stat: Statistic, x_key: str) -> str | None:
    """Why ``row`` cannot be a point of ``stat``'s log–log fit, or None."""
    if not (_positive(row.get(stat.key)) and _positive(row.get(x_key))):
        return "no finite, positive value"
    ci = row.get(stat.effect_ci) if stat.effect_ci else None
    if ci is not None and _finite_pair(ci) and ci[0] <= 0 <= ci[1]:
        return f"{stat.effect_ci.removesuffix('_ci95')} 95 % CI [{ci[0]:.3g}, {ci[1]:.3g}] contains 0"
    return None


def _finite_pair(ci) -> bool:
    return isinstance(ci, (list, tuple)) and len(ci) == 2 and all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in ci)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---- one model ---------------------------------------------------------------------------------------------

def _tail_share(model: torch.nn.Module, fraction: float) -> dict:
    """Heavy-tail statistics of |W| over the default-selected weights (magnitude scores)."""
    from esa.sensitivity.scorers import select_params
    from esa.sensitivity.stability import TailStats

    params = select_params(model)
    tail = TailStats(sum(p.numel() for p in params.values()), sample_size=1, fractions=(fraction,))
    for p in params.values():
        tail.add(p.detach().abs())
    res = tail.result()
    return {"share": res[f"top_{fraction * 100:g}pct_share"], "gini": res["gini"], "n_weights": res["n_weights"]}


def _detection(lm: LoadedModel, calib: torch.Tensor) -> dict:
    """Super-weight statistics from one search on the calibration windows (B, T)."""
    from esa.models.architectures import decoder_layers
    from esa.sensitivity.superweights import find_super_weights

    report = find_super_weights(lm.model, calib)
    n_layers = len(decoder_layers(lm.model))
    top = max(report.candidates, key=lambda w: w.output_activation, default=None)
    massive = [m.magnitude for m in report.massive_activations]
    return {"n_layers": n_layers, "sw_count": len(report.candidates),
            "sw_layer": top.layer if top else None, "sw_depth_fraction": top.layer / n_layers if top else None,
            "max_mlp_out_activation": max(p.max_output for p in report.rounds[0].layers),
            "max_massive_activation": max(massive) if massive else None,
            "superweights": [[w.layer, w.row, w.col] for w in report.candidates]}


def _perturbation(doc: dict) -> dict:
    """Row fields from a perturb.json document (target and random_k vs the unperturbed model)."""
    comps = {c["name"]: c for c in doc["comparisons"]}
    out = {}
    for arm, prefix in (("target", "sw"), ("random_k", "random")):
        c = comps[f"{arm} vs baseline"]
        out.update({f"{prefix}_delta_nll": c["mean_delta_nll"], f"{prefix}_delta_nll_ci95": [c["ci_low"], c["ci_high"]],
                    f"{prefix}_ppl_ratio": c["ppl_ratio"], f"{prefix}_collapsed": c["collapsed"]})
    out["sw_over_random"] = doc["separation"]["target_over_random"]
    return out


def _baseline(bench) -> tuple[dict, dict[str, np.ndarray]]:
    """Perplexity metrics and per-window arrays of the unperturbed model on the bench's windows (used when no
    perturbation runs, so no trial computes them)."""
    pad = pad_id(bench.lm.tokenizer, bench.model)
    scores = evaluate_windows(bench.model, bench.windows, pad, bench.data.batch_tokens, "baseline")
    arrays = {"window_index": np.asarray(bench.info["window_indices"]), "n_scored": scores.n_scored,
              "baseline_nll": scores.nll}  # (W,) each: the keys perturb.npz uses for the same numbers
    return perplexity_metrics(scores, *scored_text_counts(bench.windows)), arrays


def _non_embedding(model: torch.nn.Module) -> int:
    from esa.models.architectures import module_role

    return sum(p.numel() for n, p in model.named_parameters() if module_role(model, n) not in ("embedding", "lm_head"))


PERTURBATION_KEYS = ("sw_delta_nll", "sw_delta_nll_ci95", "sw_ppl_ratio", "sw_collapsed", "random_delta_nll",
                     "random_delta_nll_ci95", "random_ppl_ratio", "random_collapsed", "sw_over_random")
DETECTION_KEYS = ("n_layers", "sw_count", "sw_layer", "sw_depth_fraction", "max_mlp_out_activation",
                  "max_massive_activation")
BASELINE_KEYS = ("perplexity", "nll_per_token", "bits_per_byte", "token_accuracy", "scored_tokens", "scored_bytes",
                 "n_nonfinite_windows")


def _perturb(lm: LoadedModel, cfg: ScalingConfig) -> tuple[dict, dict]:
    pcfg = PerturbConfig(targets="superweights", op=cfg.op, controls=("random_k",),
                         control_seeds=cfg.control_seeds, data=cfg.data)
    return perturb_experiment(lm, pcfg)  # same data config → the same windows and candidates


def measure_model(lm: LoadedModel, cfg: ScalingConfig) -> tuple[dict, dict | None, dict[str, np.ndarray]]:
    """Run the scaling protocol on one loaded model: ``(row, perturb document, per-window arrays)``.

    This is the one per-model measurement of ESA: ``esa scaling`` and a study's ``scaling:`` section
    (:mod:`esa.kinds.scaling_point`) both call it. Only what ``cfg.statistics`` needs is measured
    (:func:`measurements`); the row keys of statistics not measured are null, with a note. The perturbation
    document is None when no perturbation ran (not requested, or no super-weight candidates); the row's
    baseline and the arrays (window_index, n_scored, baseline_nll) then come from an unperturbed pass over the
    same windows.
    """
    start = time.perf_counter()
    needs = measurements(cfg.statistics)
    bench = make_bench(lm, cfg.data)
    det = _detection(lm, bench.calib) if "superweights" in needs else None
    notes: list[str] = []
    doc = None
    if det and det["sw_count"] and "perturbation" in needs:
        doc, arrays = _perturb(lm, cfg)
        base, notes = doc["baseline"], list(doc["notes"])
    else:
        base, arrays = _baseline(bench)
        if "perturbation" in needs:
            notes.append("no super-weight candidates: perturbation statistics are null")
    skipped = sorted({"superweights", "perturbation", "tail"} - needs)
    if skipped:
        notes.append(f"not requested by statistics, so not measured (null): {', '.join(skipped)}")
    tail = _tail_share(lm.model, cfg.tail_fraction) if "tail" in needs else dict.fromkeys(("share", "gini",
                                                                                           "n_weights"))
    fp = lm.fingerprint
    row = {"model": fp.model_id, "n_params": fp.n_params, "n_params_non_embedding": _non_embedding(lm.model),
           **{k: base[k] for k in BASELINE_KEYS},
           **{k: det[k] if det else None for k in DETECTION_KEYS}, "superweights": det["superweights"] if det else None,
           **(_perturbation(doc) if doc else dict.fromkeys(PERTURBATION_KEYS)),
           "magnitude_top_share": tail["share"], "magnitude_gini": tail["gini"], "tail_weights": tail["n_weights"],
           "data": {k: bench.info[k] for k in ("dataset", "bos", "n_windows", "scored_tokens", "seed_invariant")},
           "fingerprint": fp.to_dict(), "notes": notes, "wall_seconds": time.perf_counter() - start}
    return row, doc, arrays


# ---- a ladder's document -----------------------------------------------------------------------------------

def ladder_document(rows: list[dict], x_axis: str = "n_params", statistics=()) -> dict:
    """The trend part of ``scaling.json`` from measured rows (in ladder order): x axis, the statistics'
    labels, the rows, the fits and the notes. ``esa scaling`` and the study report both build it from the
    rows stored in a results database, so they cannot disagree."""
    keys = resolve_statistics(statistics)
    fits = fit_trends(rows, x_axis, keys)
    return {"x_axis": x_axis,
            "statistics": {s.key: {"label": s.label, "higher_is_better": s.higher_is_better}
                           for s in STATISTICS if s.key in keys},
            "rows": rows, "fits": fits, "notes": ladder_notes(rows)}


def ladder_notes(rows: list[dict]) -> list[str]:
    notes = []
    if len(rows) < 2:
        notes.append(f"{len(rows)} model: no trend can be fitted (need ≥ 2 models)")
    elif len(rows) == 2:
        notes.append("2 models: each fitted line passes through both points; slope CIs are undefined")
    families = {(r.get("fingerprint") or {}).get("model_type") for r in rows}
    if len(families) > 1:
        notes.append(f"mixed families ({', '.join(sorted(map(str, families)))}): tokenizers differ, compare "
                     "bits_per_byte, not perplexity")
    return notes
