"""Zero-shot accuracy under perturbation: the prefix-cached item path equals the plain lm-eval-equal scorer, and
each arm's paired statistics are computed from the right items (tiny Llama, shipped task samples)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from esa.evals.tasks import load_task_data
from esa.evals.zeroshot import evaluate_task
from esa.perturb import from_coordinates, make_op, perturbed
from esa.perturb.protocols import EvalConfig, PerturbConfig, DoseConfig, dose_experiment, perturb_experiment
from esa.stats import mcnemar_exact
from helpers.models import tiny_loaded

FIXTURES = Path(__file__).parents[1] / "evals" / "fixtures"
TASKS = (("piqa", str(FIXTURES / "piqa.jsonl")), ("lambada_openai", str(FIXTURES / "lambada_openai.jsonl")))
DOWN = "model.layers.1.mlp.down_proj.weight"
TARGET = f"rows:{DOWN}:3"


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_loaded(tokenizer, seed=3)


@pytest.fixture(scope="module")
def data(corpus):
    return EvalConfig(dataset=corpus, context_len=32, max_eval_tokens=31 * 4, seed=1, n_boot=500,
                      collapse_ppl=1e12, tasks=TASKS)


def _plain(lm, targets=None, op=None) -> dict:
    """Each task scored by esa.evals.zeroshot.evaluate_task (the lm-eval-equal path), optionally perturbed."""
    out = {}
    for name, path in TASKS:
        task = load_task_data(name, path, None, 1)
        if targets is None:
            out[name] = evaluate_task(lm.model, lm.tokenizer, task).items
        else:
            with perturbed(lm.model, targets, op, seed=0):
                out[name] = evaluate_task(lm.model, lm.tokenizer, task).items
    return out


def test_cached_items_equal_the_plain_scorer_unperturbed_and_perturbed(lm, data):
    doc, arrays = perturb_experiment(lm, PerturbConfig(TARGET, "scale:factor=8", ("random_k",), None, (0,), data))
    plain_ref = _plain(lm)
    targets = from_coordinates(lm.model, [{"param": DOWN, "row": 3, "col": c} for c in range(128)])
    plain_pert = _plain(lm, targets, make_op("scale", factor=8.0))
    for name, _ in TASKS:
        ref = np.array([s.loglikelihoods[s.gold] for s in plain_ref[name]])
        pert = np.array([s.loglikelihoods[s.gold] for s in plain_pert[name]])
        np.testing.assert_allclose(arrays[f"task__{name}__reference_gold_ll"], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays[f"task__{name}__target_gold_ll"][0], pert, rtol=1e-5, atol=1e-5)
        correct = np.array([s.correct for s in plain_pert[name]])
        np.testing.assert_array_equal(arrays[f"task__{name}__target_correct"][0], correct)
        comp = next(c for c in doc["downstream"]["comparisons"] if c["arm"] == "target" and c["task"] == name)
        ref_correct = np.array([s.correct for s in plain_ref[name]])
        assert comp["acc"]["delta_acc"] == pytest.approx(correct.mean() - ref_correct.mean())
        assert comp["acc"]["p_mcnemar"] == pytest.approx(mcnemar_exact(ref_correct, correct)["p"])
        assert comp["loglik"]["mean_delta_loglik"] == pytest.approx((pert - ref).mean(), rel=1e-5, abs=1e-6)
    assert {c["task"] for c in doc["downstream"]["comparisons"]} == {"piqa", "lambada_openai"}
    (macro,) = [m for m in doc["downstream"]["macro"] if m["arm"] == "target"]  # two tasks, one repeat: a CI
    deltas = [c["acc"]["delta_acc"] for c in doc["downstream"]["comparisons"] if c["arm"] == "target"]
    assert macro["delta_acc"] == pytest.approx(np.mean(deltas))
    assert macro["ci_low"] <= macro["delta_acc"] <= macro["ci_high"]
    assert [t["n_items"] for t in doc["downstream"]["tasks"]] == [len(plain_ref[n]) for n, _ in TASKS]
    scoring = doc["data"]["task_scoring"]  # piqa's two solutions share their goal: one packed sequence per item
    assert scoring["shared_context"] and scoring["shared_items"] == len(plain_ref["piqa"])
    assert scoring["tokens_read"] < scoring["tokens_plain"]


def test_plain_windows_when_the_model_does_not_honour_shared_contexts(lm, data, monkeypatch):
    import esa.perturb.protocols.downstream as downstream

    monkeypatch.setattr(downstream, "agreement", lambda *a: "shared-context scores differ (simulated)")
    doc, arrays = perturb_experiment(lm, PerturbConfig(TARGET, "zero", (), None, (0,), data))
    assert doc["data"]["task_scoring"]["tokens_read"] == doc["data"]["task_scoring"]["tokens_plain"]
    assert any("plain windows: shared-context scores differ (simulated)" in n for n in doc["notes"])
    ref = np.array([s.loglikelihoods[s.gold] for s in _plain(lm)["piqa"]])
    np.testing.assert_allclose(arrays["task__piqa__reference_gold_ll"], ref, rtol=1e-5)


def test_task_tests_are_one_family_apart_from_the_nll_tests_and_weights_restored(lm, data):
    from esa.stats import holm

    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    doc, _ = perturb_experiment(lm, PerturbConfig(TARGET, "zero", ("random_k",), None, (0, 1), data))
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n
    comps = doc["downstream"]["comparisons"]
    rk = next(c for c in comps if c["arm"] == "random_k" and c["task"] == "piqa")
    assert rk["acc"]["test"].startswith("wilcoxon") and len(rk["acc"]["repeats_acc"]) == 2  # two control draws
    family = [(c[part], key) for c in comps for part in ("acc", "acc_norm", "loglik") if part in c
              for key in ("p_mcnemar", "p_wilcoxon") if key in c[part]]
    adjusted = holm([stats[key] for stats, key in family])
    assert [stats[f"{key}_holm"] for stats, key in family] == pytest.approx(list(adjusted))
    no_tasks, _ = perturb_experiment(lm, PerturbConfig(TARGET, "zero", ("random_k",), None, (0, 1),
                                                       dataclasses.replace(data, tasks=())))
    assert [c["p_wilcoxon_holm"] for c in doc["comparisons"]] == [c["p_wilcoxon_holm"] for c in no_tasks["comparisons"]]


def test_dose_response_has_downstream_per_value(lm, data):
    doc, arrays = dose_experiment(lm, DoseConfig(TARGET, "scale", (0, 1), (), dataclasses.replace(data)))
    names = [c["name"] for c in doc["downstream"]["comparisons"]]
    assert "target @ factor=1 · piqa" in names and "target @ factor=0 · lambada_openai" in names
    identity = next(c for c in doc["downstream"]["comparisons"] if c["name"] == "target @ factor=1 · piqa")
    assert identity["acc"]["delta_acc"] == 0.0 and identity["loglik"]["mean_delta_loglik"] == 0.0


def test_bitscan_scores_items_for_each_single_flip(lm, data):
    from esa.perturb.protocols import BitscanConfig, bitscan_experiment

    doc, arrays = bitscan_experiment(lm, BitscanConfig(f"{DOWN}[1,2]", 1, ("sign", "30"), 1, 2, data))
    comps = doc["downstream"]["comparisons"]
    assert [c["arm"] for c in comps if c["task"] == "piqa"] == [c["label"] for c in doc["cells"]]
    assert all(c["acc"]["test"] == "mcnemar_exact" for c in comps)
    correct = [k for k in arrays if k.startswith("task__piqa__") and k.endswith("_correct")]
    assert len(correct) == len(doc["cells"]) and all(arrays[k].shape[0] == 1 for k in correct)  # one repeat each
