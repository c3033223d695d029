"""Study dose_response and bitscan sections: strict schema, expansion, dependency-carrying run ids, plan cost."""

import pytest

from esa.core.errors import EsaError
from esa.executors import plan, resolved_config, run_key
from esa.study import expand, parse_study

SENS = {"scorers": ["magnitude", "wanda"], "k": 16, "calibration_tokens": 128}
DOSE = {"targets": [{"name": "top", "ranking": "wanda"}, {"name": "row", "spec": "rows:*.mlp.down_proj.weight:0"}],
        "ks": [1, 4], "ops": [{"op": "scale", "values": [0.0, 2.0]},
                              {"op": "gauss_noise", "values": [0.1], "params": {"relative_to": "tensor_std"}}],
        "trials": 2}
BITS = {"targets": [{"name": "top", "ranking": "magnitude"}], "top_n": 2, "bits": ["sign", 30], "max_flips": 3,
        "greedy_pool": 3}
FP = {"model_id": "m", "revision": "sha256:1", "source": "/here"}


def _study(**changes):
    data = {"name": "c", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [64],
            "seeds": [0, 1], "max_eval_tokens": 256, "sensitivity": SENS, "dose_response": DOSE, "bitscan": BITS}
    return parse_study({**data, **changes})


@pytest.mark.parametrize("change, wanted", [
    ({"dose_response": {**DOSE, "kss": [1]}}, r"dose_response: unknown key 'kss'.*Did you mean 'ks'"),
    ({"dose_response": {**DOSE, "ks": "10"}}, r"dose_response\.ks: expected a list of int"),
    ({"bitscan": {**BITS, "top_n": 2.5}}, r"bitscan\.top_n: expected int"),
    ({"dose_response": {**DOSE, "targets": [{"name": "t", "ranking": "grad"}]}},
     r"dose_response\.targets\[0\]\.ranking: unknown scorer 'grad'.*list it under sensitivity\.scorers"),
    ({"sensitivity": None, "bitscan": None}, r"needs a sensitivity: section"),
    ({"bitscan": {**BITS, "targets": [{"name": "t", "ranking": "act_mag", "k": 2}]}}, r"bitscan\.targets\[0\]"),
    ({"dose_response": {**DOSE, "ks": [1, 17]}}, r"1 ≤ k ≤ sensitivity\.k \(16\)"),
    ({"dose_response": {**DOSE, "ks": []}}, r"give the ranking target a k, or list ks"),
    ({"dose_response": {**DOSE, "ops": [{"op": "zero", "values": [1]}]}}, r"no strength to sweep"),
    ({"dose_response": {**DOSE, "ops": [{"op": "scal", "values": [1]}]}}, r"Did you mean 'scale'"),
    ({"dose_response": {**DOSE, "ops": [{"op": "scale", "values": [2], "params": {"factor": 1}}]}},
     r"'factor' is the swept parameter"),
    ({"dose_response": {**DOSE, "controls": ["bottom_k"]}}, r"unknown dose-response control 'bottom_k'"),
    ({"bitscan": {**BITS, "bits": ["sing"]}}, r"bitscan\.bits: cannot read bit 'sing'.*fp32"),
    ({"bitscan": {**BITS, "bits": [31]}, "dtype": "bf16"}, r"bitscan\.bits.*bf16"),
    ({"bitscan": {**BITS, "top_n": 20}}, r"without k the target is the top top_n=20"),
    ({"bitscan": {**BITS, "targets": [{"name": "s", "spec": "superweights", "k": 3}]}}, r"only a ranking target"),
    ({"dose_response": {**DOSE, "seeds": [0, 2]}}, r"dose_response\.seeds: \[2\] not among the study's seeds"),
    ({"bitscan": {**BITS, "seeds": [5]}}, r"bitscan\.seeds: \[5\] not among"),
])
def test_section_mistakes_are_refused(change, wanted):
    with pytest.raises(EsaError, match=wanted):
        _study(**change)


