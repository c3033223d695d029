"""Scaling studies (esa.scaling.fits): log–log fits against numpy/scipy, and offline ladders run end to end —
a 1-model SmolLM2 ladder checked against direct computations, and a 2-point ladder (SmolLM2 + a tiny random
Llama saved to disk) that exercises the fits and the plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from esa.cli import main
from esa.core.errors import EsaError
from esa.perturb.protocols import EvalConfig
from esa.core.files import read_json
from esa.scaling.fits import STATISTICS, ScalingConfig, fit_power_law, fit_trends
from esa.scaling.ladder import run_scaling

TINY_DATA = dict(max_eval_tokens=254, calib_samples=2, n_boot=200)  # 2 windows of 128 tokens
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- fits --------------------------------------------------------------------------------------------------

def test_fit_recovers_an_exact_power_law():
    x = np.logspace(7, 10, 5)
    fit = fit_power_law(x, 3.0 * x ** -0.25)
    assert fit.slope == pytest.approx(-0.25, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log10(3.0), abs=1e-10)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.slope_ci95[1] - fit.slope_ci95[0] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(fit.predict(x), 3.0 * x ** -0.25, rtol=1e-10)


def test_fit_matches_numpy_and_scipy_on_a_noisy_power_law():
    rng = np.random.default_rng(0)
    x = np.logspace(7.5, 10, 8)
    y = 50.0 * x ** -0.1 * 10 ** rng.normal(0, 0.05, size=x.size)  # log10-normal scatter
    fit = fit_power_law(x, y)
    lx, ly = np.log10(x), np.log10(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    ref = sps.linregress(lx, ly)
    assert fit.n == 8
    assert fit.slope == pytest.approx(slope, rel=1e-10) == pytest.approx(ref.slope, rel=1e-10)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10)
    assert fit.slope_se == pytest.approx(ref.stderr, rel=1e-10)
    assert fit.intercept_se == pytest.approx(ref.intercept_stderr, rel=1e-10)
    assert fit.r2 == pytest.approx(ref.rvalue ** 2, rel=1e-10)
    half = sps.t.ppf(0.975, 6) * ref.stderr
    np.testing.assert_allclose(fit.slope_ci95, [ref.slope - half, ref.slope + half], rtol=1e-10)


def test_two_points_fit_exactly_and_leave_the_ci_undefined():
    fit = fit_power_law([1e8, 1e9], [20.0, 10.0])  # the module docstring's worked example
    assert fit.slope == pytest.approx(math.log10(0.5))
    assert fit.intercept == pytest.approx(math.log10(20.0) - 8 * math.log10(0.5))
    assert fit.slope_ci95 is None and fit.slope_se is None and fit.intercept_se is None
    assert "CI undefined" in fit.note


@pytest.mark.parametrize("x, y, match", [
    ([1e8], [20.0], "at least 2 points"),
    ([1e8, 1e9], [20.0, -1.0], "at least 2 points"),  # a negative value cannot sit on a log axis
    ([1e8, 1e9, 1e10], [np.nan, 3.0, np.inf], "at least 2 points"),
    ([1e8, 1e8], [20.0, 10.0], "same parameter count"),
])
def test_fit_refuses_what_it_cannot_fit(x, y, match):
    with pytest.raises(EsaError, match=match):
        fit_power_law(x, y)


def test_fit_trends_names_the_models_it_leaves_out():
    rows = [{"model": "a", "n_params": 1e8, "perplexity": 30.0, "random_delta_nll": -1e-4},
            {"model": "b", "n_params": 1e9, "perplexity": 15.0, "random_delta_nll": 2e-4},
            {"model": "c", "n_params": 1e10, "perplexity": 9.0, "random_delta_nll": None}]
    fits = fit_trends(rows)
    assert set(fits) == {s.key for s in STATISTICS}
    assert fits["perplexity"]["fit"]["n"] == 3 and fits["perplexity"]["excluded"] == []
    assert fits["random_delta_nll"]["fit"] is None
    assert fits["random_delta_nll"]["excluded"] == ["a", "c"]
    assert "at least 2 points" in fits["random_delta_nll"]["reason"]


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(EsaError, match="more than once"):
        ScalingConfig(("smollm2-135m", "smollm2-135m")).check()
    with pytest.raises(EsaError, match="x-axis"):
        ScalingConfig(("smollm2-135m",), x_axis="flops").check()
    (tmp_path / "other.txt").write_text("not a scaling run")
    with pytest.raises(EsaError, match="holds no scaling.json"):
        run_scaling(ScalingConfig(("smollm2-135m",)), tmp_path, overwrite=True)


def test_an_unavailable_model_fails_before_any_model_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["scaling", "--models", "smollm2-135m", "esa-test/no-such-model", "--out-dir", str(out)])
    assert code == 2
    assert "esa-test/no-such-model" in capsys.readouterr().err
    assert not out.exists()


# ---- ladders -----------------------------------------------------------------------------------------------

def _top_share(model, fraction: float) -> float:
    """Share of Σ|W| in the top ⌈fraction·N⌉ |W| over the default-selected weights, computed directly."""
    from esa.sensitivity.scorers import select_params

    params = list(select_params(model).values())
    n = sum(p.numel() for p in params)
    m = math.ceil(fraction * n)
    tops = torch.cat([p.detach().abs().reshape(-1).topk(min(m, p.numel())).values for p in params])
    return float(tops.double().topk(m).values.sum() / sum(p.detach().abs().double().sum() for p in params))


def test_one_model_ladder_matches_direct_computations(smol, python_docs, tmp_path, capsys):
    from esa.evals.baseline import BaselineConfig, evaluate_cell
    from esa.evals.perplexity import evaluate_windows
    from esa.models import ModelSpec
    from esa.perturb import from_coordinates, make_op, perturbed
    from esa.perturb.protocols import make_bench
    from esa.sensitivity.superweights import find_super_weights
    from esa.stats import per_window_delta

    out = tmp_path / "smol"
    code = main(["scaling", "--models", "smollm2-135m", "--max-eval-tokens", "254", "--calib-samples", "2",
                 "--control-seeds", "0", "--n-boot", "200", "--out-dir", str(out)])
    assert code == 0 and "sw_delta_nll" in capsys.readouterr().out
    doc = read_json(out / "scaling.json")
    (row,) = doc["rows"]
    cell = evaluate_cell(smol, python_docs, BaselineConfig(ModelSpec(), max_eval_tokens=254, batch_tokens=4096),
                         128, 0, tmp_path / "cell")
    assert row["perplexity"] == pytest.approx(cell.metrics["perplexity"], rel=1e-6)
    assert row["bits_per_byte"] == pytest.approx(cell.metrics["bits_per_byte"], rel=1e-6)
    assert row["scored_tokens"] == cell.metrics["scored_tokens"]
    assert row["n_params"] == sum(p.numel() for p in smol.model.parameters())

    bench = make_bench(smol, EvalConfig(**TINY_DATA))
    report = find_super_weights(smol.model, bench.calib)
    assert row["superweights"] == [[w.layer, w.row, w.col] for w in report.candidates]
    assert row["sw_count"] == len(report.candidates) > 0
    top = max(report.candidates, key=lambda w: w.output_activation)
    assert row["sw_depth_fraction"] == pytest.approx(top.layer / smol.model.config.num_hidden_layers)

    arrays = np.load(tmp_path / "cell" / cell.per_window_file)
    assert arrays["window_index"].tolist() == bench.info["window_indices"]  # the same windows
    base = arrays["nll"]  # (W,) unperturbed, from esa.evals.baseline
    targets = from_coordinates(smol.model, [(w.param_name, w.row, w.col) for w in report.candidates])
    with perturbed(smol.model, targets, make_op("zero")):
        zeroed = evaluate_windows(smol.model, bench.windows, smol.tokenizer.eos_token_id, 4096).nll  # (W,)
    n = np.array([w.n_scored for w in bench.windows])
    assert row["sw_delta_nll"] == pytest.approx(per_window_delta(base, zeroed, n).mean(), rel=1e-4)
    assert row["sw_ppl_ratio"] == pytest.approx(math.exp((zeroed.sum() - base.sum()) / n.sum()), rel=1e-4)
    assert row["magnitude_top_share"] == pytest.approx(_top_share(smol.model, 0.001), rel=1e-6)

    assert doc["fits"]["perplexity"]["fit"] is None and "at least 2 points" in doc["fits"]["perplexity"]["reason"]
    assert (out / "models" / "smollm2-135m" / "perturb.json").is_file()
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC


def _killed_for_tiny_models(measure):
    """measure_model that dies on a 2-layer model: a ladder interrupted after its first model."""
    def wrapped(lm, cfg):
        if lm.model.config.num_hidden_layers == 2:
            raise RuntimeError("killed")
        return measure(lm, cfg)
    return wrapped


@pytest.mark.model  # the ladder measures the embedded SmolLM2
def test_two_point_ladder_fits_and_plots_end_to_end(tmp_path, tokenizer, monkeypatch):
    import esa.scaling.fits
    from esa.store import Store
    from esa.models.tiny import tiny_model

    tiny_dir = tmp_path / "tiny-llama"
    tiny_model("llama", seed=0).save_pretrained(tiny_dir)
    tokenizer.save_pretrained(tiny_dir)
    cfg = ScalingConfig(("smollm2-135m", str(tiny_dir)), EvalConfig(**TINY_DATA), control_seeds=(0,))
    with monkeypatch.context() as m:
        m.setattr(esa.scaling.fits, "measure_model", _killed_for_tiny_models(esa.scaling.fits.measure_model))
        with pytest.raises(EsaError, match="did not complete.*rerun the same command"):
            run_scaling(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "scaling.db").is_file() and not (tmp_path / "run" / "scaling.json").exists()
    events = []
    out, doc = run_scaling(cfg, tmp_path / "run", on_event=lambda kind, **info: events.append((kind, info)))
    assert [info["model"] for kind, info in events if kind == "skip_group"] == ["smollm2-135m"]  # not measured again
    assert [info["label"] for kind, info in events if kind == "run"] == [f"{tiny_dir} scaling point python-docs "
                                                                         "ctx=128 seed=0"]
    with Store(out / "scaling.db") as store:
        stored = {rid: json.loads(m) for rid, m in store.con.execute(
            "SELECT run_id, metrics FROM runs WHERE kind = 'scaling_point' AND status = 'completed'")}
    assert doc["run_ids"] == [rid for rid in doc["run_ids"] if rid in stored] and len(doc["run_ids"]) == 2
    for rid, row in zip(doc["run_ids"], read_json(out / "scaling.json")["rows"]):
        assert {k: v for k, v in row.items() if k != "perturb_file"} == \
            {k: v for k, v in stored[rid].items() if k != "perturbation"}  # scaling.json comes from the database
    small, big = sorted(doc["rows"], key=lambda r: r["n_params"])
    assert small["model"] == str(tiny_dir) and small["n_layers"] == 2
    for stat in STATISTICS:
        entry = doc["fits"][stat.key]
        usable = [r for r in doc["rows"] if isinstance(r[stat.key], (int, float)) and r[stat.key] > 0]
        if len(usable) < 2:
            assert entry["fit"] is None and entry["reason"]
            continue
        slope = (math.log10(big[stat.key]) - math.log10(small[stat.key])) / \
                (math.log10(big["n_params"]) - math.log10(small["n_params"]))
        assert entry["fit"]["slope"] == pytest.approx(slope, rel=1e-9)
        assert entry["fit"]["slope_ci95"] is None
    assert doc["fits"]["perplexity"]["fit"] is not None  # a random model is far worse: both points usable
    assert any("2 models" in note for note in doc["notes"])
    pngs = [out / "scaling.png", *[out / "plots" / f"{k}.png" for k, e in doc["fits"].items() if e["fit"]]]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert read_json(out / "scaling.json")["rows"][1]["model"] == str(tiny_dir)


def test_fit_trends_leaves_out_effects_whose_ci_contains_zero():
    rows = [{"model": "a", "n_params": 1e8, "sw_delta_nll": 2.0, "sw_delta_nll_ci95": [1.5, 2.5],
             "random_delta_nll": 2e-6, "random_delta_nll_ci95": [-1e-5, 1e-5], "sw_over_random": 1e6},
            {"model": "b", "n_params": 1e9, "sw_delta_nll": 1.0, "sw_delta_nll_ci95": [0.8, 1.2],
             "random_delta_nll": 3e-3, "random_delta_nll_ci95": [1e-3, 5e-3], "sw_over_random": 333.0},
            {"model": "c", "n_params": 1e10, "sw_delta_nll": 0.5, "sw_delta_nll_ci95": [0.4, 0.6],
             "random_delta_nll": 1e-3, "random_delta_nll_ci95": [2e-4, 2e-3], "sw_over_random": 500.0}]
    fits = fit_trends(rows)
    assert fits["sw_delta_nll"]["fit"]["n"] == 3 and fits["sw_delta_nll"]["why"] == {}
    assert fits["sw_delta_nll"]["fit"]["slope"] == pytest.approx(np.log10(0.5) / 1)  # halves per 10×
    for key in ("random_delta_nll", "sw_over_random"):  # a's random effect is not measured: left out, said why
        assert fits[key]["models"] == ["b", "c"] and fits[key]["excluded"] == ["a"]
        assert fits[key]["why"]["a"] == "random_delta_nll 95 % CI [-1e-05, 1e-05] contains 0"
    assert fits["random_delta_nll"]["fit"]["slope"] == pytest.approx(np.log10(1e-3 / 3e-3))
