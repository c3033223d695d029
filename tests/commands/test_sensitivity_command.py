"""`esa sensitivity` as a one-off study: its files hold the numbers the old command path wrote for the same inputs
(tests/golden/sensitivity_command.json, written by that path before it was removed), a rerun resumes, --overwrite
starts a fresh database; and `esa compare-rankings` on its files. Moved here from tests/sensitivity/test_cli.py:
the end-to-end assertions of the command (the calibration tests stay in tests/sensitivity/test_calibration.py)."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pandas as pd
import pytest

from esa.cli import main
from esa.sensitivity.stability import compare_rankings
from esa.store import Reader
from helpers.models import forbid_model_loading
from helpers.golden import assert_same

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "sensitivity_command.json").read_text())
STORE_FILES = {"esa.db", "esa.db-wal", "esa.db-shm", "artifacts", "esa.log"}  # the database, its artifacts, the log


def _argv(name: str, tiny_dir, corpus, out: Path) -> list[str]:
    """The golden command line of case ``name`` with this session's inputs and ``out``."""
    line = GOLDEN["about"]["commands"][name]
    line = line.replace("<tiny_llama>", str(tiny_dir)).replace("<corpus>", corpus)
    argv = shlex.split(line)[1:]  # without the leading "esa"
    return argv[: argv.index("--out-dir")] + ["--out-dir", str(out)]


def _run(argv: list[str]) -> tuple[int, str]:
    """(exit status, stdout) of ``esa argv``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def outputs(tiny_llama_dir, corpus, tmp_path_factory):
    """case → (out-dir, stdout) of one run of each golden command."""
    done = {}
    for name in GOLDEN["cases"]:
        out = tmp_path_factory.mktemp(name)
        rc, text = _run(_argv(name, tiny_llama_dir, corpus, out))
        assert rc == 0, name
        done[name] = (out, text)
    return done


def _rows(path: Path, n: int = 20) -> dict:
    t = pd.read_parquet(path)
    return {"n_rows": len(t), "top": [{"param": r.param, "row": int(r.row),
                                       "col": None if pd.isna(r.col) else int(r.col), "score": float(r.score),
                                       "weight": float(r.weight), "rank": int(r.rank)} for r in t.head(n).itertuples()]}


def _placeholders(doc, corpus: str):
    """``doc`` with this session's corpus path written as the golden file writes it."""
    return json.loads(json.dumps(doc).replace(json.dumps(corpus)[1:-1], "<corpus>"))


@pytest.mark.parametrize("name", list(GOLDEN["cases"]))
def test_files_hold_the_golden_numbers(outputs, corpus, name):
    golden, (out, _) = GOLDEN["cases"][name], outputs[name]
    assert_same(_rows(out / "ranking.parquet"), golden["ranking"], f"{name} ranking")
    for seed, rows in golden["per_seed_ranking"].items():
        assert_same(_rows(out / f"ranking_seed{seed}.parquet"), rows, f"{name} ranking_seed{seed}")
    if "floor" in golden:
        assert_same(_rows(out / "ranking.floor.parquet"), golden["floor"], f"{name} floor")
    stab = json.loads((out / "stability.json").read_text())
    assert_same({k: stab[k] for k in golden["stability"]}, golden["stability"], f"{name} stability")
    assert_same({str(p["seed"]): p["tail"] for p in stab["per_seed"]}, golden["tail"], f"{name} tail")
    calibration = _placeholders({str(p["seed"]): p["calibration"] for p in stab["per_seed"]}, corpus)
    assert_same(calibration, golden["calibration"], f"{name} calibration")
    manifest = json.loads((out / "manifest.json").read_text())
    assert_same({k: manifest[k] for k in golden["manifest"]}, golden["manifest"], f"{name} manifest")
    assert {p.name for p in out.iterdir()} - STORE_FILES == set(golden["files"])
    assert set(manifest["files"]) == set(golden["files"]) - {"manifest.json"}


