"""Study files: strict schema errors, expansion into runs, `esa plan`, and every shipped study validates."""

from pathlib import Path

import pytest
import yaml

from esa.cli import main
from esa.core.errors import EsaError
from esa.executors import plan
from esa.study import expand, load_study, parse_study

STUDIES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))
BASE = {"name": "t", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [64, 128],
        "seeds": [0, 1, 2], "max_eval_tokens": 256, "batch_tokens": 1024}


def _with(**changes) -> dict:
    return {**BASE, **changes}


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_validates_and_plans_offline(path):
    study = load_study(path)
    rows = plan(study, measure=False)
    assert len(rows) == len(expand(study)) > 0
    assert all(r.basis for r in rows)


def test_the_shipped_studies_exist():
    assert {p.stem for p in STUDIES} >= {"demo", "phase1", "phase2", "scaling", "full-research"}
    phase2 = load_study(STUDIES[[p.stem for p in STUDIES].index("phase2")])
    assert {r.kind for r in expand(phase2)} == {"baseline", "sensitivity", "perturbation"}


@pytest.mark.parametrize("data, where, wanted", [
    (_with(contex_lens=[64]), "study", "Did you mean 'context_lens'"),
    (_with(models=[{"name": "smollm2-135m", "dtyp": "bf16"}]), "study.models[0]", "Did you mean 'dtype'"),
    (_with(sensitivity={"scorers": ["magnitude"], "k": 5, "kk": 1}), "study.sensitivity", "'kk'"),
    (_with(perturbation={"targets": [{"name": "a", "spec": "tensor:x", "rank": "grad"}],
                         "ops": [{"op": "zero"}]}), "study.perturbation.targets[0]", "Did you mean 'ranking'"),
])
def test_unknown_key_names_key_path_and_valid_keys(data, where, wanted):
    with pytest.raises(EsaError) as exc:
        parse_study(data)
    msg = str(exc.value)
    assert msg.startswith(where + ":") and wanted in msg and "Valid keys:" in msg


@pytest.mark.parametrize("changes, wanted", [
    ({"context_lens": [64, "128"]}, "study.context_lens[1]: expected int, got str '128'"),
    ({"seeds": 0}, "study.seeds: expected a list of int, got int 0"),
    ({"max_eval_tokens": "lots"}, "study.max_eval_tokens: expected int or null"),
    ({"models": [{"name": "smollm2-135m", "trust_remote_code": "yes"}]},
     "study.models[0].trust_remote_code: expected bool"),
    ({"sensitivity": {"scorers": "grad", "k": 5}}, "study.sensitivity.scorers: expected a list of str"),
    ({"batch_tokens": True}, "study.batch_tokens: expected int, got bool"),
])
def test_type_errors_name_field_and_expected_type(changes, wanted):
    with pytest.raises(EsaError, match="^" + wanted.replace("[", r"\[").replace("]", r"\]")):
        parse_study(_with(**changes))


@pytest.mark.parametrize("changes, wanted", [
    ({"datasets": ["python-doc"]}, "Did you mean 'python-docs'"),
    ({"models": ["smollm-135m"]}, "Did you mean 'smollm2-135m'"),
    ({"method": "chunk"}, "Did you mean 'chunks'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"attention": "flash"}, r"^study\.attention: unknown attention kernel 'flash'; choose one of auto, sdpa"),
    ({"models": [{"name": "smollm2-135m", "attention": "fast"}]}, r"^study\.models\[0\]\.attention: unknown"),
    ({"context_lens": [64, 64]}, "duplicate values"),
    ({"stride": 16}, "only for method: sliding"),
    ({"sensitivity": {"scorers": ["grad_x_weights"], "k": 5}}, "Did you mean 'grad_x_weight'"),
    ({"perturbation": {"targets": [{"name": "a", "spec": "tensor:model.norm.weight"}],
                       "ops": [{"op": "gauss", "grid": {"sigma": [0.1]}}]}}, "Did you mean 'gauss_noise'"),
    ({"perturbation": {"targets": [{"name": "a", "spec": "tensor:model.norm.weight"}],
                       "ops": [{"op": "scale", "grid": {"factr": [2.0]}}]}}, r"ops\[0\] scale"),
    ({"perturbation": {"targets": [{"name": "a", "ranking": "grad", "k": 3}], "ops": [{"op": "zero"}]},
      "sensitivity": {"scorers": ["magnitude"], "k": 5}}, "list it under sensitivity.scorers"),
    ({"perturbation": {"targets": [{"name": "a"}], "ops": [{"op": "zero"}]}}, "exactly one of 'spec' or"),
])
def test_semantic_errors_say_what_to_fix(changes, wanted):
    with pytest.raises(EsaError, match=wanted):
        parse_study(_with(**changes))


def test_missing_required_key_and_non_mapping():
    data = dict(BASE)
    del data["datasets"]
    with pytest.raises(EsaError, match="missing required key 'datasets'"):
        parse_study(data)
    with pytest.raises(EsaError, match="expected a mapping"):
        parse_study(["not", "a", "mapping"])


def test_expansion_is_model_major_cross_product_with_overrides():
    study = parse_study(_with(models=["smollm2-135m", {"name": "pythia-70m", "dtype": "bf16"}],
                              dtype="fp32"))
    runs = expand(study)
    assert len(runs) == 2 * 1 * 2 * 3
    assert [r.model.name for r in runs] == ["smollm2-135m"] * 6 + ["pythia-70m"] * 6
    assert {r.model.dtype for r in runs[6:]} == {"bf16"} and runs[0].model.dtype == "fp32"
    cells = {(r.model.name, r.dataset, r.context_len, r.seed) for r in runs}
    assert len(cells) == len(runs)
    assert runs[0].config()["kind"] == "baseline" and runs[0].config()["model"]["name"] == "smollm2-135m"


def test_whole_split_expands_only_the_first_seed():
    runs = expand(parse_study(_with(max_eval_tokens=None)))
    assert {r.seed for r in runs} == {0} and len(runs) == 2


def test_perturbation_grid_expands_into_runs():
    study = parse_study(_with(
        sensitivity={"scorers": ["magnitude"], "k": 10},
        perturbation={"targets": [{"name": "top", "ranking": "magnitude", "k": 10}],
                      "ops": [{"op": "gauss_noise", "grid": {"sigma": [0.1, 1.0], "relative_to": "weight"}}],
                      "controls": ["random_k"], "trials": 2}))
    kinds = [r.kind for r in expand(study)]
    # 6 baselines; magnitude needs no data → one sensitivity run; 2 ctx × 3 seeds × 2 sigmas perturbations
    assert kinds == ["baseline"] * 6 + ["sensitivity"] + ["perturbation"] * 12


def test_relative_paths_resolve_against_the_study_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("hello world\n\nsecond doc")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_with(datasets=["./data/c.txt"])))
    study = load_study(tmp_path / "s.yaml")
    assert study.datasets == (str((tmp_path / "data" / "c.txt").resolve()),)


