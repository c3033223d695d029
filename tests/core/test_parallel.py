"""Data parallelism inside a run (esa.core.parallel): replicas split a run's units and each ends with the
single-process result, bit for bit — here with threads as replicas and a LocalBoard (the Ray executor's
replicas are tested in tests/executors/test_data_parallel_ray.py)."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from esa.core import parallel
from esa.core.parallel import LOST, LocalBoard, heir
from esa.core.provenance import provenance
from esa.executors import RunContext, execute_run, run_key
from esa.models import ModelSpec, load_model
from esa.study import expand, parse_study

TIMING = ("seconds", "per_second", "peak_memory", "mfu", "wall", "bytes")  # clocks and memory of one process


def _threads(work, count: int = 2) -> list:
    """``work(i)`` for i in 0..count-1 on threads side by side; their results in order."""
    out = [None] * count
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, work(i))) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def _replicas(count: int, work, board) -> list:
    """Run ``work(index)`` as replica index of ``count`` on threads sharing ``board``: [(result, share stats)];
    the first error of a replica is raised here (the share has left the board, so no other replica waits)."""
    def body(i):
        try:
            with parallel.share(i, count, board) as share:
                return work(i), share.stats()
        except BaseException as exc:  # noqa: BLE001 — re-raised in the test's thread
            return exc
    out = _threads(body, count)
    errors = [o for o in out if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    return out


def test_units_are_split_by_owner_and_every_replica_gets_every_value():
    computed_by = {}

    def work(i):
        def f(k):
            computed_by.setdefault(k, []).append(i)
            return k * k
        return [parallel.unit(f"u{k}", f, k) for k in range(10)]

    (a, sa), (b, sb) = _replicas(2, work, LocalBoard(2))
    assert a == b == [k * k for k in range(10)]
    assert computed_by == {k: [k % 2] for k in range(10)}  # each unit computed once, by its owner
    assert sa["computed"] == sb["computed"] == 5 and sa["units"] == 10 and sa["taken_over"] == 0


def test_outside_a_share_a_unit_is_just_the_call():
    assert parallel.active() is None
    assert parallel.unit("x", lambda a, b: a + b, 2, 3) == 5


def test_a_lost_owner_s_units_are_computed_by_the_survivor():
    board = LocalBoard(2)
    board.leave(1)  # replica 1 died before posting anything
    with parallel.share(0, 2, board) as share:
        values = [parallel.unit(f"u{k}", lambda k=k: k + 1) for k in range(6)]
    assert values == [1, 2, 3, 4, 5, 6] and share.computed == 6 and share.taken_over == 3


def test_heirs_spread_a_lost_replica_s_units_over_the_survivors():
    assert [heir(u, 4, {1}) for u in range(6)] == [0, 2, 3, 0, 2, 3]
    assert heir(0, 2, {0, 1}) is None
    board = LocalBoard(3)
    board.leave(2)
    assert board.look(5, owner=2, me=0) is None and board.look(5, owner=2, me=1) is LOST  # 5 % 2 → replica 1
    assert board.look(4, owner=1, me=0) is None  # the owner is alive: wait for it


def test_a_diverged_replica_computes_the_unit_itself(caplog):
    board = LocalBoard(2)
    board.post(1, "other step", "wrong value")
    with parallel.share(0, 2, board) as share:
        got = parallel.unit("u0", lambda: "mine0"), parallel.unit("u1", lambda: "right value")
    assert got == ("mine0", "right value") and share.diverged == [1]
    assert "its owner posted 'other step'" in caplog.text


def test_an_error_of_the_owner_is_raised_on_every_replica():
    def work(i):
        return parallel.unit("u0", lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory (simulated)")))

    with pytest.raises(RuntimeError, match="out of memory"):
        _replicas(2, work, LocalBoard(2))


# ------------------------------------------------------------------ whole runs: equal to a single process

FIX = Path(__file__).resolve().parents[1] / "evals" / "fixtures"  # offline zero-shot items
PIQA = {"tasks": ["piqa"], "task_data": {"piqa": str(FIX / "piqa.jsonl")}}
SECTIONS = {  # per-window (baseline), per-item (zeroshot, downstream) and per-trial (perturbation, bitscan) arrays
    "sensitivity": {"scorers": ["magnitude"], "k": 8},
    "zeroshot": {**PIQA, "limit": 8},
    "perturbation": {"targets": [{"name": "top", "ranking": "magnitude", "k": 4}], "ops": [{"op": "zero"}],
                     "controls": ["random_k"], "trials": 2, **PIQA, "task_limit": 6},
    "bitscan": {"targets": [{"name": "top", "ranking": "magnitude", "k": 2}], "top_n": 2,
                "bits": ["sign", "exponent_msb"], "max_flips": 2, "greedy_pool": 2, "collapse_ppl": 1e6},
}


def _diff(a, b, path=""):
    """(path, a, b) wherever two JSON-like values differ (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b and not (a != a and b != b):
        yield path, a, b


def deterministic(value):
    """``value`` without its clock readings (timings, throughput, memory), which no two executions share."""
    if isinstance(value, dict):
        return {k: deterministic(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [deterministic(v) for v in value]
    return value


class ReplicaDied(BaseException):
    """A replica's process ending mid-run (not an Exception: nothing catches it, nothing is posted)."""


def _die_after(model, calls: int) -> None:
    """Make ``model``'s final norm (reached by full forwards and replays alike) kill its replica at call ``calls``."""
    count = iter(range(calls, 0, -1))

    def hook(module, args):
        if next(count, 0) <= 1:
            raise ReplicaDied
    model.model.norm.register_forward_pre_hook(hook)


def _execute_all(lm, runs, boards: dict | None = None, index: int = 0, die_in: str = "") -> dict:
    """Every run on ``lm`` in order, as one process would — or as replica ``index`` of 2, each run on its own
    board (``boards``: run id → LocalBoard); ``die_in``: this replica dies a few forwards into that kind's run."""
    ctx, prov, fp = RunContext(), provenance(lm.device), lm.fingerprint.to_dict()
    out = {}
    for run in runs:
        rid = run_key(run, fp)
        if boards is None:
            out[rid] = execute_run(lm, run, rid, ctx, prov)
            continue
        if run.kind == die_in:
            _die_after(lm.model, 3)
        try:
            with parallel.share(index, 2, boards[rid]) as share:
                out[rid] = execute_run(lm, run, rid, ctx, prov)
        except ReplicaDied:  # gone: it leaves every later run too (the Ray driver marks it lost)
            for later in runs[runs.index(run):]:
                boards[run_key(later, fp)].leave(index)
            return out
        out[rid].provenance = share.stats()
    return out


@pytest.fixture(scope="module", params=[64, 1024], ids=["batches-split", "trials-split"])
def single(tiny_study_dir, request):
    """(runs, model spec, {run id: record}) of the study executed by one process: with 3 micro-batches per
    scoring (each replica holds its own batches' prefix-cache states and scores them) or 1 (every replica holds
    the whole cache; trials are split instead)."""
    study = parse_study({"name": "dp", "models": [str(tiny_study_dir / "model")],
                         "datasets": [str(tiny_study_dir / "corpus.txt")], "context_lens": [32], "seeds": [0],
                         "max_eval_tokens": 192, "batch_tokens": request.param, **SECTIONS})
    spec = ModelSpec(str(tiny_study_dir / "model"))
    runs = expand(study)
    return runs, spec, _execute_all(load_model(spec), runs)


def test_replicas_of_a_study_equal_a_single_process(single):
    runs, spec, reference = single
    models = [load_model(spec), load_model(spec)]  # one model per replica: trials write weights in place
    boards = {rid: LocalBoard(2) for rid in reference}
    a, b = _threads(lambda i: _execute_all(models[i], runs, boards, i))
    split = {reference[rid].kind: (a[rid].provenance["computed"], b[rid].provenance["computed"],
                                   a[rid].provenance["units"]) for rid in a}
    assert split.pop("sensitivity") == (0, 0, 0)  # gradient/weight passes are no units: every replica repeats them
    assert all(x + y == n for x, y, n in split.values()), split  # each unit computed once …
    assert split["perturbation"][0] > 0 and split["perturbation"][1] > 0, split  # … and shared
    for rid, want in reference.items():
        assert want.status == "completed", want.error
        for got in (a[rid], b[rid]):
            assert got.status == "completed" and set(got.arrays) == set(want.arrays)
            for key in want.arrays:
                np.testing.assert_array_equal(got.arrays[key], want.arrays[key], err_msg=f"{want.kind} {key}")
            differ = list(_diff(deterministic(got.metrics), deterministic(want.metrics)))
            assert not differ, (want.kind, differ)
    for lm in models:  # trials restored every weight
        for (name, p), q in zip(lm.model.named_parameters(), load_model(spec).model.parameters()):
            assert torch.equal(p, q), name



def test_lost_survives_pickling_as_itself():  # a Ray board's answer arrives pickled
    import pickle

    assert pickle.loads(pickle.dumps(LOST)) is LOST


def test_a_replica_dying_mid_run_leaves_the_survivor_with_the_single_process_result(single):
    """Replica 1 dies three forwards into the perturbation run: replica 0 computes its units (re-capturing the
    prefix-cache states of replica 1's batches) and ends every run with the single-process arrays."""
    runs, spec, reference = single
    models = [load_model(spec), load_model(spec)]
    boards = {rid: LocalBoard(2) for rid in reference}
    survivor, dead = _threads(lambda i: _execute_all(models[i], runs, boards, i, die_in="perturbation" * i))
    order = [r.kind for r in runs]
    assert {r.kind for r in dead.values()} == set(order[:order.index("perturbation")])
    for rid, want in reference.items():
        got = survivor[rid]
        assert got.status == "completed", got.error
        for key in want.arrays:
            np.testing.assert_array_equal(got.arrays[key], want.arrays[key], err_msg=f"{want.kind} {key}")
    taken = {survivor[rid].kind: survivor[rid].provenance["taken_over"] for rid in survivor}
    assert taken["perturbation"] > 0 and taken["bitscan"] > 0 and taken["baseline"] == 0, taken  # after it died
    for (name, p), q in zip(models[0].model.named_parameters(), load_model(spec).model.parameters()):
        assert torch.equal(p, q), name