def test_expansion_counts_order_and_dependencies():
    runs = expand(_study())
    kinds = [r.kind for r in runs]
    assert kinds == sorted(kinds, key=["baseline", "sensitivity", "dose_response", "bitscan"].index)
    dose = [r for r in runs if r.kind == "dose_response"]
    # per seed: ranking target × ks (2) × ops (2) + spec target × ops (2)
    assert len(dose) == 2 * (2 * 2 + 2)
    top = [r for r in dose if r.target == "top"]
    assert sorted({r.k for r in top}) == [1, 4] and all(r.control_seeds == (0, 1) for r in dose)
    assert {(r.op, r.parameter, r.values) for r in dose} == {("scale", "factor", (0.0, 2.0)),
                                                          ("gauss_noise:relative_to=tensor_std", "sigma", (0.1,))}
    assert all(r.ranking_run in runs and r.ranking_run.scorer == "wanda" and r.ranking_run.seed == r.seed
               for r in top)
    assert all(not r.dependencies() for r in dose if r.target == "row")
    bits = [r for r in runs if r.kind == "bitscan"]
    assert len(bits) == 2 and all(r.k == 2 and r.bits == ("sign", "30") for r in bits)
    # magnitude needs no data: both seeds' bit scans read seed 0's ranking
    assert {r.ranking_run.seed for r in bits} == {0} and bits[0].ranking_run in runs


def test_whole_split_expands_the_first_seed_only():
    runs = expand(_study(max_eval_tokens=None))
    assert {r.seed for r in runs if r.kind in ("dose_response", "bitscan")} == {0}


def test_run_id_includes_its_dependency():
    base = next(r for r in expand(_study()) if r.kind == "dose_response" and r.target == "top")
    other_study = _study(sensitivity={**SENS, "calibration_tokens": 256})
    other = next(r for r in expand(other_study) if r.kind == "dose_response" and r.config() == base.config())
    assert base.config() == other.config()  # the run's own settings are identical …
    assert resolved_config(base, FP)["depends_on"] == {"ranking": run_key(base.ranking_run, FP)}
    assert run_key(base, FP) != run_key(other, FP)  # … its ranking is not, so neither is its id
    spec_run = next(r for r in expand(_study()) if r.kind == "dose_response" and r.target == "row")
    same = next(r for r in expand(other_study) if r.kind == "dose_response" and r.config() == spec_run.config())
    assert run_key(spec_run, FP) == run_key(same, FP)  # no ranking used: no change


def test_plan_counts_trial_passes():
    rows = {(r.run.kind, getattr(r.run, "target", None), getattr(r.run, "op", None)): r
            for r in plan(_study(models=["pythia-70m"]), measure=False)}
    scale = rows[("dose_response", "top", "scale")]
    assert scale.tokens == 256 and scale.passes == 1 + 2 * (1 + 2)  # baseline + 2 values × (target + 2 draws)
    noise = rows[("dose_response", "top", "gauss_noise:relative_to=tensor_std")]
    assert noise.passes == 1 + 1 * (2 + 2)  # a random op repeats the target once per control seed
    bits = rows[("bitscan", "top", None)]
    assert bits.passes == 1 + 2 * 2 + (3 - 1) + (3 - 2)  # baseline, 4 single flips, greedy steps 2 and 3
    assert bits.seconds == pytest.approx(scale.seconds * bits.passes / scale.passes)


def test_study_files_with_causal_sections_validate():
    from pathlib import Path

    from esa.study import load_study

    root = Path(__file__).resolve().parents[2] / "studies"
    found = [load_study(p) for p in sorted(root.glob("*.yaml"))]
    assert any(s.section("dose_response") is not None for s in found)
    assert any(s.section("bitscan") is not None for s in found)


def test_sections_can_run_on_a_subset_of_the_seeds():
    runs = expand(_study(dose_response={**DOSE, "seeds": [1]}, bitscan={**BITS, "seeds": [0]}))
    assert {r.seed for r in runs if r.kind == "dose_response"} == {1}
    assert {r.seed for r in runs if r.kind == "bitscan"} == {0}
    assert {r.seed for r in runs if r.kind == "baseline"} == {0, 1}
    top = [r for r in runs if r.kind == "dose_response" and r.ranking is not None]
    assert all(r.ranking_run.seed == 1 for r in top)  # the ranking of the same seed
