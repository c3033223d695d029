"""Perturbation protocols: a target set against size-matched controls, dose-response curves, bit scans.

Every protocol follows one recipe (DESIGN.md, "paired comparisons"):

1. Cut the corpus into ``chunks`` windows of ``context_len`` tokens; ``seed`` picks ≈ ``max_eval_tokens``
   scored tokens of them. These W windows are fixed for the whole run: baseline and every trial see them.
2. Resolve the target spec (:func:`resolve_targets`) and build the controls: ``random_k`` — per control
   seed, as many random elements of the same tensors, none of the targets; ``bottom_k`` — the k
   lowest-scoring rows of a ranking, or, for super weights without a ranking, the k smallest non-zero |W|
   of the same tensors.
3. Build a :class:`~esa.perturb.prefix_cache.PrefixCache` at every trial's first perturbed layer; its build
   run is the unperturbed baseline. A trial applies the op inside ``perturbed`` (the only writer of weights,
   bit-exact restore) and re-runs only the layers from the first perturbed one (a full forward otherwise).
4. Compare per-window NLLs with :func:`esa.stats.paired_compare` — each arm vs the baseline, plus the
   contrasts ``target vs random_k`` and ``random_k vs bottom_k`` (same windows, so still paired) — and adjust
   the run's p-values (Wilcoxon and t-test) with Holm and Benjamini-Hochberg.

An *arm* is one perturbed condition. Its repeats — control seeds for ``random_k``, noise seeds for a
stochastic op (gauss_noise, uniform_noise, random_bit_flip) — are averaged per window before comparing, so an
arm gives one (W,) NLL vector; per-seed results are kept too. Example: zero SmolLM2's super weights with
``--controls random_k,bottom_k --control-seeds 0 1 2`` → arms target (1 trial), random_k (3), bottom_k (1).

Outputs in ``<out-dir>`` (replaced as a whole, only when the run succeeds):

* ``<stem>.json`` — schema ``esa.perturb/1`` | ``esa.dose_response/1`` | ``esa.bitscan/1``: provenance, model
  fingerprint, resolved config, data (windows, seed, prefix cache), baseline metrics, notes, then
  perturb: targets, arms (op, elements, trial records, seed spread), comparisons (paired statistics with Holm
  and BH p-values), separation ``{target_over_random, random_over_bottom}`` (quotients of mean ΔNLL: read them
  with the CIs, a control with ΔNLL ≈ 0 or < 0 makes them huge or negative);
  dose-response: parameter, rows ``[{value, op, target, random_k, *_seeds, *_trials}]``;
  bitscan: weights, bits, cells (one per weight × bit), greedy. Non-finite numbers are "nan"/"inf" strings.
* ``<stem>.npz`` — window_index, n_scored, baseline_nll (W,), each arm's NLLs, and each comparison's per-window
  ΔNLL ``delta__<name>``.
* ``<stem>.png`` — bars (perturb), curves with CI bands (dose-response), heat map (bitscan).

Layout: :mod:`.common` (configs, fixed windows, one trial, arms, statistics), :mod:`.choose` (target specs and
controls), :mod:`.experiments` (protocols 1 and 2), :mod:`.bitscan` (protocol 3); this module writes run
directories. Plots: :mod:`esa.perturb.plots`; CLI: :mod:`esa.commands.perturb`.
"""

from __future__ import annotations

from pathlib import Path

from esa.models import ModelSpec, load_model
from esa.perturb.ops import parse_op
from esa.perturb.protocols.bitscan import bitscan_experiment, greedy_collapse
from esa.perturb.protocols.choose import Resolved, check_controls, parse_controls, resolve_targets
from esa.perturb.protocols.common import (CONTROLS, DOSE_PARAM, STOCHASTIC_OPS, Arm, Bench, BitscanConfig,
                                          DoseConfig, EvalConfig, PerturbConfig, adjust, build_cache, compare,
                                          make_bench, trial)
from esa.perturb.protocols.experiments import dose_experiment, dose_ops, perturb_experiment
from esa.runs import check_out_dir as check_owned_out_dir
from esa.runs import staged_run_dir, write_arrays, write_json

__all__ = [
    "CONTROLS", "DOSE_PARAM", "STOCHASTIC_OPS", "Arm", "Bench", "BitscanConfig", "DoseConfig", "EvalConfig",
    "PerturbConfig", "Resolved", "adjust", "bitscan_experiment", "build_cache", "compare", "dose_experiment",
    "dose_ops", "greedy_collapse", "make_bench", "parse_controls", "perturb_experiment", "resolve_targets",
    "run_bitscan", "run_dose_response", "run_perturb", "trial",
]

RESULT_FILES = ("perturb.json", "dose_response.json", "bitscan.json")  # what --overwrite may replace


def check_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Refuse a non-empty directory unless ``overwrite`` — and even then one holding no ESA perturbation run."""
    return check_owned_out_dir(out_dir, overwrite, RESULT_FILES, "perturb/dose-response/bitscan")


def _run(spec: ModelSpec, out_dir, overwrite: bool, experiment, cfg, stem: str, plot) -> Path:
    out_dir = check_out_dir(Path(out_dir), overwrite)
    with staged_run_dir(out_dir, overwrite=True) as stage:
        doc, arrays = experiment(load_model(spec), cfg)
        plot(doc, stage / f"{stem}.png")
        write_arrays(stage / f"{stem}.npz", **arrays)
        write_json(stage / f"{stem}.json", doc)
    return out_dir


def run_perturb(spec: ModelSpec, cfg: PerturbConfig, out_dir, overwrite: bool = False) -> Path:
    """Load the model, run protocol 1, write perturb.json / perturb.npz / perturb.png; returns the run dir."""
    from esa.perturb.plots import plot_perturb

    parse_op(cfg.op)  # fail before loading anything
    check_controls(cfg)
    return _run(spec, out_dir, overwrite, perturb_experiment, cfg, "perturb", plot_perturb)


def run_dose_response(spec: ModelSpec, cfg: DoseConfig, out_dir, overwrite: bool = False) -> Path:
    """Load the model, run protocol 2, write dose_response.{json,npz,png}; returns the run dir."""
    from esa.perturb.plots import plot_dose_response

    dose_ops(cfg.op, cfg.values)  # fail before loading anything
    return _run(spec, out_dir, overwrite, dose_experiment, cfg, "dose_response", plot_dose_response)


def run_bitscan(spec: ModelSpec, cfg: BitscanConfig, out_dir, overwrite: bool = False) -> Path:
    """Load the model, run protocol 3, write bitscan.{json,npz,png}; returns the run dir."""
    from esa.perturb.plots import plot_bitscan

    return _run(spec, out_dir, overwrite, bitscan_experiment, cfg, "bitscan", plot_bitscan)

