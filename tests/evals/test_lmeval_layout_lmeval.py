"""ESA's lm-eval-layout files against the files lm-eval itself writes, key by key (issue #14).

lm-eval runs on the task fixtures with its own task configs (``bench/zeroshot_vs_lmeval.py``:
:func:`write_lmeval_output` saves ``results_<date>.json`` and ``samples_<task>_<date>.jsonl`` with lm-eval's
``EvaluationTracker``, as ``lm_eval --output_path OUT --log_samples`` does); ``esa zeroshot`` scores the same
fixtures with the same model (the embedded SmolLM2, fp32, CPU). Both documents are walked together:

* every key lm-eval writes must be in ESA's file (missing keys fail) unless it is in :data:`EXEMPT`;
* strings, bools, ints and None are equal exactly; floats agree to ``1e-6`` **relative** (``abs_tol`` 1e-6 too,
  for numbers below 1 in magnitude): ``math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)``;
* the one exception: the per-option log-likelihood strings of ``resps``/``filtered_resps`` are compared as the
  floats they spell to ``1e-5`` relative (:data:`LL_REL_TOL`). They come from two different fp32 forwards — HFLM
  computes every position's logits and sums in fp32, ESA only the scored rows' (chunked head) and sums in fp64 —
  and were measured up to 2.8e-6 relative (2.8e-5 absolute, piqa's ~-70 sums) apart on these fixtures, with
  lm-eval at batch size 1 and ESA one request per forward too: fp32 rounding, not a layout difference. Every
  number derived from them (acc, acc_norm, their stderr, the greedy flags) still agrees to 1e-6 or exactly;
* keys only ESA writes are reported (a ``UserWarning`` naming them), not failed.

Needs ``lm_eval`` (``make test-lmeval``); ~1 min on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest

from esa.cli import main

pytestmark = pytest.mark.lmeval
pytest.importorskip("lm_eval")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "zeroshot_vs_lmeval.py"
TASKS = ["piqa", "arc_easy", "boolq"]  # template-prompt tasks with exact acc stderr (lambada's is a bootstrap)
REL_TOL = ABS_TOL = 1e-6
LL_REL_TOL = 1e-5  # resps log-likelihoods: two fp32 forwards (see the module docstring)
NUMERIC_STRINGS = {"resps", "filtered_resps"}  # lm-eval sanitises (log-likelihood, is_greedy) to strings

# Keys of lm-eval's results document that cannot match, as dotted paths ("*": any one key) → why.
EXEMPT: dict[str, str] = {
    # the model wrapper and how it was named: lm-eval's HFLM loaded a directory, ESA its suite alias
    "config.model": "the wrapper class: lm-eval's 'hf', ESA's 'esa'",
    "config.model_args": "lm-eval's HFLM arguments (pretrained=<machine path>,dtype=float32) vs ESA's model spec",
    "config.model_revision": "HFLM's default 'main' for a local dir; ESA records the weights' sha256",
    "config.model_sha": "HFLM's hub commit ('' for a local dir); ESA records the weights' sha256",
    "config.batch_size": "HFLM's batch size (8); ESA batches by a token budget and writes None",
    "model_source": "the wrapper class again ('hf' vs 'esa')",
    "model_name": "lm-eval names the model by its directory on this machine, ESA by its alias",
    "model_name_sanitized": "derived from model_name",
    "tokenizer_pad_token": "HFLM's tokenizer special tokens; ESA exports from stored rows, which hold no tokenizer",
    "tokenizer_eos_token": "as tokenizer_pad_token",
    "tokenizer_bos_token": "as tokenizer_pad_token",
    "eot_token_id": "as tokenizer_pad_token",
    # the harness, the machine and the clock
    "git_hash": "lm-eval's short hash of the working directory vs ESA's full sha (+dirty)",
    "upper_git_hash": "the git hash of a parent repository of lm-eval's checkout",
    "lm_eval_version": "the harness's own version; ESA writes esa_version (it runs no lm-eval code)",
    "pretty_env_info": "torch's collect_env dump of the machine; ESA stores provenance in its own files",
    "date": "start time of each run",
    "total_evaluation_time_seconds": "wall time of each run",
    "fewshot_as_multiturn": "a chat-template few-shot flag whose lm-eval default changed within 0.4 (now True); "
                            "meaningless for zero-shot plain text, ESA writes None",
    "configs.*.metadata.config_source": "where lm-eval read the task YAML ('inline' here: the bench hands it the "
                                        "config; else a path on the machine); ESA reads no YAML",
}


def _exempt(path: tuple[str, ...]) -> str | None:
    """The EXEMPT pattern covering ``path`` (or one of its parents), else None."""
    for pattern in EXEMPT:
        parts = tuple(pattern.split("."))
        if len(parts) <= len(path) and all(p in ("*", k) for p, k in zip(parts, path)):
            return pattern
    return None


def _same(a, b, numeric_strings: bool) -> bool:
    if numeric_strings and isinstance(a, str) and isinstance(b, str) and a not in ("True", "False"):
        return a == b or math.isclose(float(a), float(b), rel_tol=LL_REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
                or not isinstance(b, (int, float)):
            return False
        return a == b or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)  # == : equal infinities
    return type(a) is type(b) and a == b


def compare(theirs, ours, path: tuple[str, ...] = (), found: dict | None = None) -> dict:
    """Walk lm-eval's value ``theirs`` and ESA's ``ours`` together; returns {"differ": [...], "missing": [...],
    "extra": [...], "exempt": set of EXEMPT patterns used}, paths dotted."""
    found = found if found is not None else {"differ": [], "missing": [], "extra": [], "exempt": set()}
    name = ".".join(path)
    if (pattern := _exempt(path)) is not None:
        found["exempt"].add(pattern)
    elif isinstance(theirs, dict) and isinstance(ours, dict):
        for key in theirs:
            if key not in ours:
                if (pattern := _exempt((*path, key))) is not None:
                    found["exempt"].add(pattern)
                else:
                    found["missing"].append(".".join((*path, key)))
            else:
                compare(theirs[key], ours[key], (*path, key), found)
        found["extra"] += [".".join((*path, k)) for k in ours if k not in theirs]
    elif isinstance(theirs, list) and isinstance(ours, list) and len(theirs) == len(ours):
        for i, (t, o) in enumerate(zip(theirs, ours)):
            compare(t, o, (*path, str(i)), found)
    elif not _same(theirs, ours, bool(NUMERIC_STRINGS & set(path))):
        found["differ"].append(f"{name}: lm-eval {theirs!r} != ESA {ours!r}")
    return found


def _read(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(results document, {task: sample lines}) of one lm-eval-layout folder (one results file in it)."""
    (results,) = folder.glob("results_*.json")
    samples = {t: [json.loads(line) for line in next(folder.glob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in TASKS}
    return json.loads(results.read_text()), samples


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"lm-eval": (doc, samples), "esa": (doc, samples)} for TASKS on the fixtures and the embedded SmolLM2."""
    from esa.models import resolve_source

    spec = importlib.util.spec_from_file_location("zeroshot_vs_lmeval", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = {t: (bench.FIXTURES / f"{t}.jsonl").resolve() for t in TASKS}
    out = tmp_path_factory.mktemp("layout")
    lm_folder = bench.write_lmeval_output(resolve_source("smollm2-135m")[1], TASKS, data, out / "lm")
    assert main(["zeroshot", "--model", "smollm2-135m", "--dtype", "fp32", "--device", "cpu", "--tasks", *TASKS,
                 "--task-data", *(f"{t}={p}" for t, p in data.items()), "--out-dir", str(out / "esa")]) == 0
    own = json.loads((out / "esa" / "zeroshot.json").read_text())
    return {"lm-eval": _read(lm_folder), "esa": _read((out / "esa" / own["lm_eval"]["results"]).parent)}


def _check(found: dict, what: str) -> None:
    if found["extra"]:
        warnings.warn(f"{what}: keys only ESA writes: {', '.join(found['extra'])}", UserWarning, stacklevel=2)
    assert not found["missing"], f"{what}: lm-eval writes keys ESA lacks: {found['missing']}"
    assert not found["differ"], f"{what}: values differ:\n" + "\n".join(found["differ"])


def test_results_document_matches_lmeval_key_by_key(files):
    (theirs, _), (ours, _) = files["lm-eval"], files["esa"]
    assert set(theirs["results"]) == set(ours["results"]) == set(TASKS)
    found = compare(theirs, ours)
    _check(found, "results document")
    assert found["exempt"] == set(EXEMPT), f"EXEMPT keys lm-eval no longer writes: {set(EXEMPT) - found['exempt']}"


@pytest.mark.parametrize("task", TASKS)
def test_samples_match_lmeval_key_by_key(files, task):
    theirs, ours = files["lm-eval"][1][task], files["esa"][1][task]
    assert [s["doc_id"] for s in theirs] == [s["doc_id"] for s in ours] and len(theirs) >= 20
    found = {"differ": [], "missing": [], "extra": [], "exempt": set()}
    for t, o in zip(theirs, ours):
        compare(t, o, (f"doc_id={t['doc_id']}",), found)
    _check(found, f"samples_{task}")
    assert not found["exempt"]  # no sample key is exempt


def test_compare_catches_missing_differing_and_extra_keys():
    """The walk itself: a missing key, a 2e-6 relative float, a changed string and a greedy flag fail; an
    EXEMPT key, a 5e-7 relative float and a resps log-likelihood 5e-6 relative apart pass; an ESA-only key is
    extra."""
    theirs = {"results": {"t": {"acc,none": 0.5, "alias": "t"}}, "date": 1.0,
              "resps": [["-10.0", "False"]], "gone": 1}
    ours = {"results": {"t": {"acc,none": 0.5 * (1 + 5e-7), "alias": "t"}}, "date": 2.0,
            "resps": [["-10.00005", "False"]], "new": 1}
    found = compare(theirs, ours)
    assert found["missing"] == ["gone"] and found["extra"] == ["new"] and not found["differ"]
    assert found["exempt"] == {"date"}
    ours["results"]["t"] |= {"acc,none": 0.5 * (1 + 2e-6), "alias": "T"}
    ours["resps"][0][1] = "True"
    assert len(compare(theirs, ours)["differ"]) == 3
    ours["resps"][0][0] = "-10.0002"  # 2e-5 relative
    assert len(compare(theirs, ours)["differ"]) == 4
