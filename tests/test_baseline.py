import json

import numpy as np
import pytest
from scipy import stats as sps

from esa.baseline import BaselineConfig, run_baseline
from esa.cli import main
from esa.errors import EsaError
from esa.models import ModelSpec
from esa.report.baseline_report import write_baseline_report

pytestmark = pytest.mark.model  # baselines of the embedded SmolLM2

CFG = BaselineConfig(ModelSpec("smollm2-135m"), "smoke", ("python-docs",), (64, 128), (0, 1),
                     max_eval_tokens=256, batch_tokens=1024)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    (run,) = run_baseline(CFG, ["smollm2-135m"], out)
    return run


def test_results_and_manifest_written(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert results["schema"] == "esa.baseline.v1" and len(results["entries"]) == 4
    assert manifest["model"]["revision"].startswith("sha256:")
    assert {"git_sha", "libraries", "device", "esa_version"} <= set(manifest["provenance"])
    assert "environ" not in json.dumps(manifest).lower()
    for e in results["entries"]:
        assert e["method"] == "chunks" and e["bos"] == "never" and not e["seed_invariant"]
        arrays = np.load(run_dir / e["per_window_file"])
        # the stored per-window arrays reproduce the headline numbers exactly
        assert np.exp(arrays["nll"].sum() / arrays["n_scored"].sum()) == pytest.approx(e["metrics"]["perplexity"])
        assert arrays["n_scored"].sum() == e["metrics"]["scored_tokens"] <= 256
        assert e["sanity"]["warnings"] == []


def test_seeds_resample_and_aggregate(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
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
    report = write_baseline_report([run_dir], tmp_path / "report")
    text = report.read_text()
    results = json.loads((run_dir / "results.json").read_text())
    for agg in results["aggregates"]:
        assert f"{agg['perplexity']['mean']:.3f}" in text
    for section in ("Overview", "Model Performance Summary", "Key Insights", "Testing Configuration",
                    "Statistical Reliability", "Next Steps"):
        assert f"## {section}" in text
    assert (tmp_path / "report" / "perplexity_vs_context.png").stat().st_size > 1000


def test_existing_results_are_refused_then_overwritten(run_dir):
    before = (run_dir / "results.json").read_text()
    with pytest.raises(EsaError, match="already holds results"):
        run_baseline(CFG, ["smollm2-135m"], run_dir.parent)
    assert (run_dir / "results.json").read_text() == before


def test_failed_overwrite_keeps_earlier_results(run_dir):
    before = (run_dir / "results.json").read_text()
    bad = BaselineConfig(CFG.model, "smoke", ("/no/such.txt",), (64,), (0,), max_eval_tokens=256, batch_tokens=1024)
    with pytest.raises(EsaError):
        run_baseline(bad, ["smollm2-135m"], run_dir.parent, overwrite=True)
    assert (run_dir / "results.json").read_text() == before


def test_whole_split_marked_seed_invariant(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(300)))
    cfg = BaselineConfig(CFG.model, "smoke", (str(corpus),), (64,), (0, 1, 2), max_eval_tokens=None, batch_tokens=1024)
    (run,) = run_baseline(cfg, ["smollm2-135m"], tmp_path / "out")
    results = json.loads((run / "results.json").read_text())
    assert len(results["entries"]) == 1 and results["entries"][0]["seed_invariant"]
    assert results["aggregates"][0]["seed_invariant"]


def test_repeated_paragraph_triggers_the_guard(tmp_path):
    corpus = tmp_path / "repeated.txt"
    corpus.write_text("The cat sat on the mat and looked at the quiet garden outside the window. " * 100)
    cfg = BaselineConfig(CFG.model, "smoke", (str(corpus),), (128,), (0,), max_eval_tokens=None, batch_tokens=2048)
    (run,) = run_baseline(cfg, ["smollm2-135m"], tmp_path / "out")
    results = json.loads((run / "results.json").read_text())
    assert any("repetitive" in w for w in results["warnings"])
    report = write_baseline_report([run], tmp_path / "rep").read_text()
    assert "**Warnings**" in report and "repetitive" in report


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
    cfg = BaselineConfig(CFG.model, "extended", ("python-docs",), (64,), (0,), max_eval_tokens=128,
                         batch_tokens=1024, long_context=(256,), eval_suites=("arc_e",),
                         task_data=(("arc_e", fixture),), zeroshot_limit=4)
    (run,) = run_baseline(cfg, ["smollm2-135m"], tmp_path / "out")
    results = json.loads((run / "results.json").read_text())
    (long_entry,) = [e for e in results["entries"] if e["long_context"]]
    assert long_entry["context_len"] == 256 and long_entry["metrics"]["batch_sizes"] == [1]
    assert "process_peak_rss_bytes" in long_entry["peak_memory"]
    arc = results["zeroshot"]["arc_easy"]
    items = (run / arc["items_file"]).read_text().splitlines()
    assert arc["config"]["n"] == len(items) == 4
    assert arc["metrics"]["acc"] == pytest.approx(sum(json.loads(i)["correct"] for i in items) / 4)
    text = write_baseline_report([run], tmp_path / "rep").read_text()
    assert "## Zero-shot Accuracy" in text and "## Long Context" in text
    assert f"{arc['metrics']['acc']:.4f} ± {arc['metrics']['acc_stderr']:.4f}" in text
