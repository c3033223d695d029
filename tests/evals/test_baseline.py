import json
import shutil

import numpy as np
import pytest
from scipy import stats as sps

from esa.cli import main
from helpers.models import forbid_model_loading

pytestmark = pytest.mark.model  # baselines of the embedded SmolLM2, through `esa baseline`

ARGS = ["--model", "smollm2-135m", "--datasets", "python-docs", "--context-lens", "64", "128", "--seeds", "0", "1",
        "--max-eval-tokens", "256", "--batch-tokens", "1024"]


def _baseline(out, *argv: str) -> None:
    assert main(["--no-progress", "baseline", *argv, "--out-dir", str(out)]) == 0


def _results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _report(out, rep) -> str:
    assert main(["report", str(out), "--out", str(rep)]) == 0
    return (rep / "report.md").read_text()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    _baseline(out, *ARGS)
    return out / "smollm2-135m"


def test_results_and_manifest_written(run_dir):
    results = _results(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert results["schema"] == "esa.baseline.v1" and len(results["entries"]) == 4
    assert manifest["model"]["revision"].startswith("sha256:")
    assert {"git_sha", "libraries", "device", "esa_version"} <= set(manifest["provenance"])
    assert "environ" not in json.dumps(manifest).lower()
    assert (run_dir.parent / "esa.db").is_file()  # the exports' source
    for e in results["entries"]:
        assert e["method"] == "chunks" and e["bos"] == "never" and not e["seed_invariant"]
        arrays = np.load(run_dir / e["per_window_file"])
        # the stored per-window arrays reproduce the headline numbers exactly
        assert np.exp(arrays["nll"].sum() / arrays["n_scored"].sum()) == pytest.approx(e["metrics"]["perplexity"])
        assert arrays["n_scored"].sum() == e["metrics"]["scored_tokens"] <= 256
        assert e["sanity"]["warnings"] == []


def test_seeds_resample_and_aggregate(run_dir):
    results = _results(run_dir)
    by_seed = {e["seed"]: e for e in results["entries"] if e["context_len"] == 64}
    w0 = np.load(run_dir / by_seed[0]["per_window_file"])["window_index"]
    w1 = np.load(run_dir / by_seed[1]["per_window_file"])["window_index"]
    assert not np.array_equal(w0, w1)
    agg = next(a for a in results["aggregates"] if a["context_len"] == 64)
    ppls = [by_seed[s]["metrics"]["perplexity"] for s in (0, 1)]
    logs = np.log(ppls)  # perplexity aggregates on the log scale: geometric mean, exp of the log t-interval
    assert agg["perplexity"]["mean"] == pytest.approx(np.exp(logs.mean())) and agg["perplexity"]["scale"] == "log"
    lo, hi = agg["perplexity"]["ci95"]
    ref = np.exp(sps.t.interval(0.95, 1, loc=logs.mean(), scale=sps.sem(logs)))
    assert (lo, hi) == (pytest.approx(ref[0]), pytest.approx(ref[1])) and 0 < lo < agg["perplexity"]["mean"] < hi


def test_report_numbers_match_results(run_dir, tmp_path):
    """`esa report OUT` renders the database the command wrote beside the run directories."""
    text = _report(run_dir.parent, tmp_path / "report")
    for agg in _results(run_dir)["aggregates"]:
        assert f"{agg['perplexity']['mean']:.3f}" in text
    for section in ("Warnings (0)", "Executive summary: baselines"):
        assert f"## {section}" in text
    assert (tmp_path / "report" / "baseline_perplexity.png").stat().st_size > 1000
    assert (tmp_path / "report" / "report.html").is_file()


def test_rerun_keeps_the_results_without_computing(run_dir, monkeypatch):
    """A rerun resumes from the database (formerly: existing results were refused, and left untouched)."""
    before = _results(run_dir)
    forbid_model_loading(monkeypatch)
    _baseline(run_dir.parent, *ARGS)
    assert _results(run_dir) == before


def test_older_results_without_a_database_are_refused(run_dir, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(run_dir, legacy / run_dir.name)  # run directories only, as the pre-engine command wrote them
    before = (legacy / run_dir.name / "results.json").read_text()
    assert main(["--no-progress", "baseline", *ARGS, "--out-dir", str(legacy)]) == 2
    err = capsys.readouterr().err
    assert "without a results database" in err and "pass --overwrite" in err
    assert (legacy / run_dir.name / "results.json").read_text() == before


def test_failed_overwrite_keeps_earlier_results(run_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run_dir.parent, out)
    before = (out / run_dir.name / "results.json").read_text()
    bad = ["--model", "smollm2-135m", "--datasets", "/no/such.txt", "--context-lens", "64", "--seeds", "0",
           "--max-eval-tokens", "256", "--batch-tokens", "1024", "--out-dir", str(out), "--overwrite"]
    assert main(["--no-progress", "baseline", *bad]) == 2
    assert (out / run_dir.name / "results.json").read_text() == before


def test_whole_split_marked_seed_invariant(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(300)))
    _baseline(tmp_path / "out", "--datasets", str(corpus), "--context-lens", "64", "--seeds", "0", "1", "2",
              "--max-eval-tokens", "0", "--batch-tokens", "1024")
    results = _results(tmp_path / "out" / "smollm2-135m")
    assert len(results["entries"]) == 1 and results["entries"][0]["seed_invariant"]
    assert results["aggregates"][0]["seed_invariant"]


def test_repeated_paragraph_triggers_the_guard(tmp_path):
    corpus = tmp_path / "repeated.txt"
    corpus.write_text("The cat sat on the mat and looked at the quiet garden outside the window. " * 100)
    _baseline(tmp_path / "out", "--datasets", str(corpus), "--context-lens", "128", "--seeds", "0",
              "--max-eval-tokens", "0", "--batch-tokens", "2048")
    results = _results(tmp_path / "out" / "smollm2-135m")
    assert any("repetitive" in w for w in results["warnings"])
    report = _report(tmp_path / "out", tmp_path / "rep")
    assert "## Warnings (" in report and "## Warnings (0)" not in report and "repetitive" in report


@pytest.mark.parametrize("argv, fragment", [
    (["--context-lens", "9000"], "exceeds smollm2-135m's maximum of 8192"),
    (["--datasets", "wikitxt-2"], "Did you mean 'wikitext-2'"),
    (["--datasets", "/no/such/corpus.txt"], "does not exist"),
    (["--dtype", "fp16"], "fp16 is not supported on CPU"),
    (["--eval-suites", "hellaswag"], "--task-data hellaswag="),
    (["--eval-suites", "hellaswagg"], "Did you mean 'hellaswag'"),
    (["--model", "not-a-model"], "unknown model"),
])
def test_cli_bad_input_is_one_line(argv, fragment, tmp_path, capsys):
    base = ["baseline", "--datasets", "python-docs", "--context-lens", "64", "--max-eval-tokens", "64",
            "--out-dir", str(tmp_path / "o")]
    assert main(["--no-progress", *base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_out_dir_under_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["baseline", "--datasets", "python-docs", "--context-lens", "64", "--out-dir", str(blocker / "sub")]
    assert main(argv) == 2
    assert "not writable" in capsys.readouterr().err


def test_extended_parts_zero_shot_and_long_context(tmp_path):
    fixture = "tests/evals/fixtures/arc_easy.jsonl"
    _baseline(tmp_path / "out", "--baseline", "extended", "--datasets", "python-docs", "--context-lens", "64",
              "--seeds", "0", "--max-eval-tokens", "128", "--batch-tokens", "1024", "--long-context", "256",
              "--eval-suites", "arc_e", "--task-data", f"arc_e={fixture}", "--zeroshot-limit", "4")
    run = tmp_path / "out" / "smollm2-135m"
    results = _results(run)
    (long_entry,) = [e for e in results["entries"] if e["long_context"]]
    assert long_entry["context_len"] == 256 and long_entry["metrics"]["batch_sizes"] == [1]
    assert "process_peak_rss_bytes" in long_entry["peak_memory"]
    arc = results["zeroshot"]["arc_easy"]
    items = (run / arc["items_file"]).read_text().splitlines()
    assert arc["config"]["n"] == len(items) == 4
    assert arc["metrics"]["acc"] == pytest.approx(sum(json.loads(i)["correct"] for i in items) / 4)
    text = _report(tmp_path / "out", tmp_path / "rep")
    assert "## Zero-shot tasks" in text and "## Long context" in text
    assert f"{arc['metrics']['acc']:.4f} ± {arc['metrics']['acc_stderr']:.4f}" in text
