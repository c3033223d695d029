"""Reading a results database, read-only: the one reader that reports, exports, the scaling fits and the
Python API use (none of them writes SQL of its own), and the CSV/Parquet export (wide: one row per run;
long: one row per run × numeric metric)."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from esa.core.errors import EsaError
from esa.store.sqlite import _inspect

IN_STUDY = (" run_id IN (SELECT sr.run_id FROM study_runs sr JOIN studies s ON s.study_id = sr.study_id "
            "WHERE s.name = ? OR s.study_id = ?)")  # a study by name or id


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # how the store's JSON writes them


def decoded(value):
    """A stored scalar as computed: the store writes non-finite floats as the strings "nan"/"inf"/"-inf"."""
    return NONFINITE.get(value, value) if isinstance(value, str) else value


def _cell(value):
    """A flat frame's cell: lists and dicts as their stored JSON, non-finite strings as floats."""
    return json.dumps(value) if isinstance(value, (list, dict)) else decoded(value)


def flatten_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Expand the JSON columns: ``config.*``, ``model.*``, ``provenance.*`` and the metrics unprefixed.

    Non-finite numbers come back as float NaN/±Inf (not the store's strings), so a numeric column is float64.
    """
    parts = [rows[["run_id", "kind", "status", "error", "started_at", "finished_at"]].reset_index(drop=True)]
    for col, prefix in (("config", "config."), ("model", "model."), ("metrics", ""),
                        ("provenance", "provenance."), ("artifacts", "artifacts.")):
        flat = pd.json_normalize([json.loads(v) for v in rows[col]], sep=".")
        parts.append(flat.map(_cell).add_prefix(prefix))
    return pd.concat(parts, axis=1).infer_objects()


def numeric_leaves(obj, name: str = "") -> Iterator[tuple[str, float]]:
    """(dotted name, float) of every number in a metrics JSON, nested dicts and lists included (list items
    by index: ``ci.0``); the store's "nan"/"inf"/"-inf" strings count as numbers, booleans do not::

        {"acc": 0.5, "ci": [0.1, 0.9], "fit": {"alpha": "nan"}, "ok": true}
        → ("acc", 0.5), ("ci.0", 0.1), ("ci.1", 0.9), ("fit.alpha", nan)
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from numeric_leaves(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from numeric_leaves(value, f"{name}.{i}" if name else str(i))
    else:
        value = decoded(obj)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)


LONG_COLUMNS = ("run_id", "kind", "model", "dtype")  # then config.<key> of each top-level scalar setting


def long_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run × numeric metric leaf (:func:`numeric_leaves`): run_id, kind, model (name), dtype,
    ``config.<key>`` for every top-level scalar setting of the run (dataset, context_len, seed, task …),
    ``metric`` (dotted name) and ``value`` (float64). Runs without metrics (failed ones) add no rows."""
    records, settings = [], {}
    fields = ["run_id", "kind", "config", "model", "metrics"]
    for run_id, kind, config, fingerprint, metrics in rows[fields].itertuples(index=False):
        config, fingerprint = json.loads(config), json.loads(fingerprint)
        spec = config.get("model") if isinstance(config.get("model"), dict) else {}
        keys = {f"config.{k}": decoded(v) for k, v in config.items()
                if k != "kind" and not isinstance(v, (dict, list))}
        settings.update(dict.fromkeys(keys))
        base = {"run_id": run_id, "kind": kind, "model": spec.get("name") or fingerprint.get("model_id"),
                "dtype": spec.get("dtype") or fingerprint.get("dtype"), **keys}
        records += [{**base, "metric": metric, "value": value} for metric, value in numeric_leaves(json.loads(metrics))]
    columns = [*LONG_COLUMNS, *sorted(settings), "metric", "value"]
    frame = pd.DataFrame.from_records(records, columns=columns).infer_objects()
    return frame.astype({"value": "float64"})


def _run_rows(con: sqlite3.Connection, study: str | None) -> pd.DataFrame:
    where, params = (" WHERE" + IN_STUDY, (study, study)) if study is not None else ("", ())
    return pd.read_sql("SELECT * FROM runs" + where + " ORDER BY started_at", con, params=params)


def read_frame(con: sqlite3.Connection, study: str | None = None, long: bool = False) -> pd.DataFrame:
    """One row per run (of ``study``, by name or id) with its JSON columns flattened (:func:`flatten_runs`);
    ``long``: one row per run × numeric metric (:func:`long_runs`)."""
    rows = _run_rows(con, study)
    return long_runs(rows) if long else flatten_runs(rows)


def read_arrays(con: sqlite3.Connection, root: Path, run_id: str) -> dict[str, np.ndarray]:
    """The per-window arrays of a completed run (``root``: the database's folder)."""
    row = con.execute("SELECT artifacts FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None or "per_window" not in json.loads(row[0]):
        raise EsaError(f"run {run_id} has no per-window artifacts in {root}")
    with np.load(root / json.loads(row[0])["per_window"]) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class StoredRun:
    """One row of the ``runs`` table with its JSON columns decoded."""

    run_id: str
    kind: str
    status: str  # completed | failed
    error: str | None
    config: dict
    model: dict  # fingerprint
    metrics: dict
    started_at: str
    root: Path | None = None  # the database's folder: artifact paths in ``metrics`` are relative to it
    finished_at: str | None = None
    provenance: dict | None = None  # ESA and library versions, device, of the process that computed it

    @property
    def model_name(self) -> str:
        return str((self.config.get("model") or {}).get("name") or self.model.get("model_id") or "?")


class Reader:
    """A read-only view of an ESA results database. Anything that is not one is refused in one line.

    ``with Reader(db) as r: r.runs(study="demo", kind="perturbation")`` — rows as :class:`StoredRun`,
    ``r.frame()`` as a flat DataFrame, ``r.arrays(run_id)`` the per-window arrays, ``r.studies()`` the names.
    """

    def __init__(self, db: str | Path) -> None:
        self.path = Path(db)
        if not self.path.is_file():
            raise EsaError(f"results database {self.path} does not exist; run `esa run STUDY.yaml --db "
                           f"{self.path}` first")
        try:
            state = _inspect(self.path)
        except EsaError as exc:
            why = str(exc).split(";")[0].removeprefix(str(self.path)).strip()  # drop the advice about --db
            raise EsaError(f"{self.path} is not an ESA results database ({why}); pass a database written by "
                           "`esa run STUDY.yaml --db FILE`") from exc
        if state != "esa":
            raise EsaError(f"{self.path} holds no ESA results; run a study into it with `esa run STUDY.yaml "
                           f"--db {self.path}`")
        self.con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def runs(self, study: str | None = None, kind: str | None = None, completed: bool = False) -> list[StoredRun]:
        """The runs (of ``study``, by name or id; of ``kind``; only completed ones), oldest first."""
        conds, params = [], []
        if study is not None:
            conds.append(IN_STUDY)
            params += [study, study]
        if kind is not None:
            conds.append(" kind = ?")
            params.append(kind)
        if completed:
            conds.append(" status = 'completed'")
        where = " WHERE" + " AND".join(conds) if conds else ""
        rows = self.con.execute("SELECT run_id, kind, status, error, config, model, metrics, started_at, "
                                "finished_at, provenance FROM runs" + where + " ORDER BY started_at, run_id",
                                params).fetchall()
        root = self.path.resolve().parent
        return [StoredRun(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), json.loads(r[6]), r[7], root,
                          r[8], json.loads(r[9])) for r in rows]

    def studies(self) -> list[tuple[str, int]]:
        """(study name, number of linked runs) of every study recorded, oldest first."""
        return [(r[0], r[1]) for r in self.con.execute(
            "SELECT s.name, COUNT(sr.run_id) FROM studies s LEFT JOIN study_runs sr ON s.study_id = sr.study_id "
            "GROUP BY s.study_id ORDER BY s.created_at")]

    def frame(self, study: str | None = None, long: bool = False) -> pd.DataFrame:
        return read_frame(self.con, study, long)

    def arrays(self, run_id: str) -> dict[str, np.ndarray]:
        return read_arrays(self.con, self.path.resolve().parent, run_id)

    def documents(self, run_id: str) -> dict[str, dict]:
        """name → the JSON documents a run stored beside its row (e.g. ``protocol``: a protocol's full result)."""
        row = self.con.execute("SELECT artifacts FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        paths = {k: v for k, v in json.loads(row[0]).items() if v.endswith(".json")} if row else {}
        root = self.path.resolve().parent
        return {name: json.loads((root / rel).read_text(encoding="utf-8")) for name, rel in paths.items()}


EXPORT_FORMATS = ("csv", "parquet")


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding values of several types (a setting that is a number in one kind and a string
    in another) as strings, which Parquet needs; missing values stay missing."""
    out = frame.copy()
    for col in out.select_dtypes(include="object").columns:
        if len({type(v) for v in out[col] if not pd.isna(v)}) > 1:
            out[col] = out[col].map(lambda v: v if pd.isna(v) else str(v))
    return out


def export(db: str | Path, out: str | Path, fmt: str | None = None, study: str | None = None,
           long: bool = False) -> int:
    """Write the runs of ``db`` (optionally one study's) as CSV or Parquet; returns the row count.

    Wide (default): one row per run (:func:`flatten_runs`). ``long``: one row per run × numeric metric
    (:func:`long_runs`) — the shape ``groupby``/``pivot`` and plotting libraries want. Either way a
    non-finite number is a float NaN/±Inf (CSV: empty cell / ``inf``; pandas reads both back as float64)."""
    out = Path(out)
    fmt = fmt or out.suffix.lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise EsaError(f"unknown export format {fmt!r}; use --format csv or parquet")
    with Reader(db) as reader:
        frame = reader.frame(study, long)
        has_runs = bool(reader.runs(study)) if long else not frame.empty
    if study is not None and not has_runs:
        raise EsaError(f"no runs of study {study!r} in {db}; check the name (`esa results {db}` lists them)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        _parquet_safe(frame).to_parquet(out, index=False)
    return len(frame)


def study_names(db: str | Path) -> list[tuple[str, int]]:
    """(study name, number of linked runs) for every study recorded in ``db``."""
    with Reader(db) as reader:
        return reader.studies()
