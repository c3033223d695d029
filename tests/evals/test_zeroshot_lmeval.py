"""Cross-check against lm-evaluation-harness 0.4.x on the embedded SmolLM2 and the task fixtures.

Needs ``lm_eval`` importable (run with the venv that has it, e.g.
``/tmp/lmeval-venv/bin/python -m pytest -m lmeval tests/evals/test_zeroshot_lmeval.py``). Every task's
fixture is scored by ESA and by lm-eval (its own task config, data swapped for the JSONL); accuracies must be
identical and every per-option log-likelihood equal to 1e-4.
"""

import importlib.util
import math
from pathlib import Path

import pytest

from esa.evals.tasks import task_names

pytestmark = pytest.mark.lmeval
pytest.importorskip("lm_eval")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "zeroshot_vs_lmeval.py"


@pytest.fixture(scope="module")
def comparison():
    spec = importlib.util.spec_from_file_location("zeroshot_vs_lmeval", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.run(task_names(), {})


@pytest.mark.parametrize("task", task_names())
def test_matches_lmeval(comparison, task):
    row = comparison["rows"][task]
    assert row["n"] >= 20 and row["missing_in_lmeval"] == 0
    assert row["max_abs_dll"] < 1e-4
    assert row["predictions_differing"] == 0 and row["greedy_flags_differing"] == 0
    for key in ("acc", "acc_norm"):
        if f"esa_{key}" in row:
            assert row[f"esa_{key}"] == row[f"lmeval_{key}"]
            assert math.isclose(row[f"esa_{key}_stderr"], row[f"lmeval_{key}_stderr"], rel_tol=1e-9)
    if "esa_perplexity" in row:
        assert math.isclose(row["esa_perplexity"], row["lmeval_perplexity"], rel_tol=1e-4)
        # same bootstrap resamples as lm-eval; only the ~1e-5 log-likelihood differences remain
        assert math.isclose(row["esa_perplexity_stderr"], row["lmeval_perplexity_stderr"], rel_tol=1e-3)