def test_sensitivity_writes_everything_and_seeds_resample(outputs, tmp_path):
    """From tests/sensitivity/test_cli.py (grad_x_weight, k 20, seeds 0 1: golden case grad_x_weight_two_seeds)."""
    out, stdout = outputs["grad_x_weight_two_seeds"]
    for name in ("ranking.parquet", "ranking.csv", "ranking_seed0.parquet", "ranking_seed1.csv",
                 "stability.json", "manifest.json", "score_hist.png", "topk_layer_role.png", "esa.db"):
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
    assert len(manifest["run_ids"]) == 2 and "jaccard" in stdout.lower()

    assert main(["compare-rankings", str(out / "ranking_seed0.parquet"), str(out / "ranking_seed1.csv"),
                 "--json", str(tmp_path / "cmp.json")]) == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp == pytest.approx(compare_rankings(r0, r1))


def test_magnitude_is_seed_invariant_and_bottom_per_layer(outputs):
    """From tests/sensitivity/test_cli.py (golden case magnitude_bottom_per_layer: the same flags)."""
    out, _ = outputs["magnitude_bottom_per_layer"]
    stab = json.loads((out / "stability.json").read_text())
    assert stab["seed_invariant"] and stab["seeds"] == [0]
    table = pd.read_parquet(out / "ranking.parquet")
    assert set(table["role"]) == {"mlp_gate", "mlp_up", "mlp_down"} and len(table) == 3 * 6
    assert (table.groupby("param")["score"].apply(lambda s: s.is_monotonic_increasing)).all()
    assert not (out / "ranking.floor.parquet").exists()  # a bottom ranking has no floor table


def test_rerun_resumes_without_loading_the_model(outputs, tiny_llama_dir, corpus, monkeypatch):
    name = "grad_x_weight_two_seeds"
    out, _ = outputs[name]
    before = pd.read_parquet(out / "ranking_seed1.parquet")
    stab_before = json.loads((out / "stability.json").read_text())
    forbid_model_loading(monkeypatch)
    rc, stdout = _run(_argv(name, tiny_llama_dir, corpus, out))
    assert rc == 0 and "all 2 run(s) already completed" in stdout
    pd.testing.assert_frame_equal(pd.read_parquet(out / "ranking_seed1.parquet"), before)
    assert json.loads((out / "stability.json").read_text()) == stab_before  # the stored seconds too
    with Reader(out / "esa.db") as reader:
        assert len(reader.runs()) == 2


def test_overwrite_starts_a_fresh_database_and_drops_stale_files(tmp_path, tiny_llama_dir, corpus):
    base = ["--no-progress", "sensitivity", "--model", str(tiny_llama_dir), "--calib-dataset", corpus,
            "--max-samples", "2", "--context-len", "32", "--k", "5", "--out-dir", str(tmp_path / "out")]
    assert _run([*base, "--seeds", "0", "1"])[0] == 0
    assert (tmp_path / "out" / "ranking_seed1.parquet").is_file()
    rc, stdout = _run([*base, "--seeds", "0", "--overwrite"])
    assert rc == 0 and "1 run(s) to do, 0 already completed" in stdout  # seed 0 is scored again
    assert not list((tmp_path / "out").glob("ranking_seed1.*"))  # exports of runs the database no longer holds
    with Reader(tmp_path / "out" / "esa.db") as reader:
        assert [r.config["seed"] for r in reader.runs()] == [0]


