"""Dataset specs: any Hugging Face hub dataset, or a local dataset file or directory, named by one string.

Grammar (``:``-separated; an empty part takes its default, so ``org/name::train`` skips the config)::

    org/name[@REV][:config][:split][:field]   a hub dataset (needs the hub, or the local datasets cache)
    PATH[:field]                              a local .parquet or .arrow file, or a save_to_disk Dataset directory
    PATH[:split][:field]                      a directory with splits: a save_to_disk DatasetDict, or parquet files
                                              whose names hold the split (``test-00000-of-00001.parquet``)

Defaults: ``split`` is ``test``, ``field`` (the text column) is ``text``, ``config`` is the dataset's default and
``REV`` (a branch, tag or commit) is the hub's ``main``. A string is local when its path part exists, starts with
``/``, ``.`` or ``~``, or ends in a local suffix; otherwise ``org/name`` is a hub id. The registered names
(``wikitext-2`` …), ``NAME=PATH`` and ``.txt``/``.jsonl`` files are read by :mod:`esa.data.corpora` as before.

:func:`read_spec` returns the rows and, for a hub dataset, the commit ``datasets`` resolved (the directory of
its cache files); a local spec has no revision — the corpus's content sha256 identifies it instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from esa.core.errors import EsaError

DEFAULT_SPLIT = "test"
DEFAULT_FIELD = "text"
DATASET_SUFFIXES = (".parquet", ".arrow")  # local files read through ``datasets``
TEXT_SUFFIXES = (".txt", ".jsonl")  # local files read by esa.data.corpora
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells repository ids
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset spec: where the rows live and which column holds the text."""

    path: str  # hub id (org/name) or local file/directory, as given
    hub: bool
    config: str | None = None  # hub: the dataset's config (subset); None → its default
    split: str = DEFAULT_SPLIT  # hub and directories with splits; ignored by files and Dataset directories
    field: str = DEFAULT_FIELD  # the text column
    revision: str | None = None  # hub: a branch, tag or commit (org/name@REV); None → main


def _has_splits(path: Path) -> bool:
    """A directory whose rows come in splits (a DatasetDict, or parquet files named by split)."""
    return path.is_dir() and not (path / "state.json").exists()


def _local_prefix(pieces: list[str]) -> int:
    """How many leading ``:``-pieces form an existing path (longest first; 0 when none does)."""
    for k in range(len(pieces), 0, -1):
        if Path(":".join(pieces[:k])).expanduser().exists():
            return k
    return 0


def is_spec(text: str) -> bool:
    """Whether ``text`` has the form of a dataset spec, judged without reading it: a hub ``org/name``, any path
    with a ``/``, or a path part that ends in ``.parquet``/``.arrow`` or exists. ``foo.parquet`` and
    ``foo.parquet:text`` are specs (whether or not the file exists yet: :func:`parse_spec` says so when it is
    read); a bare unknown word such as ``wikitxt`` is not, so the caller can answer it with "did you mean"."""
    head = text.partition(":")[0]
    return "/" in text or head.endswith(DATASET_SUFFIXES) or Path(head).expanduser().exists()


def parse_spec(text: str) -> DataSpec:
    """Parse a dataset spec (grammar in the module docstring); local paths are checked for existence.

    Positional parts, left to right; empty parts keep their defaults. Examples::

        parse_spec("allenai/c4:en:validation")
        # DataSpec(path="allenai/c4", hub=True, config="en", split="validation", field="text")
        parse_spec("org/name@v1.0::train:content")
        # DataSpec(path="org/name", hub=True, config=None, split="train", field="content", revision="v1.0")
        parse_spec("/data/docs.parquet:body")  # a file: the one suffix is the field
        # DataSpec(path="/data/docs.parquet", hub=False, split="test", field="body")
        parse_spec("/data/dd:validation")      # dd a save_to_disk DatasetDict: the first suffix is the split
        # DataSpec(path="/data/dd", hub=False, split="validation", field="text")
    """
    pieces = text.split(":")
    k = _local_prefix(pieces)
    head, parts = (":".join(pieces[:k]), pieces[k:]) if k else (pieces[0], pieces[1:])
    repo, _, revision = head.partition("@")
    if not k and HUB_ID.fullmatch(repo) and not repo.endswith(DATASET_SUFFIXES + TEXT_SUFFIXES):
        if len(parts) > 3:
            raise EsaError(f"dataset spec {text!r} has {len(parts)} parts after the id; a hub dataset takes "
                           f"org/name[@REV][:config][:split][:field]")
        config, split, field = (parts + ["", "", ""])[:3]
        return DataSpec(repo, True, config or None, split or DEFAULT_SPLIT, field or DEFAULT_FIELD, revision or None)
    if not k:
        raise EsaError(f"dataset {head!r} does not exist; give a readable .txt/.jsonl/.parquet/.arrow file, a "
                       f"save_to_disk directory, or a hub dataset as org/name[:config][:split][:field]")
    path = Path(head).expanduser()
    slots = ("split", "field") if _has_splits(path) else ("field",)
    if len(parts) > len(slots):
        grammar = "PATH[:split][:field]" if len(slots) == 2 else "PATH[:field]"
        raise EsaError(f"dataset spec {text!r} has too many ':' parts for {head} (it takes {grammar})")
    given = {slot: part for slot, part in zip(slots, parts) if part}
    return DataSpec(head, False, split=given.get("split", DEFAULT_SPLIT), field=given.get("field", DEFAULT_FIELD))


