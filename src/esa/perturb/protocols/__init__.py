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

Each protocol returns ``(document, arrays)``. The run kinds ``perturbation``, ``dose_response`` and ``bitscan``
store them (the document beside the row as its ``protocol`` document); the commands ``esa perturb``,
``esa dose-response`` and ``esa bitscan`` run one-off studies of those kinds and export in ``<out-dir>``:

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
controls), :mod:`.experiments` (protocols 1 and 2), :mod:`.bitscan` (protocol 3). Plots:
:mod:`esa.perturb.plots`; CLI: :mod:`esa.commands.perturb`.
"""

from __future__ import annotations

from esa.perturb.protocols.bitscan import bitscan_experiment, greedy_collapse
from esa.perturb.protocols.choose import Resolved, parse_controls, resolve_targets
from esa.perturb.protocols.common import (CONTROLS, DOSE_PARAM, STOCHASTIC_OPS, Arm, Bench, BitscanConfig,
                                          DoseConfig, EvalConfig, PerturbConfig, adjust, build_cache, compare,
                                          make_bench, trial)
from esa.perturb.protocols.experiments import dose_experiment, dose_ops, perturb_experiment

__all__ = [
    "CONTROLS", "DOSE_PARAM", "STOCHASTIC_OPS", "Arm", "Bench", "BitscanConfig", "DoseConfig", "EvalConfig",
    "PerturbConfig", "Resolved", "adjust", "bitscan_experiment", "build_cache", "compare", "dose_experiment",
    "dose_ops", "greedy_collapse", "make_bench", "parse_controls", "perturb_experiment", "resolve_targets",
    "trial",
]
