"""`esa perturb`, `esa dose-response` and `esa bitscan` as one-off studies give the numbers their run-directory
path gave for the same inputs (tests/golden/causal_commands.json, written by that path before it was removed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from esa.cli import main

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "causal_commands.json").read_text())["cases"]
STEMS = {"perturb": "perturb", "dose-response": "dose_response", "bitscan": "bitscan"}


@pytest.fixture(scope="module")
def ranking(tiny_llama_dir, tmp_path_factory):
    """The magnitude top-20 ranking of the tiny Llama, written as the golden run wrote it."""
    from esa.models import ModelSpec, load_model
    from esa.sensitivity.ranking import score_and_rank, write_ranking
    from esa.sensitivity.scorers import ScoreOptions, select_params

    lm = load_model(ModelSpec(str(tiny_llama_dir)))
    params = select_params(lm.model, ["*"], include_embeddings=False, include_norms=False, include_biases=False)
    res = score_and_rank(lm.model, params, (), "magnitude", 20, "global", True, ScoreOptions(8, 0), 1000)
    stem = tmp_path_factory.mktemp("ranking") / "ranking"
    write_ranking(res.table, stem, lm.fingerprint.to_dict(), res.floor)
    return stem


def _same(new, old, where: str) -> None:
    if isinstance(old, (float, str)) and isinstance(new, (float, str)) and not isinstance(old, bool):
        a, b = float(new), float(old)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12), where
    else:
        assert new == old, where


def _comparisons(stem: str, doc: dict) -> list[dict]:
    if stem == "perturb":
        return doc["comparisons"]
    if stem == "dose_response":
        return [r[a] for r in doc["rows"] for a in ("target", "random_k") if a in r]
    return doc["cells"]


def _check_case(name: str, argv: list[str], out: Path) -> None:
    golden = GOLDEN[name]
    assert main(["--no-progress", *argv, "--out-dir", str(out)]) == 0
    stem = STEMS[argv[0]]
    doc = json.loads((out / f"{stem}.json").read_text())
    _same(doc["baseline"]["perplexity"], golden["baseline_perplexity"], f"{name} baseline")
    assert doc["data"]["n_windows"] == golden["n_windows"]
    comps = _comparisons(stem, doc)
    assert [c.get("name", c.get("label")) for c in comps] == [c["name"] for c in golden["comparisons"]]
    for c, g in zip(comps, golden["comparisons"]):
        for key, value in g.items():
            if key != "name":
                _same(c.get(key), value, f"{name} {g['name']} {key}")
    if "arms" in golden:
        assert [[a["name"], a["n_elements"]] for a in doc["arms"]] == golden["arms"]
    if "greedy" in golden:
        assert {k: doc["greedy"][k] for k in golden["greedy"]} == golden["greedy"]


def _argv(name: str, tiny: Path, corpus: str, ranking: Path) -> list[str]:
    return [a.replace("<tiny>", str(tiny)).replace("<corpus>", corpus).replace("<ranking>", str(ranking))
            for a in GOLDEN[name]["argv"]]


@pytest.mark.parametrize("name", ["perturb_rows", "perturb_topk", "dose_scale", "dose_noise", "bitscan"])
def test_tiny_model_commands_match_the_run_directory_path(name, tmp_path, tiny_llama_dir, corpus, ranking):
    _check_case(name, _argv(name, tiny_llama_dir, corpus, ranking), tmp_path / name)


def test_embedded_superweights_perturb_matches_the_run_directory_path(tmp_path, smol):
    """Super weights found on calibration windows, zeroed vs random_k and the magnitude bottom_k (SmolLM2)."""
    _check_case("perturb_smol_superweights", GOLDEN["perturb_smol_superweights"]["argv"], tmp_path / "smol")


def test_a_rewritten_ranking_file_is_a_new_run(tmp_path, tiny_llama_dir, corpus, ranking):
    """The ranking file's sha256 is part of the run's config: rewriting it never reuses the stale result."""
    import shutil

    from esa.store import Reader

    copy = tmp_path / "r"
    for suffix in (".parquet", ".floor.parquet", ".meta.json"):
        shutil.copy(f"{ranking}{suffix}", f"{copy}{suffix}")
    argv = [*_argv("perturb_topk", tiny_llama_dir, corpus, ranking)]
    argv[argv.index("--targets") + 1] = f"topk:{copy}.parquet:5"
    assert main(["--no-progress", *argv, "--out-dir", str(tmp_path / "o")]) == 0
    shutil.copy(f"{ranking}.parquet", f"{copy}.parquet")  # same content: the same run, reused
    assert main(["--no-progress", *argv, "--out-dir", str(tmp_path / "o")]) == 0
    import pandas as pd

    table = pd.read_parquet(f"{copy}.parquet")
    table["score"] = table["score"].iloc[::-1].to_numpy()  # a different ranking under the same name
    table.to_parquet(f"{copy}.parquet")
    assert main(["--no-progress", *argv, "--out-dir", str(tmp_path / "o")]) == 0
    with Reader(tmp_path / "o" / "esa.db") as reader:
        assert len(reader.runs(kind="perturbation", completed=True)) == 2
