"""Experiment tracking on a real study (tracking tier: make test-tracking, offline): a small study on a tiny random
Llama runs through the real executor with MLflow (SQLite and file stores) and W&B (offline mode) trackers; each
store, read back with its own client, holds one run per ESA run with the stored config, metrics and files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

from mlflow.tracking import MlflowClient  # noqa: E402

from esa.cli import main  # noqa: E402
from esa.core.errors import EsaError  # noqa: E402
from esa.executors import run_study  # noqa: E402
from esa.store import Reader, RunRecord  # noqa: E402
from esa.study import parse_study  # noqa: E402
from esa.tracking import MlflowTracker, WandbTracker, flat_metrics, flat_params, tracked  # noqa: E402

pytestmark = pytest.mark.tracking


def _ms(stamp: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


@pytest.fixture(scope="module")
def study_run(make_study_dir):
    """Two baseline runs (with per-window artifacts) and a superweights run (nested metrics, no files), tracked
    by MLflow on SQLite and on its file store and by W&B offline, all beside the results database."""
    d = make_study_dir("tracking")
    out, labels = d / "out", {}
    study = parse_study({"name": "tracked", "models": [str(d / "model")], "datasets": [str(d / "corpus.txt")],
                         "context_lens": [32], "seeds": [0, 1], "max_eval_tokens": 62, "batch_tokens": 512,
                         "superweights": {"context_len": 32, "max_samples": 2}})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                           "WANDB_DIR": str(out)}.items():
            mp.setenv(key, value)
        uris = {"sqlite": f"sqlite:///{out}/mlflow.db", "file": (out / "mlruns").as_uri()}
        trackers = [MlflowTracker(uris["sqlite"]), MlflowTracker(uris["file"], "esa-file"),
                    WandbTracker("esa-test", mode="offline", dir=out)]

        def remember(kind, **info):
            if kind == "run":
                labels[info["record"].run_id] = info["label"]

        with tracked(remember, trackers, out / "esa.db") as on_event:
            summary = run_study(study, out / "esa.db", on_event=on_event)
        assert summary.ok and summary.completed == 3, summary
        with Reader(out / "esa.db") as reader:
            stored = {r.run_id: r for r in reader.runs()}
        yield {"out": out, "uris": uris, "labels": labels, "stored": stored}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


@pytest.mark.parametrize("store,experiment", [("sqlite", "esa"), ("file", "esa-file")])
def test_an_mlflow_store_holds_each_run_with_its_params_metrics_and_artifacts(study_run, store, experiment,
                                                                             tmp_path):
    client = MlflowClient(study_run["uris"][store])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    stored = study_run["stored"]
    assert len(runs) == len(stored) == 3
    by_id = {r.data.tags["esa_run_id"]: r for r in runs}
    assert set(by_id) == set(stored)  # one MLflow run per ESA run
    for rid, row in stored.items():
        run = by_id[rid]
        assert run.info.run_name == study_run["labels"][rid] and run.info.status == "FINISHED"
        assert run.data.tags["esa_kind"] == row.kind and run.data.tags["esa_status"] == "completed"
        assert run.data.params == flat_params(row.config)  # the resolved config, as stored
        assert run.data.metrics == flat_metrics(row.metrics)[0] and run.data.metrics
        assert (run.info.start_time, run.info.end_time) == (_ms(row.started_at), _ms(row.finished_at))
        folder = study_run["out"] / "artifacts" / rid
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == _files(folder)
        for name in _files(folder):  # byte for byte what the ESA store holds
            got = client.download_artifacts(run.info.run_id, name, str(tmp_path))
            assert Path(got).read_bytes() == (folder / name).read_bytes()
    assert {r.kind for r in stored.values()} == {"baseline", "superweights"}
    assert sum(bool(_files(study_run["out"] / "artifacts" / rid)) for rid in stored) == 2  # the baselines'


BLOCK = 32768  # the .wandb file: W&B's LevelDB-style log of protobuf Records, in 32 KiB blocks


def wandb_records(path: Path) -> list:
    """The Records of an offline run's ``run-<id>.wandb`` (what ``wandb sync`` uploads). W&B ≥ 0.19's
    wandb-core writes config and summary there only, not to files/config.yaml or wandb-summary.json."""
    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"  # ident, magic 0xBEE1, version 0
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]  # after a crc32
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _offline_run(path: Path) -> dict:
    run = {"config": {}, "summary": {}, "files": set(), "exit_code": None}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.update(name=rec.run.display_name, project=rec.run.project, tags=list(rec.run.tags))
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "summary":
            run["summary"].update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
        elif kind == "files":
            run["files"] |= {f.path for f in rec.files.files}
        elif kind == "exit":
            run["exit_code"] = rec.exit.exit_code
    return run


def test_wandb_offline_runs_hold_the_config_summary_and_files(study_run):
    dirs = sorted((study_run["out"] / "wandb").glob("offline-run-*"))
    assert len(dirs) == 3
    runs = {r["config"]["esa_run_id"]: (r, d) for d in dirs for r in [_offline_run(next(d.glob("run-*.wandb")))]}
    assert set(runs) == set(study_run["stored"])
    for rid, row in study_run["stored"].items():
        run, folder = runs[rid]
        assert run["name"] == study_run["labels"][rid] and run["project"] == "esa-test"
        assert run["tags"] == [row.kind, "completed"] and run["exit_code"] == 0
        assert {k: v for k, v in run["config"].items() if k not in ("_wandb", "esa_run_id")} == row.config
        finite, _ = flat_metrics(row.metrics)
        assert {k: run["summary"][k] for k in finite} == finite
        artifacts = _files(study_run["out"] / "artifacts" / rid)
        assert set(artifacts) <= run["files"] and all((folder / "files" / f).is_file() for f in artifacts)


def test_a_failed_run_is_failed_with_its_error_and_non_finite_metrics_are_tags(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stamp = ("2026-01-01T00:00:00.000+00:00", "2026-01-01T00:00:02.500+00:00")
    failed = RunRecord("f" * 64, "perturbation", {"op": "zero"}, {}, {}, {}, "failed", *stamp, "OOM: halve --k")
    collapsed = RunRecord("c" * 64, "bitscan", {"bits": ["sign"]}, {}, {}, {"ppl": math.inf, "nll": 2.0,
                                                                           "fit": {"r": math.nan}}, "completed", *stamp)
    with tracked(lambda kind, **info: None, [MlflowTracker(uri)], tmp_path / "esa.db") as on_event:
        for rec in (failed, collapsed):
            on_event("run", record=rec, label=rec.kind, done=1, total=2)
    client = MlflowClient(uri)
    runs = {r.data.tags["esa_run_id"]: r for r in client.search_runs([client.get_experiment_by_name("esa")
                                                                         .experiment_id])}
    bad, odd = runs["f" * 64], runs["c" * 64]
    assert bad.info.status == "FAILED" and bad.data.tags["esa_error"] == "OOM: halve --k" and not bad.data.metrics
    assert bad.data.params == {"op": "zero"} and bad.info.end_time - bad.info.start_time == 2500
    assert odd.info.status == "FINISHED" and odd.data.metrics == {"nll": 2.0}
    assert odd.data.tags["nonfinite.ppl"] == "inf" and odd.data.tags["nonfinite.fit.r"] == "nan"


def test_mlflows_file_store_without_its_opt_in_fails_before_any_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(EsaError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        tracked(print, [MlflowTracker((tmp_path / "mlruns").as_uri())])


def test_esa_run_track_mlflow_writes_a_store_beside_the_database(make_study_dir, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = make_study_dir("tracking_cli")
    (d / "s.yaml").write_text(json.dumps({"name": "cli", "models": ["./model"], "datasets": ["./corpus.txt"],
                                          "context_lens": [32], "seeds": [0], "max_eval_tokens": 62}))
    assert main(["run", str(d / "s.yaml"), "--db", str(d / "out" / "cli.db"), "--track", "mlflow"]) == 0
    assert "1 completed now" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{d / 'out' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("esa").experiment_id])
    with Reader(d / "out" / "cli.db") as reader:
        (row,) = reader.runs()
    assert run.data.tags["esa_run_id"] == row.run_id and run.data.params == flat_params(row.config)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["per_window.npz"]
    assert (d / "out" / "mlartifacts").is_dir()  # not in the cwd
