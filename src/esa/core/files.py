"""Run directories: refuse to clobber, check writability up front, write files atomically."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from esa.core.errors import EsaError

RESULT_FILES = ("results.json", "manifest.json")


def check_target(path: Path, overwrite: bool) -> Path:
    """Refuse a directory that already holds results (unless ``overwrite``); check that it can be written."""
    path = Path(path)
    if any((path / f).exists() for f in RESULT_FILES) and not overwrite:
        raise EsaError(f"{path} already holds results; choose another --out-dir or pass --overwrite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".esa-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise EsaError(f"output directory {path} is not writable ({exc.strerror or exc}); "
                       "choose another --out-dir") from exc
    return path


def check_out_dir(out_dir: Path, overwrite: bool, owned: tuple[str, ...], what: str) -> Path:
    """Accept a new or empty directory; refuse a non-empty one unless ``overwrite`` — and even then unless it
    holds one of the ``owned`` files, i.e. an earlier ``what`` run, so ``--overwrite`` never replaces a
    directory ESA did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EsaError(f"--out-dir {out_dir} is a file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise EsaError(f"{out_dir} exists and is not empty; choose another --out-dir or pass --overwrite")
        if not any((out_dir / f).exists() for f in owned):
            raise EsaError(f"refusing to replace {out_dir}: it holds no {what} run (none of {', '.join(owned)}); "
                           "choose an empty or new --out-dir")
    return out_dir


@contextmanager
def staged_run_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging directory that replaces ``path`` only when the block succeeds.

    Earlier results in ``path`` stay untouched until the new run is complete, so a crash, an error or
    Ctrl-C mid-run loses nothing.
    """
    path = check_target(path, overwrite)
    stage = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    stage.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else repr(value)  # "nan" / "inf" survive strict JSON readers
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves a half-written result."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_arrays(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def as_float(value) -> float:
    """Inverse of the JSON encoding above: "nan"/"inf" strings back to floats."""
    return float(value) if value is not None else math.nan
