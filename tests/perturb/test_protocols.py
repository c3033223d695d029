"""The perturbation protocols (esa.perturb.protocols) on tiny models, checked against manual computations,
plus one integration test on the embedded SmolLM2: its super weights beat a size-matched random control."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pandas as pd
import pytest
import torch

from esa.core.errors import EsaError
from esa.evals.perplexity import evaluate_windows
from esa.perturb import from_coordinates, from_ranking, make_op, perturbed
from esa.perturb.protocols import (BitscanConfig, DoseConfig, EvalConfig, PerturbConfig, bitscan_experiment,
                                   dose_experiment, make_bench, perturb_experiment)
from esa.sensitivity.ranking import COLUMNS, floor_path
from esa.stats import per_window_delta, perplexity
from helpers.models import tiny_loaded

DOWN = "model.layers.1.mlp.down_proj.weight"  # tiny Llama: (out 64, in 128)
RTOL = 1e-5  # prefix-cache replay vs a full forward in other micro-batches


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_loaded(tokenizer, seed=3)


@pytest.fixture(scope="module")
def data(corpus):
    return EvalConfig(dataset=corpus, context_len=32, max_eval_tokens=31 * 8, seed=1, n_boot=500,
                      collapse_ppl=1e12)


@pytest.fixture(scope="module")
def ranking(lm, tmp_path_factory):
    """A magnitude ranking (score = |W|) of one tensor, in the ranking-table format of esa sensitivity."""
    w = lm.model.get_parameter(DOWN).detach()
    rows, cols = np.unravel_index(np.arange(w.numel()), tuple(w.shape))
    table = pd.DataFrame({"param": DOWN, "layer": 1, "role": "mlp_down", "row": rows, "col": cols,
                          "score": w.abs().reshape(-1).numpy().astype(np.float64),
                          "weight": w.reshape(-1).numpy(), "rank": np.arange(1, w.numel() + 1)})[COLUMNS]
    path = tmp_path_factory.mktemp("ranking") / "ranking.csv"
    table.to_csv(path, index=False)
    table.to_parquet(floor_path(path))  # the whole tensor: its own floor (bottom_k's per-tensor lowest scores)
    return path, table


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_restored(model, snap):
    assert all(torch.equal(p.detach(), snap[n]) for n, p in model.named_parameters())


def _manual_nll(lm, windows, targets=None, op=None):
    """Full-forward per-window NLLs, optionally under one perturbation (the reference path)."""
    pad = lm.tokenizer.pad_token_id or 0
    if targets is None:
        return evaluate_windows(lm.model, windows, pad, 4096).nll
    with perturbed(lm.model, targets, op):
        return evaluate_windows(lm.model, windows, pad, 4096).nll


def test_target_vs_controls_matches_manual_trials(lm, data, ranking):
    path, table = ranking
    snap = _snapshot(lm.model)
    cfg = PerturbConfig(targets=f"topk:{path}:6", op="zero", controls=("random_k", "bottom_k"),
                        control_seeds=(0, 1), data=data)
    doc, arrays = perturb_experiment(lm, cfg)
    _assert_restored(lm.model, snap)
    windows = make_bench(lm, data).windows
    np.testing.assert_allclose(arrays["baseline_nll"], _manual_nll(lm, windows), rtol=RTOL)
    top = from_ranking(lm.model, table, 6)
    np.testing.assert_allclose(arrays["target_nll"], _manual_nll(lm, windows, top, make_op("zero")), rtol=RTOL)
    np.testing.assert_allclose(arrays["delta__target_vs_baseline"],
                               per_window_delta(arrays["baseline_nll"], arrays["target_nll"], arrays["n_scored"]))
    arms = {a["name"]: a for a in doc["arms"]}
    top_flat = set(top[DOWN].tolist())
    rand = {(e["param"], e["flat"]) for e in arms["random_k"]["elements"]}
    assert len(rand) == 6 and all(p == DOWN and f not in top_flat for p, f in rand)
    assert arms["random_k"]["seeds"] == [0, 1] and len(arms["random_k"]["trials"]) == 2
    assert arrays["random_k_nll_per_seed"].shape == (2, len(windows))
    np.testing.assert_allclose(arrays["random_k_nll"], arrays["random_k_nll_per_seed"].mean(0))
    bottom = from_ranking(lm.model, table, 6, bottom=True)
    assert {e["flat"] for e in arms["bottom_k"]["elements"]} == set(bottom[DOWN].tolist())
    assert all(t["start_layer"] == 1 and not t["full_forward"] for a in arms.values() for t in a["trials"])
    comps = {c["name"]: c for c in doc["comparisons"]}
    assert set(comps) == {"target vs baseline", "random_k vs baseline", "bottom_k vs baseline",
                          "target vs random_k", "random_k vs bottom_k"}
    for c in comps.values():
        assert c["p_wilcoxon_holm"] >= c["p_wilcoxon"] - 1e-15 or np.isnan(c["p_wilcoxon"])
        assert c["p_wilcoxon_bh"] <= c["p_wilcoxon_holm"] + 1e-15 or np.isnan(c["p_wilcoxon"])
    sep = doc["separation"]
    assert sep["target_over_random"] == pytest.approx(comps["target vs baseline"]["mean_delta_nll"]
                                                      / comps["random_k vs baseline"]["mean_delta_nll"])
    assert doc["schema"] == "esa.perturb/1" and doc["data"]["n_windows"] == len(windows)


def test_dose_response_identity_is_exactly_zero_and_zero_matches_perturb(lm, data):
    spec = f"rows:{DOWN}:0-1"
    doc, arrays = dose_experiment(lm, DoseConfig(targets=spec, op="scale", values=("0", "1.0", "3"),
                                                 control_seeds=(0, 1), data=data))
    rows = {r["value"]: r for r in doc["rows"]}
    assert set(rows) == {0, 1, 3} and doc["parameter"] == "factor"
    for arm in ("target", "random_k"):
        assert rows[1][arm]["mean_delta_nll"] == 0.0 and rows[1][arm]["delta_nll_per_token"] == 0.0
        assert all(t["n_changed"] == 0 for t in rows[1][f"{arm}_trials"])
        assert rows[3][arm]["mean_delta_nll"] != 0.0
    assert not np.any(arrays["delta__target_factor_1_0"])
    zero, zero_arrays = perturb_experiment(lm, PerturbConfig(targets=spec, op="zero", controls=(), data=data))
    np.testing.assert_allclose(arrays["target_nll__0"][0], zero_arrays["target_nll"], rtol=1e-12)


def test_dose_response_stochastic_op_repeats_per_seed(lm, data):
    doc, _ = dose_experiment(lm, DoseConfig(targets=f"cols:{DOWN}:5", op="gauss_noise:relative_to=tensor_std",
                                            values=("0", "0.5"), control_seeds=(4, 5), data=data))
    sigma0, sigma = doc["rows"]
    assert [t["seed"] for t in sigma["target_trials"]] == [4, 5]
    assert sigma0["target"]["mean_delta_nll"] == 0.0 and sigma["target"]["mean_delta_nll"] != 0.0
    assert sigma["op"] == {"op": "gauss_noise", "sigma": 0.5, "relative_to": "tensor_std"}
    assert sigma["target_seeds"]["n"] == 2


def test_dose_response_over_bit_positions_is_categorical(lm, data, tmp_path):
    from esa.perturb.plots import plot_dose_response

    doc, _ = dose_experiment(lm, DoseConfig(targets=f"{DOWN}[3,7]", op="bit_flip", values=("sign", "22"),
                                            control_seeds=(0,), data=data))
    assert [r["op"] for r in doc["rows"]] == [{"op": "bit_flip", "bit": "sign"}, {"op": "bit_flip", "bit": 22}]
    assert all(r["target_trials"][0]["n_changed"] == 1 for r in doc["rows"])
    assert plot_dose_response(doc, tmp_path / "bits.png").stat().st_size > 0


def _bitscan(lm, data, collapse_ppl, **kw):
    cfg = BitscanConfig(targets=f"{DOWN}[3,7];{DOWN}[10,100]", top_n=2,
                        bits=("sign", "mantissa_msb", "exponent_lsb"), max_flips=2, greedy_pool=6,
                        data=EvalConfig(**{**data.__dict__, "collapse_ppl": collapse_ppl}), **kw)
    return bitscan_experiment(lm, cfg)


def test_bitscan_cells_and_greedy_match_manual_flips(lm, data):
    snap = _snapshot(lm.model)
    doc, arrays = _bitscan(lm, data, 1e12)
    _assert_restored(lm.model, snap)
    windows = make_bench(lm, data).windows
    base = _manual_nll(lm, windows)
    n = arrays["n_scored"]
    weights = doc["weights"]
    assert [(w["row"], w["col"]) for w in weights] == [(3, 7), (10, 100)]
    for cell in doc["cells"]:
        w = weights[cell["weight"]]
        ts = from_coordinates(lm.model, [(w["param"], w["row"], w["col"])])
        manual = per_window_delta(base, _manual_nll(lm, windows, ts, make_op("bit_flip", bit=cell["bit"])), n)
        assert cell["mean_delta_nll"] == pytest.approx(manual.mean(), rel=1e-4, abs=1e-7)
        old = torch.tensor([w["value"]])
        assert cell["value_after"] == float(torch.bitwise_xor(old.view(torch.int32), 1 << cell["bit"]
                                                              if cell["bit"] < 31 else -(1 << 31)).view(torch.float32))
    g = doc["greedy"]
    assert not g["collapsed"] and len(g["steps"]) == 2 and g["extra_trials"] == 5  # pool 6, one chosen
    totals = arrays["flip_nll"].sum(axis=1)
    first = g["steps"][0]
    assert (first["weight"], first["bit"]) == (doc["cells"][int(np.argmax(totals))]["weight"],
                                               doc["cells"][int(np.argmax(totals))]["bit"])
    with ExitStack() as stack:
        for s in g["steps"]:
            w = weights[s["weight"]]
            ts = from_coordinates(lm.model, [(w["param"], w["row"], w["col"])])
            stack.enter_context(perturbed(lm.model, ts, make_op("bit_flip", bit=s["bit"])))
        both = evaluate_windows(lm.model, windows, lm.tokenizer.pad_token_id or 0, 4096).nll
    assert g["steps"][1]["ppl"] == pytest.approx(perplexity(both, n), rel=1e-5)
    _assert_restored(lm.model, snap)

    ppl1, ppl2 = g["steps"][0]["ppl"], g["steps"][1]["ppl"]
    assert ppl2 > ppl1 > perplexity(base, n)  # precondition for the thresholds below
    two, _ = _bitscan(lm, data, (ppl1 + ppl2) / 2)
    assert two["greedy"]["collapsed"] and two["greedy"]["n_flips"] == 2 and not two["greedy"]["exact_minimum"]
    assert two["greedy"]["flips"] == [s["flip"] for s in g["steps"]]
    one, _ = _bitscan(lm, data, (perplexity(base, n) + ppl1) / 2)
    assert one["greedy"]["n_flips"] == 1 and one["greedy"]["exact_minimum"] and one["greedy"]["extra_trials"] == 0


@pytest.mark.parametrize("make, message", [
    (lambda d: PerturbConfig(targets=f"{DOWN}[0,0]", op="zeroo", data=d), "unknown perturbation op 'zeroo'"),
    (lambda d: PerturbConfig(targets=f"{DOWN}[0,0]", controls=("random",), data=d), "unknown control 'random'"),
    (lambda d: PerturbConfig(targets=f"{DOWN}[0,0]", controls=("bottom_k",), data=d), "needs a ranking"),
    (lambda d: PerturbConfig(targets="superweight", controls=("random_k",), data=d), "Did you mean 'superweights'"),
    (lambda d: PerturbConfig(targets="topk:ranking.csv", data=d), "topk:<ranking file>:<k>"),
    (lambda d: PerturbConfig(targets="superweights", controls=("random_k",), data=d), "no super-weight candidates"),
    (lambda d: PerturbConfig(targets=f"{DOWN}[99,0]", controls=("random_k",), data=d), "out of range"),
])
def test_perturb_bad_input(lm, data, make, message):
    with pytest.raises(EsaError, match=message.replace("(", r"\(").replace("[", r"\[")):
        perturb_experiment(lm, make(data))


@pytest.mark.parametrize("cfg, message", [
    (DoseConfig(targets=f"{DOWN}[0,0]", op="zero"), "no dose parameter"),
    (DoseConfig(targets=f"{DOWN}[0,0]", op="bit_flip", values=("exponent_top",)), "cannot read bit"),
    (BitscanConfig(targets=f"{DOWN}[0,0]", bits=("sign", "31")), "same torch.float32 bit twice"),
    (BitscanConfig(targets=f"{DOWN}[0,0]", bits=("sgn",)), "cannot read bit 'sgn'"),
])
def test_dose_and_bitscan_bad_input(lm, data, cfg, message):
    run = dose_experiment if isinstance(cfg, DoseConfig) else bitscan_experiment
    with pytest.raises(EsaError, match=message):
        run(lm, type(cfg)(**{**cfg.__dict__, "data": data}))


def test_smollm2_super_weights_beat_random_control(smol):
    """Zeroing SmolLM2's super weights hurts far more than zeroing as many random weights of the same tensors."""
    snap = _snapshot(smol.model)
    cfg = PerturbConfig(targets="superweights", op="zero", controls=("random_k",), control_seeds=(0,),
                        data=EvalConfig(context_len=64, max_eval_tokens=63 * 8, n_boot=2000))
    doc, _ = perturb_experiment(smol, cfg)
    _assert_restored(smol.model, snap)
    comps = {c["name"]: c for c in doc["comparisons"]}
    contrast = comps["target vs random_k"]
    assert doc["targets"]["kind"] == "superweights" and doc["targets"]["superweights"]
    assert contrast["mean_delta_nll"] > 0 and contrast["ci_low"] > 0 and contrast["p_wilcoxon"] < 0.05
    assert comps["target vs baseline"]["mean_delta_nll"] > comps["random_k vs baseline"]["mean_delta_nll"]
    assert doc["data"]["n_windows"] == 8