def hub_revision(data) -> str | None:
    """The hub commit a ``datasets.Dataset`` was built from: its cache files live in
    ``<cache>/<org>___<name>/<config>/<version>/<commit>/``; None when it has no such path (streamed, local)."""
    for info in getattr(data, "cache_files", None) or ():
        name = Path(info.get("filename", "")).parent.name
        if COMMIT.fullmatch(name):
            return name
    return None


def column(data, field: str, where: str, max_docs: int | None = None) -> tuple[str, ...]:
    """The string column ``field`` of ``data`` (first ``max_docs`` rows), or one EsaError listing the columns."""
    if field not in data.column_names:
        raise EsaError(f"{where} has no field {field!r}; its columns are {', '.join(data.column_names)} — name "
                       f"the text column as the spec's last part (PATH:field, org/name:config:split:field)")
    feature = data.features[field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise EsaError(f"{where}: field {field!r} holds {feature}, not text; name a string column "
                       f"({', '.join(data.column_names)})")
    rows = data[field]
    return tuple(rows[:max_docs] if max_docs else rows)


def read_parquet(path: Path, split: str = DEFAULT_SPLIT):
    """A parquet file, or the ``*{split}*.parquet`` files under a directory (the hub's layout), as a Dataset."""
    import datasets

    files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob(f"*{split}*.parquet"))
    if not files:
        raise EsaError(f"no {split} parquet files under {path}; give the .parquet file itself or a save_to_disk "
                       f"directory")
    return datasets.load_dataset("parquet", data_files=files, split="train")


def _open_local(spec: DataSpec):
    import datasets

    path = Path(spec.path).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(path))
        if spec.split not in splits:
            raise EsaError(f"{spec.path} has splits {', '.join(splits)}, not {spec.split!r}; pick one: "
                           f"{spec.path}:{next(iter(splits))}")
        return splits[spec.split]
    if path.is_dir() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    if path.suffix == ".parquet" or path.is_dir():
        return read_parquet(path, spec.split)
    raise EsaError(f"cannot read {spec.path} as a dataset; give a .txt, .jsonl, .parquet or .arrow file or a "
                   f"save_to_disk directory")


def _offline() -> bool:
    return any(os.environ.get(k, "0") not in ("0", "", "false", "False") for k in ("HF_HUB_OFFLINE",
                                                                                 "HF_DATASETS_OFFLINE"))


def _hub_failure(spec: DataSpec, exc: Exception | None) -> str:
    """One line: why the hub dataset could not be read and how to pass a local copy instead."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if exc is None:
        why = f"the hub ({endpoint}) is unreachable"
    elif _offline() and not isinstance(exc, ValueError):  # ValueError: an unknown config or split of a cached one
        why = "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and it is not in the local datasets cache"
    else:
        why = "datasets could not load it"
    detail = f" ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})" \
        if exc is not None else ""
    return (f"dataset {spec.path!r} (config {spec.config or 'default'}, split {spec.split}) could not be read: "
            f"{why}{detail}; where the hub is reachable save it with datasets.load_dataset(...).save_to_disk(DIR) "
            f"and pass --datasets DIR[:field], or a local .parquet/.arrow/.txt file")


def read_hub(spec: DataSpec):
    """The hub dataset's split through ``datasets.load_dataset`` (the cache offline); fails fast when the hub is
    unreachable and the run is not marked offline (with HF_HUB_OFFLINE=1, ``datasets`` reads its cache)."""
    import datasets

    from esa.models import hub_reachable

    if not _offline() and not hub_reachable():
        raise EsaError(_hub_failure(spec, None) + "; or set HF_HUB_OFFLINE=1 to read the local datasets cache")
    try:
        return datasets.load_dataset(spec.path, spec.config, split=spec.split, revision=spec.revision)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise EsaError(_hub_failure(spec, exc)) from exc


def read_spec(text: str) -> tuple[str, tuple[str, ...], str | None]:
    """(provenance, rows of the text field, hub revision or None) of the dataset spec ``text``."""
    spec = parse_spec(text)
    if spec.hub:
        data = read_hub(spec)
        rev = hub_revision(data) or spec.revision
        source = f"hf:{spec.path}/{spec.config or 'default'}:{spec.split}:{spec.field}"
        return source, column(data, spec.field, text), rev
    data = _open_local(spec)  # provenance: the resolved path and the spec's own parts, as given
    return f"file:{Path(spec.path).expanduser().resolve()}{text[len(spec.path):]}", column(data, spec.field, text), None
