"""The bit scan's predicted-first order (BitscanConfig.order = "predicted"): the flips it measures have exactly
the listed scan's numbers, the rest are marked unmeasured with their predictions, the stop is recorded with
its bound, the greedy search draws from the flips predicted worst, and every weight is restored."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from esa.perturb.protocols import BitscanConfig, EvalConfig, bitscan_experiment
from helpers.models import tiny_loaded

DOWN = "model.layers.1.mlp.down_proj.weight"


def test_predicted_first_scan_measures_a_subset_with_the_listed_numbers(tokenizer, corpus):
    lm = tiny_loaded(tokenizer, seed=3)
    data = EvalConfig(dataset=corpus, context_len=32, max_eval_tokens=31 * 3, seed=1, n_boot=200)
    listed_cfg = BitscanConfig(f"rows:{DOWN}:3", 20, ("sign", "exponent_msb", "exponent_lsb", "mantissa_msb"), 2, 8,
                               data)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    listed, _ = bitscan_experiment(lm, listed_cfg)
    predicted, arrays = bitscan_experiment(lm, dataclasses.replace(listed_cfg, order="predicted", screen_n=3,
                                                                   calib_flips=8))
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    s = predicted["screening"]
    assert s["order"] == "predicted" and s["n_candidates"] == 80 and s["calibration_flips"] == 8
    assert s["bound_kind"] and s["stop"] and 8 + 3 <= s["n_measured"] <= 80
    by_label = {c["label"]: c for c in listed["cells"]}
    measured = [c for c in predicted["cells"] if c["measured"]]
    assert len(measured) >= s["n_measured"]  # + greedy candidates measured alone
    for c in predicted["cells"]:
        assert "predicted_delta_nll_per_token" in c and c["regime"] in ("taylor", "large", "nonfinite")
        if c["measured"]:
            assert c["mean_delta_nll"] == by_label[c["label"]]["mean_delta_nll"] or (
                math.isnan(c["mean_delta_nll"]) and math.isnan(by_label[c["label"]]["mean_delta_nll"]))
        else:
            assert math.isnan(c["mean_delta_nll"]) and not c["collapsed"]
    unmeasured_rows = [i for i, c in enumerate(predicted["cells"]) if not c["measured"]]
    assert np.isnan(arrays["flip_nll"][unmeasured_rows]).all()
    greedy = predicted["greedy"]
    assert greedy["pool_size"] <= 8 and all(f in {c["label"] for c in measured} for f in greedy["flips"])
