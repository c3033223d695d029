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
  size-matched ``random_k`` control: mean ΔNLL per token (each window weighs the same, bootstrap 95 % CI) and
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

Outputs in ``<out-dir>`` (replaced as a whole, only when the run succeeds):

* ``scaling.json`` — schema ``esa.scaling/1``: provenance, resolved config, ``statistics`` (key → label and
  whether higher is better), ``rows`` (one per model, in ladder order), ``fits`` (statistic → fit or reason),
  notes. Non-finite numbers are the strings "nan"/"inf".
* ``models/<slug>/perturb.json`` + ``perturb.npz`` — the full perturbation document and per-window arrays of
  each model with super-weight candidates (paired data for re-analysis).
* ``scaling.png`` (all statistics) and ``plots/<statistic>.png`` (fitted ones) — log–log points with model names and the
  fitted line (:mod:`esa.report.scaling_plots`).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from esa.data.windows import scored_text_counts
from esa.errors import EsaError
from esa.evals.perplexity import evaluate_windows, perplexity_metrics
from esa.models import LoadedModel, ModelSpec, load_model, resolve_device, resolve_source
from esa.perturb.protocols import EvalConfig, PerturbConfig, make_bench, perturb_experiment
from esa.provenance import provenance
from esa.runs import staged_run_dir, write_arrays, write_json

log = logging.getLogger(__name__)

SCHEMA = "esa.scaling/1"
X_AXES = ("n_params", "n_params_non_embedding")  # what "size" means on the trend's x axis


@dataclass(frozen=True)
class Statistic:
    key: str  # row key in scaling.json
    label: str  # axis label
    higher_is_better: bool | None  # None: neither (a description of the model, not a quality)


STATISTICS = (
    Statistic("perplexity", "perplexity (per own token)", False),
    Statistic("bits_per_byte", "bits per byte", False),
    Statistic("sw_count", "super-weight candidates", None),
    Statistic("sw_depth_fraction", "strongest super weight: layer / n_layers", None),
    Statistic("max_mlp_out_activation", "max |MLP output projection activation|", None),
    Statistic("max_massive_activation", "max massive residual-stream |h|", None),
    Statistic("sw_delta_nll", "super weights perturbed: mean ΔNLL/token", False),
    Statistic("sw_ppl_ratio", "super weights perturbed: PPL ratio", False),
    Statistic("random_delta_nll", "random_k perturbed: mean ΔNLL/token", False),
    Statistic("random_ppl_ratio", "random_k perturbed: PPL ratio", False),
    Statistic("sw_over_random", "ΔNLL super weights / ΔNLL random_k", None),
    Statistic("magnitude_top_share", "share of Σ|W| in the top tail_fraction of |W|", None),
)


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


def fit_trends(rows: list[dict], x_key: str = "n_params") -> dict[str, dict]:
    """Per statistic: ``{"fit": PowerLawFit as dict, "models": [...], "excluded": [...]}`` or, when no fit is
    possible, ``{"fit": None, "reason": …}``. Models whose value is missing, non-finite or ≤ 0 are excluded
    (and named): a log–log trend cannot place them."""
    out = {}
    for stat in STATISTICS:
        usable = [r for r in rows if _positive(r.get(stat.key)) and _positive(r.get(x_key))]
        excluded = [r["model"] for r in rows if r not in usable]
        entry = {"models": [r["model"] for r in usable], "excluded": excluded}
        try:
            fit = fit_power_law([r[x_key] for r in usable], [r[stat.key] for r in usable])
            entry["fit"] = asdict(fit)
        except EsaError as exc:
            entry.update(fit=None, reason=str(exc))
        out[stat.key] = entry
    return out


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
    from esa.architectures import decoder_layers
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


def _baseline(bench) -> dict:
    """Perplexity metrics of the unperturbed model on the bench's windows (when no trial needs a cache)."""
    tok = bench.lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    scores = evaluate_windows(bench.model, bench.windows, pad, bench.data.batch_tokens, "baseline")
    counts = np.array([scored_text_counts(tok, w) for w in bench.windows])  # (W, 2) bytes, words
    return perplexity_metrics(scores, int(counts[:, 0].sum()), int(counts[:, 1].sum()))


def _non_embedding(model: torch.nn.Module) -> int:
    from esa.architectures import module_role

    return sum(p.numel() for n, p in model.named_parameters() if module_role(model, n) not in ("embedding", "lm_head"))