def test_corpus_task_names_read_their_corpus_relative_to_the_study_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("hello world\n\nsecond doc")
    task = "corpus_mc:./data/c.txt:k=2:seed=1"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_with(zeroshot={"tasks": [task, "piqa"],
                                                                      "task_data": {task: "./mc.jsonl"}})))
    section = load_study(tmp_path / "s.yaml").section("zeroshot")
    resolved = f"corpus_mc:{(tmp_path / 'data' / 'c.txt').resolve()}:k=2:seed=1"
    assert section.tasks == (resolved, "piqa")
    assert section.task_data == {resolved: str((tmp_path / "mc.jsonl").resolve())}


def test_plan_cli_prints_runs_and_cost(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_with(models=["smollm2-135m", "pythia-12b"])))
    assert main(["plan", str(tmp_path / "s.yaml"), "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "12 run(s)" in out and "total scored tokens ≤ 3,072" in out  # 12 runs × 256
    assert "assumed" in out and "N=11.8B" in out


def test_plan_measures_a_small_local_model(tiny_dir, tmp_path):
    study = parse_study(_with(models=[str(tiny_dir)], context_lens=[32], seeds=[0]), base=tmp_path)
    (row,) = plan(study)
    assert row.basis.startswith("measured here") and row.seconds > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_with(seed=[0])))
    assert main(["plan", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Did you mean 'seeds'" in err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_relative_dataset_files_without_a_slash_pass_the_check_the_loader_reads_by(tmp_path, monkeypatch):
    """``foo.parquet`` and ``foo.parquet:text`` are dataset specs (esa.data.specs.is_spec) for the study check
    as for the corpus loader, whether or not the file exists yet; a bare unknown word still gets "did you mean"."""
    import datasets

    from esa.data.corpora import load_corpus

    names = ["foo.parquet", "foo.parquet:text", "foo.arrow:body"]
    study = parse_study(_with(datasets=names))  # validated before the files exist
    assert study.datasets == tuple(names)
    monkeypatch.chdir(tmp_path)
    ds = datasets.Dataset.from_dict({"text": ["a doc", "another"], "body": ["b1", "b2"]})
    ds.to_parquet("foo.parquet")
    ds.save_to_disk("saved")
    (tmp_path / "foo.arrow").write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    assert [load_corpus(n).documents for n in study.datasets] == [("a doc", "another")] * 2 + [("b1", "b2")]
    with pytest.raises(EsaError, match=r"datasets\[0\].*Did you mean 'python-docs'"):
        parse_study(_with(datasets=["python-doc"]))


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_attention_is_a_study_default_that_a_model_overrides():
    study = parse_study(_with(models=["smollm2-135m", {"name": "pythia-70m", "attention": "sdpa"}],
                              attention="eager"))
    runs = expand(study)
    assert {r.model.attention for r in runs if r.model.name == "smollm2-135m"} == {"eager"}
    assert {r.model.attention for r in runs if r.model.name == "pythia-70m"} == {"sdpa"}
    assert runs[0].config()["model"]["attention"] == "eager"
    assert "attention" not in expand(parse_study(_with()))[0].config()["model"]  # auto: the ids of before