def test_magnitude_bottom_k_skips_zeros_and_targets(lm):
    from esa.perturb.protocols.choose import _magnitude_matched

    w = lm.model.get_parameter(DOWN).detach().reshape(-1)
    order = torch.argsort(w.abs())
    targets = from_coordinates(lm.model, [(DOWN, int(order[0]) // 128, int(order[0]) % 128)])  # the smallest
    zeroed = {DOWN: order[1:3]}  # the next two become exact zeros: a no-op control if chosen
    with perturbed(lm.model, zeroed, make_op("zero")):
        bottom = _magnitude_matched(lm.model, targets.union({DOWN: order[3:4]}), largest=False)
    assert bottom[DOWN].tolist() == sorted(order[4:6].tolist())


def test_largest_k_is_each_tensors_largest_magnitude_non_targets(lm, data):
    """largest_k vs a brute-force sort: per target tensor, as many of the largest |W| as it holds targets, none
    of them a target (the largest weight itself is a target here, so it must be skipped)."""
    from esa.perturb.protocols.choose import largest_k
    from esa.perturb.protocols.common import make_bench

    up = "model.layers.0.mlp.up_proj.weight"
    picks = []
    for name, n in ((DOWN, 3), (up, 2)):
        flat = torch.argsort(lm.model.get_parameter(name).detach().abs().reshape(-1), descending=True)
        cols = lm.model.get_parameter(name).shape[1]
        picks += [(name, int(i) // cols, int(i) % cols) for i in flat[[0, 5, 9][:n]]]
    targets = from_coordinates(lm.model, picks)
    bench = make_bench(lm, data)
    res = type("R", (), {"targets": targets})()
    ts, how = largest_k(bench, res)
    for name, idx in targets.items():
        mag = lm.model.get_parameter(name).detach().abs().reshape(-1).clone()
        mag[idx] = -1.0
        want = torch.argsort(mag, descending=True)[: len(idx)]
        assert sorted(ts[name].tolist()) == sorted(want.tolist()) and not set(ts[name].tolist()) & set(idx.tolist())
    assert "largest-|W|" in how


def test_dose_ops_keep_float_values_from_library_callers():
    from esa.perturb.protocols import dose_ops

    param, ops = dose_ops("scale", (0.0, 0.5, 1, 2.25))
    assert param == "factor"
    assert [op.params()["factor"] for op in ops] == [0.0, 0.5, 1, 2.25]


def test_bottom_k_alone_needs_no_random_arm(lm, data, ranking):
    path, _ = ranking
    cfg = PerturbConfig(targets=f"topk:{path}:6", op="zero", controls=("bottom_k",), data=data)
    doc, _ = perturb_experiment(lm, cfg)
    assert [c["name"] for c in doc["comparisons"]] == ["target vs baseline", "bottom_k vs baseline"]
    assert doc["separation"] == {"target_over_random": None, "random_over_bottom": None}