def measure_model(lm: LoadedModel, cfg: ScalingConfig) -> tuple[dict, dict | None, dict | None]:
    """Run the scaling protocol on one loaded model: ``(row, perturb document, per-window arrays)``.

    The perturbation document and arrays are None when the model has no super-weight candidates; the row's
    baseline then comes from an unperturbed pass over the same windows.
    """
    start = time.perf_counter()
    bench = make_bench(lm, cfg.data)
    det = _detection(lm, bench.calib)
    notes: list[str] = []
    doc = arrays = None
    if det["sw_count"]:
        pcfg = PerturbConfig(targets="superweights", op=cfg.op, controls=("random_k",),
                             control_seeds=cfg.control_seeds, data=cfg.data)
        doc, arrays = perturb_experiment(lm, pcfg)  # same data config → the same windows and candidates
        base, notes = doc["baseline"], list(doc["notes"])
    else:
        base = _baseline(bench)
        notes.append("no super-weight candidates: perturbation statistics are null")
    tail = _tail_share(lm.model, cfg.tail_fraction)
    fp = lm.fingerprint
    row = {"model": fp.model_id, "n_params": fp.n_params, "n_params_non_embedding": _non_embedding(lm.model),
           **{k: base[k] for k in ("perplexity", "nll_per_token", "bits_per_byte", "token_accuracy",
                                   "scored_tokens", "scored_bytes", "n_nonfinite_windows")},
           **{k: v for k, v in det.items() if k != "superweights"}, "superweights": det["superweights"],
           **(_perturbation(doc) if doc else dict.fromkeys(
               ("sw_delta_nll", "sw_delta_nll_ci95", "sw_ppl_ratio", "sw_collapsed", "random_delta_nll",
                "random_delta_nll_ci95", "random_ppl_ratio", "random_collapsed", "sw_over_random"))),
           "magnitude_top_share": tail["share"], "magnitude_gini": tail["gini"], "tail_weights": tail["n_weights"],
           "data": {k: bench.info[k] for k in ("dataset", "bos", "n_windows", "scored_tokens", "seed_invariant")},
           "fingerprint": fp.to_dict(), "notes": notes, "wall_seconds": time.perf_counter() - start}
    return row, doc, arrays


# ---- the ladder --------------------------------------------------------------------------------------------

def check_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Refuse a non-empty directory unless ``overwrite`` — and even then one that holds no scaling run."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EsaError(f"--out-dir {out_dir} is a file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise EsaError(f"{out_dir} exists and is not empty; choose another --out-dir or pass --overwrite")
        if not (out_dir / "scaling.json").exists():
            raise EsaError(f"refusing to replace {out_dir}: it holds no scaling.json; choose an empty or new "
                           "--out-dir")
    return out_dir


def _slug(name: str) -> str:
    from esa.baseline import model_slug

    return model_slug(name)


def measure_ladder(cfg: ScalingConfig, stage: Path | None = None) -> list[dict]:
    """Load each model once, in order, and measure it; per-model perturbation files go under ``stage``."""
    rows = []
    for name in cfg.models:
        log.info("scaling: %s", name)
        lm = load_model(ModelSpec(name, cfg.dtype, cfg.device))
        row, doc, arrays = measure_model(lm, cfg)
        if doc is not None and stage is not None:
            rel = Path("models") / _slug(name)
            (stage / rel).mkdir(parents=True, exist_ok=True)
            write_json(stage / rel / "perturb.json", doc)
            write_arrays(stage / rel / "perturb.npz", **arrays)
            row["perturb_file"] = str(rel / "perturb.json")
        rows.append(row)
        del lm, doc, arrays  # free this model before the next (larger) one loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def run_scaling(cfg: ScalingConfig, out_dir, overwrite: bool = False) -> tuple[Path, dict]:
    """Measure the ladder, fit the trends, write scaling.json and the plots; returns ``(out_dir, document)``.

    Every model's source is resolved before any is measured, so an unavailable hub model fails in seconds
    instead of after the smaller ones ran.
    """
    from esa.report.scaling_plots import plot_scaling

    cfg.check()
    out_dir = check_out_dir(Path(out_dir), overwrite)
    for name in cfg.models:
        resolve_source(name)
    start = time.perf_counter()
    with staged_run_dir(out_dir, overwrite=True) as stage:
        rows = measure_ladder(cfg, stage)
        fits = fit_trends(rows, cfg.x_axis)
        doc = {"schema": SCHEMA, "provenance": provenance(resolve_device(cfg.device)), "config": asdict(cfg),
               "x_axis": cfg.x_axis, "tail_fraction": cfg.tail_fraction,
               "statistics": {s.key: {"label": s.label, "higher_is_better": s.higher_is_better}
                              for s in STATISTICS},
               "rows": rows, "fits": fits, "notes": _ladder_notes(rows, fits),
               "wall_seconds": time.perf_counter() - start}
        write_json(stage / "scaling.json", doc)
        plot_scaling(doc, stage)
    return out_dir, doc


def _ladder_notes(rows: list[dict], fits: dict) -> list[str]:
    notes = []
    if len(rows) < 2:
        notes.append(f"{len(rows)} model: no trend can be fitted (need ≥ 2 models)")
    elif len(rows) == 2:
        notes.append("2 models: each fitted line passes through both points; slope CIs are undefined")
    families = {r["fingerprint"]["model_type"] for r in rows}
    if len(families) > 1:
        notes.append(f"mixed families ({', '.join(sorted(families))}): tokenizers differ, compare bits_per_byte, "
                     "not perplexity")
    return notes

