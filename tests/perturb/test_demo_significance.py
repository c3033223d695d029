"""The demo's perturbation (studies/demo.yaml, target ``superweights``) separates SmolLM2's super weights from
the controls.

Run on the embedded SmolLM2 with the demo study's settings — super weights zeroed vs size-matched random_k
(seeds 0, 1, 2) and bottom_k — on 16 windows of 64 tokens (~20 s on one core).

Which test: the Wilcoxon signed-rank test, exact for n = 16 (scipy's default for n ≤ 50 without ties), is
distribution-free; the per-window ΔNLL of a collapse is far from normal, which the paired t-test assumes. With
16 windows its smallest two-sided p-value is 2 / 2¹⁶ ≈ 3.1e-5 (every window moves the same way), so p < 0.01
survives Holm's correction over the run's 5 comparisons (×5 at most). With 8 windows it could not: the minimum
would be 2 / 2⁸ ≈ 7.8e-3, ≈ 0.039 after Holm.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from esa.commands.demo import DEMO_STUDY
from esa.perturb.protocols import EvalConfig, PerturbConfig, perturb_experiment
from esa.study import load_study


def test_demo_super_weights_significant_and_random_control_not(smol):
    section = load_study(DEMO_STUDY).section("perturbation")
    assert section.controls == ("random_k", "bottom_k", "largest_k") and section.trials == 3  # what the demo runs
    data = EvalConfig("python-docs", context_len=64, max_eval_tokens=63 * 16, seed=0, n_boot=2000)
    cfg = PerturbConfig("superweights", "zero", section.controls, control_seeds=tuple(range(section.trials)))
    doc, arrays = perturb_experiment(smol, replace(cfg, data=data))
    comps = {c["name"]: c for c in doc["comparisons"]}
    assert doc["data"]["n_windows"] == 16 and len(comps) == 7
    assert {a["name"] for a in doc["arms"]} == {"target", "random_k", "bottom_k", "largest_k"}
    largest = comps["target vs largest_k"]  # as many of the largest non-super weights hurt far less
    assert largest["mean_delta_nll"] > 0 and largest["p_wilcoxon_holm"] < 0.01, largest

    target, random = comps["target vs baseline"], comps["random_k vs baseline"]
    assert target["mean_delta_nll"] > 0 and target["ci_low"] > 0
    assert target["p_wilcoxon_holm"] < 0.01
    assert comps["target vs random_k"]["p_wilcoxon_holm"] < 0.01
    assert np.all(arrays["delta__target_vs_baseline"] > 0)  # why p reaches the exact minimum 2 / 2**16
    assert random["p_wilcoxon"] > 0.05 and random["p_wilcoxon_holm"] > 0.05  # unadjusted too: the stricter one
    assert random["ci_low"] <= 0 <= random["ci_high"]
