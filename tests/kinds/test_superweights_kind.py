"""The superweights kind on the embedded SmolLM2: stored candidates equal a direct detector call, and the
report shows the stored numbers."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from esa.executors import run_study
from esa.kinds.superweights import KIND
from esa.report.study_report import load_runs
from esa.core.schema import parse_section
from esa.sensitivity.superweight_run import SuperWeightRun, window_batch
from esa.sensitivity.superweights import Thresholds, find_super_weights
from esa.study import expand, parse_study

SECTION = {"context_len": 64, "max_samples": 2}


def _study(**section):
    return parse_study({"name": "sw", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [64],
                        "seeds": [0], "max_eval_tokens": 63, "superweights": {**SECTION, **section}})


def test_section_is_strict_and_checked():
    from esa.core.errors import EsaError

    with pytest.raises(EsaError, match="unknown key 'iteration'"):
        parse_section(KIND.schema, {"iteration": 2}, "study.superweights")
    with pytest.raises(EsaError, match=r"seeds: \[7\] not among"):
        _study(seeds=[7])
    with pytest.raises(EsaError, match=r"study.superweights.spike_ratio=1.0 must be > 1"):
        _study(spike_ratio=1)
    (run,) = [r for r in expand(_study(spike_floor=20, require_input_spike=True))
              if r.kind == "superweights"]
    assert run.config()["thresholds"] == {**asdict(Thresholds()), "spike_floor": 20.0, "require_input_spike": True}


def test_stored_candidates_equal_the_detector_and_the_report(smol, tmp_path):
    study = _study()
    summary = run_study(study, tmp_path / "sw.db")
    assert summary.ok, summary
    runs, _ = load_runs(tmp_path / "sw.db")
    (run,) = [r for r in runs if r.kind == "superweights"]
    cfg = SuperWeightRun("python-docs", 64, 2, 0, 1)
    ids, _, _ = window_batch(smol, cfg)
    direct = find_super_weights(smol.model, ids, thresholds=cfg.thresholds)
    stored = run.metrics["candidates"]
    assert [(c["param_name"], c["row"], c["col"]) for c in stored] == \
        [(w.param_name, w.row, w.col) for w in direct.candidates]
    assert any(c["layer"] == 11 and (c["row"], c["col"]) == (507, 1229) for c in stored)  # SmolLM2's known one
    blocks = KIND.report.render([run])
    table = blocks[-1]
    assert [row[2] for row in table.rows] == [f"L{c['layer']} {c['param_name']}[{c['row']},{c['col']}]"
                                              for c in stored]
    assert KIND.summary(type("R", (), {"metrics": run.metrics})()).startswith(f"{len(stored)} candidate(s)")
