"""`esa sensitivity` and `esa compare-rankings` end to end on a tiny model; calibration seeding."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esa.cli import main
from esa.sensitivity.calibration import CalibrationSpec, calibration_batches
from esa.sensitivity.stability import compare_rankings


def _run(tmp_path, tiny_dir, corpus, *extra, out="out"):
    argv = ["--no-progress", "sensitivity", "--model", str(tiny_dir), "--calib-dataset", corpus,
            "--max-samples", "4", "--context-len", "32", "--batch-size", "2", "--out-dir", str(tmp_path / out),
            *extra]
    return main(argv)


def test_sensitivity_writes_everything_and_seeds_resample(tmp_path, tiny_dir, corpus, capsys):
    rc = _run(tmp_path, tiny_dir, corpus, "--scorer", "grad_x_weight", "--k", "20", "--seeds", "0", "1")
    assert rc == 0
    out = tmp_path / "out"
    for name in ("ranking.parquet", "ranking.csv", "ranking_seed0.parquet", "ranking_seed1.csv",
                 "stability.json", "manifest.json", "score_hist.png", "topk_layer_role.png"):
        assert (out / name).stat().st_size > 0, name
    r0, r1 = pd.read_parquet(out / "ranking_seed0.parquet"), pd.read_parquet(out / "ranking_seed1.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "ranking.parquet"), r0)
    assert len(r0) == 20 and list(r0["rank"]) == list(range(1, 21)) and r0["score"].is_monotonic_decreasing
    stab = json.loads((out / "stability.json").read_text())
    windows = [s["calibration"]["n_windows"] for s in stab["per_seed"]]
    assert windows == [4, 4] and not stab["seed_invariant"]
    assert stab["jaccard_pairs"]["0-1"] == pytest.approx(compare_rankings(r0, r1)["jaccard"])
    assert stab["jaccard_pairs"]["0-1"] < 1.0  # different calibration windows → a different top-k
    assert 0 < stab["per_seed"][0]["tail"]["top_1pct_share"] <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seeds"] == [0, 1] and manifest["model"]["model_type"] == "llama"
    assert "jaccard" in capsys.readouterr().out.lower()

    assert main(["compare-rankings", str(out / "ranking_seed0.parquet"), str(out / "ranking_seed1.csv"),
                 "--json", str(tmp_path / "cmp.json")]) == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp == pytest.approx(compare_rankings(r0, r1))


def test_magnitude_is_seed_invariant_and_bottom_per_layer(tmp_path, tiny_dir, corpus):
    rc = _run(tmp_path, tiny_dir, corpus, "--scorer", "magnitude", "--k", "3", "--mode", "per_layer",
              "--bottom", "--params", "*.mlp.*", "--seeds", "0", "1")
    assert rc == 0
    stab = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert stab["seed_invariant"] and stab["seeds"] == [0]
    table = pd.read_parquet(tmp_path / "out" / "ranking.parquet")
    assert set(table["role"]) == {"mlp_gate", "mlp_up", "mlp_down"} and len(table) == 3 * 6
    assert (table.groupby("param")["score"].apply(lambda s: s.is_monotonic_increasing)).all()


@pytest.mark.parametrize("extra, message", [
    (["--scorer", "grad_x_wieght"], "Did you mean 'grad_x_weight'"),
    (["--params", "*.mlp.dwn*"], "matches no parameter. Similar names: "),
    (["--k", "10000000"], "larger than the"),
    (["--params", "*layernorm*"], "--include-norms"),
])
def test_bad_input_is_one_line(tmp_path, tiny_dir, corpus, capsys, extra, message):
    assert _run(tmp_path, tiny_dir, corpus, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("esa: error:")


def test_out_dir_not_overwritten_by_accident(tmp_path, tiny_dir, corpus, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert _run(tmp_path, tiny_dir, corpus, "--scorer", "magnitude", "--k", "5") == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    # --overwrite clears only an earlier sensitivity run, never a directory ESA did not write
    assert _run(tmp_path, tiny_dir, corpus, "--scorer", "magnitude", "--k", "5", "--overwrite") == 2
    assert "refusing to replace" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()


def test_calibration_seeds_resample(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    a = calibration_batches(tok, CalibrationSpec("python-docs", max_samples=6, context_len=64, seed=0,
                                                 batch_size=4))
    b = calibration_batches(tok, CalibrationSpec("python-docs", max_samples=6, context_len=64, seed=1,
                                                 batch_size=4))
    again = calibration_batches(tok, CalibrationSpec("python-docs", max_samples=6, context_len=64, seed=0,
                                                     batch_size=4))
    assert len(a.window_indices) == 6 and a.window_indices != b.window_indices
    assert a.window_indices == again.window_indices and not a.seed_invariant
    assert [tuple(x.ids.shape) for x in a.batches] == [(4, 64), (2, 64)]
    assert a.n_scored == 6 * 63 and np.all([x.labels()[:, 0].eq(-100).all() for x in a.batches])
    assert not torch_equal(a.batches[0].ids, b.batches[0].ids)


def torch_equal(x, y) -> bool:
    return x.shape == y.shape and bool((x == y).all())


def test_calibration_uses_all_windows_when_corpus_is_small(tiny_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cal = calibration_batches(tok, CalibrationSpec(corpus, max_samples=10_000, context_len=32, seed=3))
    assert cal.seed_invariant and len(cal.window_indices) == cal.available_windows


@pytest.mark.slow
def test_smollm2_issue_command(tmp_path):
    """The ESA issue's example on the embedded model: grad_x_weight, 8×128 calibration tokens, 2 seeds."""
    rc = main(["--no-progress", "sensitivity", "--model", "smollm2-135m", "--scorer", "grad_x_weight",
               "--calib-dataset", "python-docs", "--max-samples", "8", "--context-len", "128", "--k", "100",
               "--mode", "global", "--seeds", "0", "1", "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    table = pd.read_parquet(tmp_path / "out" / "ranking.parquet")
    assert len(table) == 100 and table["layer"].notna().all()
    stab = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert 0 <= stab["jaccard_pairs"]["0-1"] <= 1
    assert table["score"].is_monotonic_decreasing and list(table["rank"]) == list(range(1, 101))
    from esa.models import ModelSpec, load_model

    weights = dict(load_model(ModelSpec("smollm2-135m", device="cpu")).model.named_parameters())
    for row in table.itertuples():  # (row, col) address the real weight that was scored
        assert weights[row.param][row.row, row.col].item() == pytest.approx(row.weight)