def test_flags_enter_the_run_config(tiny_llama_dir, corpus):
    from esa.commands.sensitivity import one_off_study
    from esa.study import expand

    args = type("Args", (), dict(model=str(tiny_llama_dir), dtype="fp32", device="cpu", revision=None,
                                 trust_remote_code=False, allow_pickle=False, attention="eager",
                                 scorer="hutchinson_diag",
                                 calib_dataset=corpus, max_samples=3, context_len=32, batch_size=2, seeds=[4],
                                 params=["*.mlp.*"], include_embeddings=True, include_norms=True,
                                 include_biases=False, k=7, mode="per_layer", bottom=True, probes=3,
                                 hist_sample=99))()
    (run,) = expand(one_off_study(args))
    cfg = run.config()
    assert cfg["model"]["attention"] == "eager"
    assert {k: cfg[k] for k in ("scorer", "k", "mode", "bottom", "dataset", "context_len", "max_samples", "seed",
                                "params", "include_embeddings", "include_norms", "include_biases", "probes",
                                "batch_size", "hist_sample")} == \
        {"scorer": "hutchinson_diag", "k": 7, "mode": "per_layer", "bottom": True, "dataset": corpus,
         "context_len": 32, "max_samples": 3, "seed": 4, "params": ("*.mlp.*",), "include_embeddings": True,
         "include_norms": True, "include_biases": False, "probes": 3, "batch_size": 2, "hist_sample": 99}


def test_section_checks_the_new_fields():
    from esa.core.errors import EsaError
    from esa.study import parse_study

    study = {"name": "s", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [32]}
    with pytest.raises(EsaError, match="probes and batch_size must be ≥ 1"):
        parse_study({**study, "sensitivity": {"scorers": ["grad"], "k": 3, "probes": 0}})
    with pytest.raises(EsaError, match="unknown key 'hist_samples'"):
        parse_study({**study, "sensitivity": {"scorers": ["grad"], "k": 3, "hist_samples": 5}})


def _cli(tmp_path, tiny_dir, corpus, *extra, out="out"):
    return main(["--no-progress", "sensitivity", "--model", str(tiny_dir), "--calib-dataset", corpus,
                 "--max-samples", "4", "--context-len", "32", "--batch-size", "2", "--out-dir",
                 str(tmp_path / out), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--scorer", "grad_x_wieght"], "Did you mean 'grad_x_weight'"),
    (["--params", "*.mlp.dwn*"], "matches no parameter. Similar names: "),
    (["--k", "10000000"], "larger than the"),
    (["--params", "*layernorm*"], "--include-norms"),
    (["--max-samples", "0"], "--max-samples 0 must be ≥ 1"),
    (["--seeds", "1", "1"], "list each seed once"),
])
def test_bad_input_is_one_line(tmp_path, tiny_llama_dir, corpus, capsys, extra, message):
    """From tests/sensitivity/test_cli.py; a failed first run leaves no database behind."""
    assert _cli(tmp_path, tiny_llama_dir, corpus, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("esa: error:")
    assert not (tmp_path / "out" / "esa.db").exists()


def test_out_dir_not_overwritten_by_accident(tmp_path, tiny_llama_dir, corpus, capsys):
    """From tests/sensitivity/test_cli.py: a directory ESA did not write is refused, with or without
    --overwrite (which now only starts a fresh database); results of an older ESA (no database) are replaced only
    with --overwrite."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert _cli(tmp_path, tiny_llama_dir, corpus, "--scorer", "magnitude", "--k", "5", *extra) == 2
        err = capsys.readouterr().err
        assert "refusing to write into" in err and "choose an empty or new --out-dir" in err
        assert (tmp_path / "out" / "keep.txt").exists() and not (tmp_path / "out" / "esa.db").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text("{}")
    assert _cli(tmp_path, tiny_llama_dir, corpus, "--scorer", "magnitude", "--k", "5", out="old") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(tmp_path, tiny_llama_dir, corpus, "--scorer", "magnitude", "--k", "5", "--overwrite", out="old") == 0
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["command"] == "sensitivity"


@pytest.mark.slow
def test_smollm2_issue_command(tmp_path):
    """From tests/sensitivity/test_cli.py: the ESA issue's example on the embedded model: grad_x_weight, 8×128
    calibration tokens, 2 seeds."""
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
