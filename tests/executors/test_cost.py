"""``provenance.cost`` of every run (wall time, device-hours, tokens/s, MFU) and ``esa plan --db`` timing runs at
the rates measured in a results database; on a tiny random Llama, CPU."""

import dataclasses
import statistics
from types import SimpleNamespace

import pytest
import torch
import yaml

from esa.cli import main
from esa.core import parallel
from esa.executors import plan, run_id, run_key, run_study
from esa.executors.core import Throughput, _scale, rate_in_db
from esa.executors.cost import device_count, forward_rate, run_cost
from esa.store import Reader, Store
from esa.study import expand, parse_study


def _spec(tiny_dir, **changes) -> dict:
    return {"name": "cost", "models": [str(tiny_dir / "model")], "datasets": [str(tiny_dir / "corpus.txt")],
            "context_lens": [32, 64], "seeds": [0, 1], "max_eval_tokens": 128, "batch_tokens": 512, **changes}


@pytest.fixture(scope="module")
def cost_db(tiny_study_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "cost.db"
    summary = run_study(parse_study(_spec(tiny_study_dir)), db)
    assert summary.ok and summary.completed == 4
    return db


def _stored(db):
    with Reader(db) as reader:
        return reader.runs(completed=True)


def test_every_run_stores_its_cost(cost_db):
    for r in _stored(cost_db):
        cost = r.provenance["cost"]
        assert cost["wall_seconds"] > 0 and cost["tokens"] == r.metrics["scored_tokens"] > 0
        assert cost["tokens_basis"] == "scored_tokens" and cost["passes"] == 1.0
        assert cost["tokens_per_second"] == pytest.approx(cost["tokens"] / cost["wall_seconds"], rel=1e-12)
        assert cost["device"] == "cpu" and cost["device_count"] == 0 and cost["replicas"] == 1
        assert cost["device_hours"] == pytest.approx(cost["wall_seconds"] / 3600, rel=1e-12)
        assert cost["mfu"] is None
    with Store(cost_db) as store:  # the flat frame (esa results) carries it as columns
        frame = store.runs_frame("cost")
    assert frame["provenance.cost.tokens_per_second"].gt(0).all()


def test_cost_does_not_change_run_ids(cost_db, tiny_study_dir):
    stored = {(r.config["context_len"], r.config["seed"]): r for r in _stored(cost_db)}
    for run in expand(parse_study(_spec(tiny_study_dir))):
        r = stored[(run.context_len, run.seed)]
        assert r.run_id == run_key(run, r.model) == run_id(r.config, r.model)


def _median_rate(db, ctx: int) -> float:
    return statistics.median(forward_rate(r.provenance["cost"]) for r in _stored(db) if r.config["context_len"] == ctx)


def test_plan_times_runs_at_the_rate_measured_in_the_db(cost_db, tiny_study_dir):
    rows = plan(parse_study(_spec(tiny_study_dir, context_lens=[32, 48, 64], seeds=[0])), measure=False, db=cost_db)
    for row in rows:
        near = 32 if row.run.context_len == 48 else row.run.context_len  # a tie goes to the shorter
        rate = _median_rate(cost_db, near)
        assert row.basis.startswith(f"measured in {cost_db}: 2 runs of kind baseline at ctx {near}")
        assert f"median {rate:,.0f} tok/s on cpu" in row.basis
        assert row.seconds == pytest.approx(row.tokens * row.passes / rate, rel=1e-12)
    assert "(nearest to 48)" in rows[1].basis


def test_plan_falls_back_without_measured_runs(cost_db, tiny_study_dir):
    (row,) = plan(parse_study(_spec(tiny_study_dir, context_lens=[32], seeds=[0], dtype="bf16")), measure=False,
                  db=cost_db)  # another dtype: no measured rate, and this local model has no nominal size
    assert row.basis.startswith("unknown") and row.seconds is None


def test_plan_uses_only_rates_measured_with_the_same_attention_kernel(cost_db, tiny_study_dir):
    (row,) = plan(parse_study(_spec(tiny_study_dir, context_lens=[32], seeds=[0], attention="eager")), measure=False,
                  db=cost_db)  # the db's runs ran `auto` (SDPA): their rate is not eager attention's
    assert row.basis.startswith("unknown") and row.seconds is None
    (same,) = plan(parse_study(_spec(tiny_study_dir, context_lens=[32], seeds=[0])), measure=False, db=cost_db)
    assert same.basis.startswith("measured in")


def test_plan_cli_prints_the_measured_basis(cost_db, tiny_study_dir, tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_spec(tiny_study_dir, context_lens=[64], seeds=[0])))
    assert main(["plan", str(tmp_path / "s.yaml"), "--no-measure", "--db", str(cost_db)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "measured in" in out and "1 run(s)" in out
    assert f"2 runs of kind baseline at ctx 64, median {_median_rate(cost_db, 64):,.0f} tok/s on cpu" in out


def test_plan_with_replicas_assumes_linear_scaling_without_runs_measured_so(cost_db, tiny_study_dir):
    study = parse_study(_spec(tiny_study_dir, context_lens=[64], seeds=[0]))
    (one,), (two,) = plan(study, measure=False, db=cost_db), plan(study, measure=False, db=cost_db, replicas=2)
    assert two.seconds == pytest.approx(one.seconds / 2, rel=1e-12)
    assert two.basis == f"{one.basis}; × 2 replicas, linear scaling assumed (none measured with 2)"


def _as_if_split(record, replicas: int, rate: float):
    """``record`` as if it had run shared by ``replicas`` replicas at ``rate`` tokens/s (the whole run's)."""
    cost = {**record.provenance["cost"], "replicas": replicas, "tokens_per_second": rate}
    return dataclasses.replace(record, provenance={**record.provenance, "cost": cost})


def test_plan_with_replicas_prefers_runs_measured_with_that_many(cost_db, tiny_study_dir):
    """Two replicas measured at 1.5× one process's rate (not 2×): the plan uses the measured 1.5×."""
    stored = [r for r in _stored(cost_db) if r.config["context_len"] == 64]
    single = _median_rate(cost_db, 64)
    shared = [_as_if_split(r, 2, 1.5 * single) for r in stored]
    run = expand(parse_study(_spec(tiny_study_dir, context_lens=[64], seeds=[0])))[0]
    tp = rate_in_db(stored + shared, run, "db", replicas=2)
    assert tp.tokens_per_second == pytest.approx(1.5 * single, rel=1e-12)
    assert tp.basis.endswith("; measured with 2 replicas") and "2 runs of kind baseline" in tp.basis
    alone = rate_in_db(stored + shared, run, "db", replicas=1)  # one replica: the runs measured with one
    assert alone.tokens_per_second == pytest.approx(single, rel=1e-12) and "replicas" not in alone.basis
    only_shared = rate_in_db(shared, run, "db", replicas=1)  # per process: 1.5× over 2 replicas = 0.75× each
    assert only_shared.tokens_per_second == pytest.approx(0.75 * single, rel=1e-12)


def test_replicas_do_not_shorten_a_kind_every_replica_repeats():
    tp = Throughput(100.0, "measured")
    assert _scale(tp, "baseline", 4).tokens_per_second == 400.0
    repeated = _scale(tp, "sensitivity", 4)
    assert repeated.tokens_per_second == 100.0 and "do not shorten it" in repeated.basis
    cost = {"tokens_per_second": 100.0, "passes": 3.0, "replicas": 4}  # a sensitivity run on 4 replicas
    assert forward_rate(cost, split=False) == 300.0 and forward_rate(cost) == 75.0


def test_plan_cli_says_the_replicas(cost_db, tiny_study_dir, tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_spec(tiny_study_dir, context_lens=[64], seeds=[0])))
    assert main(["plan", str(tmp_path / "s.yaml"), "--no-measure", "--db", str(cost_db), "--replicas", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "each shared by 3 replicas" in out and "× 3 replicas, linear scaling assumed" in out
    assert main(["plan", str(tmp_path / "s.yaml"), "--replicas", "0"]) == 2
    assert "--replicas 0: use 1 or more model replicas" in capsys.readouterr().err


def _fake_lm(device: str, device_map: dict | None = None):
    model = SimpleNamespace(hf_device_map=device_map) if device_map else SimpleNamespace()
    return SimpleNamespace(device=torch.device(device), model=model, fingerprint=SimpleNamespace(n_params=10))


def test_device_count_counts_the_gpus_of_a_device_map():
    assert device_count(_fake_lm("cpu")) == 0
    assert device_count(_fake_lm("cuda:0")) == 1
    assert device_count(_fake_lm("cuda:0", {"embed": 0, "layers.0": 1, "layers.1": 1, "lm_head": "cpu"})) == 2


def test_failed_and_data_parallel_costs(tiny_study_dir):
    run = expand(parse_study(_spec(tiny_study_dir, context_lens=[32], seeds=[0])))[0]
    lm = _fake_lm("cpu")
    failed = run_cost(lm, run, None, 2.0)
    assert failed["tokens"] is failed["tokens_per_second"] is failed["passes"] is None
    assert failed["device_hours"] == 2.0 / 3600 and forward_rate(failed) is None
    with parallel.share(0, 2, parallel.LocalBoard(2)):  # replica 0 of 2: the whole run's hours and rate
        split = run_cost(lm, run, {"scored_tokens": 100}, 2.0)
    assert split["replicas"] == 2 and split["device_hours"] == 2 * 2.0 / 3600
    assert split["tokens_per_second"] == 50.0 and forward_rate(split) == 25.0
    assert run_cost(lm, run, {}, 2.0)["tokens_basis"] == "budget"  # no scored_tokens: the kind's budget
