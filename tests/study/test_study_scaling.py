"""A study's ``scaling:`` section: strict schema, expansion into one scaling point per model, and its cost in
``esa plan`` (no model is loaded here)."""

import pytest

from esa.core.errors import EsaError
from esa.executors import plan, run_key
from esa.scaling.fits import STATISTIC_KEYS
from esa.study import expand, load_study, parse_study
from esa.kinds.scaling_point import ScalingPointRun

FP = {"model_id": "m", "revision": "sha256:1", "source": "/here"}


def _study(scaling, **changes):
    return parse_study({"name": "ladder", "models": ["smollm2-135m", "pythia-70m"], "datasets": ["python-docs"],
                        "context_lens": [128, 512], "seeds": [3, 4], "max_eval_tokens": 1024, "batch_tokens": 2048,
                        "scaling": scaling, **changes})


def _points(study) -> list[ScalingPointRun]:
    return [r for r in expand(study) if r.kind == "scaling_point"]


def test_one_point_per_model_with_the_study_defaults():
    study = _study({})
    points = _points(study)
    assert [p.model.name for p in points] == ["smollm2-135m", "pythia-70m"]
    for p in points:
        assert (p.dataset, p.context_len, p.seed) == ("python-docs", 128, 3)  # the study's first of each
        assert (p.max_eval_tokens, p.batch_tokens) == (1024, 2048)
        assert p.statistics == STATISTIC_KEYS and p.dependencies() == {}
        assert p.config()["kind"] == "scaling_point" and p.config()["method"] == "chunks"
        cfg = p.scaling_config()
        assert cfg.models == (p.model.name,) and cfg.data.context_len == 128 and cfg.data.seed == 3
    assert {r.kind for r in expand(study)} == {"baseline", "scaling_point"}
    without = parse_study({"name": "x", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [64]})
    assert without.section("scaling") is None and _points(without) == []


def test_section_values_override_the_study_and_statistics_are_canonical():
    a = _points(_study({"statistics": ["sw_count", "perplexity"], "context_len": 512, "seed": 9,
                        "max_eval_tokens": 256, "control_seeds": [5], "tail_fraction": 0.01,
                        "x_axis": "n_params_non_embedding"}))
    b = _points(_study({"statistics": ["perplexity", "sw_count"], "context_len": 512, "seed": 9,
                        "max_eval_tokens": 256, "control_seeds": [5], "tail_fraction": 0.01,
                        "x_axis": "n_params_non_embedding"}))
    assert a[0].statistics == ("perplexity", "sw_count")
    assert (a[0].context_len, a[0].seed, a[0].max_eval_tokens, a[0].control_seeds) == (512, 9, 256, (5,))
    assert run_key(a[0], FP) == run_key(b[0], FP)  # the order of the list is not part of the protocol
    assert run_key(a[0], FP) != run_key(_points(_study({}))[0], FP)


@pytest.mark.parametrize("scaling, wanted", [
    ({"tail_fraktion": 0.01}, "study.scaling: unknown key 'tail_fraktion'"),
    ({"statistics": ["bits_per_bite"]}, "study.scaling.statistics: unknown scaling statistic 'bits_per_bite'"),
    ({"statistics": ["sw_count", "sw_count"]}, "study.scaling.statistics: "),
    ({"x_axis": "flops"}, "study.scaling.x_axis: unknown x axis 'flops'"),
    ({"tail_fraction": 1.5}, "study.scaling.tail_fraction: 1.5 must be in (0, 1)"),
    ({"tail_fraction": "big"}, "study.scaling.tail_fraction: expected float"),
    ({"control_seeds": []}, "study.scaling.control_seeds: give at least one"),
    ({"op": "zeroo"}, "study.scaling.op: "),
    ({"context_len": 1}, "study.scaling.context_len must be ≥ 2"),
    ({"max_eval_tokens": 0}, "study.scaling.max_eval_tokens must be ≥ 1"),
    ({"dataset": "pyton-docs"}, "study.scaling.dataset: "),
    ([1, 2], "study.scaling: expected a mapping (ScalingSection)"),
])
def test_schema_errors_name_the_key_path_and_the_fix(scaling, wanted):
    with pytest.raises(EsaError) as exc:
        _study(scaling)
    assert str(exc.value).startswith(wanted), str(exc.value)


def test_did_you_mean_for_keys_and_statistics():
    with pytest.raises(EsaError, match="Did you mean 'tail_fraction'"):
        _study({"tail_fraktion": 0.01})
    with pytest.raises(EsaError, match="Did you mean 'bits_per_byte'"):
        _study({"statistics": ["bits_per_bite"]})


def test_a_relative_dataset_is_relative_to_the_study_file(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text " * 50)
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmodels: [smollm2-135m]\ndatasets: [python-docs]\ncontext_lens: [64]\n"
                    "scaling: {dataset: ./corpus.txt}\n")
    (point,) = _points(load_study(path))
    assert point.dataset == str((tmp_path / "corpus.txt").resolve())


def test_plan_counts_every_trial_and_the_super_weight_searches():
    study = _study({"control_seeds": [0, 1, 2], "calib_samples": 4})
    rows = [r for r in plan(study, measure=False) if r.run.kind == "scaling_point"]
    assert len(rows) == 2 and all(r.tokens == 1024 for r in rows)
    # baseline + the zeroed targets (deterministic op: once) + 3 random_k draws, plus 2 searches of 4 windows
    assert rows[0].passes == pytest.approx(1 + 1 + 3 + 2 * 4 * 128 / 1024)
    cheap = [r for r in plan(_study({"statistics": ["bits_per_byte"]}), measure=False)
             if r.run.kind == "scaling_point"]
    assert cheap[0].passes == 1.0  # nothing but the unperturbed pass is measured
    assert rows[1].seconds is not None and rows[1].seconds > cheap[1].seconds


def test_the_shipped_scaling_study_is_a_ladder_of_every_model():
    from pathlib import Path

    study = load_study(Path(__file__).parents[2] / "studies" / "scaling.yaml")
    points = _points(study)
    assert [p.model.name for p in points] == [m.name for m in study.models]
    assert {p.model.name for p in points} >= {"smollm2-135m", "pythia-70m", "pythia-12b"}
    assert all(p.context_len == study.section("scaling").context_len for p in points)
