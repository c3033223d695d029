"""Task rows → validated items: from the hub through ``datasets`` or from a local JSONL in the same schema.

Every row is turned into its :class:`~esa.evals.tasks.spec.Prompt` while loading, so a malformed row fails at
once with its ``file:line``. ``limit`` with ``seed`` picks a seeded subsample (the seed chooses *which* items;
kept in dataset order); ``item_id`` is the row's index in the full split, so two runs pair on items.
Corpus-derived tasks (``corpus_cloze:CORPUS``, ``corpus_mc:CORPUS``) generate their rows from the corpus
(:mod:`esa.evals.tasks.corpus`) instead of reading the hub, and record the generator in ``TaskData.generator``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esa.core.errors import EsaError
from esa.evals.tasks.corpus import generate, is_corpus_task
from esa.evals.tasks.definitions import TASKS
from esa.evals.tasks.spec import Prompt, TaskSpec


@dataclass(frozen=True)
class TaskItem:
    item_id: int  # 0-based row index in the full split or file (lm-eval's doc_id)
    where: str  # "file.jsonl:LINE" or "hf:path[i]", for error messages
    prompt: Prompt


@dataclass(frozen=True)
class TaskData:
    task: TaskSpec
    source: str  # provenance: "file:/abs/path.jsonl" or "hf:path/config:split"
    items: tuple[TaskItem, ...]
    n_total: int  # rows in the split before subsampling
    limit: int | None
    seed: int
    seed_invariant: bool  # True when every row is used, so the seed changes nothing
    generator: dict | None = None  # corpus-derived tasks: corpus, parameters, rows_sha256 (corpus.generate)


def _schema_hint(spec: TaskSpec) -> str:
    return f"one JSON object per line with fields {', '.join(spec.fields)}"


def _prompt(spec: TaskSpec, row: object, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise EsaError(f"{where}: a {spec.name} row must be a JSON object ({_schema_hint(spec)})")
    missing = [f for f in spec.fields if f not in row]
    if missing:
        raise EsaError(
            f"{where}: {spec.name} row lacks field(s) {', '.join(missing)}; expected {_schema_hint(spec)}"
        )
    try:
        return spec.prompt(row)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise EsaError(
            f"{where}: malformed {spec.name} row ({type(exc).__name__}: {exc}); expected "
            f"{_schema_hint(spec)} as in the {spec.hub_path} dataset"
        ) from exc


def _read_jsonl(spec: TaskSpec, path: Path) -> list[TaskItem]:
    if not path.is_file():
        raise EsaError(
            f"task data file {str(path)!r} for {spec.name} does not exist; give a JSONL file with "
            f"{_schema_hint(spec)}"
        )
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EsaError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); expected {_schema_hint(spec)}"
            ) from exc
        items.append(TaskItem(len(items), where, _prompt(spec, row, where)))
    if not items:
        raise EsaError(f"task data file {str(path)!r} has no rows; expected {_schema_hint(spec)}")
    return items


def _read_hub(spec: TaskSpec) -> list[TaskItem]:
    import datasets

    try:
        rows = datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise EsaError(
            f"task {spec.name!r} needs {spec.hub_path}"
            f"{'/' + spec.hub_config if spec.hub_config else ''} ({spec.split} split), which is neither "
            f"reachable nor in the local datasets cache ({type(exc).__name__}); provide the split as a local "
            f"file with --task-data {spec.name}=/path/to/{spec.name}.jsonl ({_schema_hint(spec)})"
        ) from exc
    return [
        TaskItem(i, f"hf:{spec.hub_path}[{i}]", _prompt(spec, dict(row), f"hf:{spec.hub_path}[{i}]"))
        for i, row in enumerate(rows)
    ]


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` of ``n`` rows chosen by ``seed``; all rows if ``limit`` is None or ≥ n."""
    if limit is not None and limit < 1:
        raise EsaError(f"--limit must be a positive number of items, got {limit}")
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def load_task_data(
    name: str, data_path: str | None = None, limit: int | None = None, seed: int = 0
) -> TaskData:
    """Read, validate and (optionally) subsample one task's rows."""
    spec = TASKS.get(name)
    generator = None
    if data_path is not None:
        path = Path(data_path).expanduser()
        items, source = _read_jsonl(spec, path), f"file:{path.resolve()}"
    elif is_corpus_task(name):
        made = generate(name)
        items = [TaskItem(i, f"{name}[{i}]", _prompt(spec, row, f"{name}[{i}]")) for i, row in enumerate(made.rows)]
        source, generator = made.source, made.provenance
    else:
        items = _read_hub(spec)
        source = f"hf:{spec.hub_path}/{spec.hub_config or 'default'}:{spec.split}"
    keep = subsample(len(items), limit, seed)
    return TaskData(
        spec,
        source,
        tuple(items[i] for i in keep),
        len(items),
        limit,
        seed,
        seed_invariant=len(keep) == len(items),
        generator=generator,
    )
