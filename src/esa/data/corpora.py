"""Corpus registry: named text sources → a list of documents.

Hub corpora come through ``datasets`` (offline they must already be in the local cache); local ``.txt``
(one corpus, documents separated by blank lines) and ``.jsonl`` (field ``text``) files are read by path; the
embedded ``python-docs`` corpus is the text of CPython's ``pydoc_data.topics`` and exists on every Python.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from esa.errors import EsaError
from esa.registry import Registry, suggest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubCorpus:
    """Where a named corpus lives on the hub (read with ``datasets.load_dataset``)."""

    path: str
    config: str | None
    split: str
    field: str = "text"
    data_files: str | None = None
    max_docs: int | None = None  # read only the first N rows of very large splits (streamed)


@dataclass(frozen=True)
class Corpus:
    name: str  # registry name or the path the user gave
    source: str  # human-readable provenance (hub path/config/split, file path, python module)
    documents: tuple[str, ...]

    def joined(self) -> str:
        """Documents joined with a blank line — the text the ``chunks`` and ``sliding`` methods tokenize."""
        return "\n\n".join(self.documents)


HUB_CORPORA: Registry[HubCorpus] = Registry("dataset")
HUB_CORPORA.register("wikitext-2", HubCorpus("wikitext", "wikitext-2-raw-v1", "test"))
HUB_CORPORA.register("wikitext-103", HubCorpus("wikitext", "wikitext-103-raw-v1", "test"))
HUB_CORPORA.register("c4", HubCorpus("allenai/c4", None, "validation",
                                     data_files="en/c4-validation.00000-of-00008.json.gz"))
HUB_CORPORA.register("openwebtext", HubCorpus("Skylion007/openwebtext", None, "train", max_docs=10_000))
HUB_CORPORA.register("ptb", HubCorpus("ptb_text_only", "penn_treebank", "test", field="sentence"))
HUB_CORPORA.register("pile-10k", HubCorpus("NeelNanda/pile-10k", None, "train"))

EMBEDDED = ("python-docs",)


def corpus_names() -> list[str]:
    return list(EMBEDDED) + HUB_CORPORA.names()


def python_docs() -> Corpus:
    """The values of ``pydoc_data.topics.topics`` in sorted key order (~113k SmolLM2 tokens)."""
    from pydoc_data import topics

    docs = tuple(topics.topics[key] for key in sorted(topics.topics))
    return Corpus("python-docs", "python:pydoc_data.topics", docs)


def _read_local(path: Path) -> tuple[str, ...]:
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EsaError(f"{path}:{lineno}: each JSONL line must be an object with a string field "
                               f"'text' ({type(exc).__name__}: {exc})") from exc
        return tuple(docs)
    return tuple(re.split(r"\n\s*\n", path.read_text(encoding="utf-8")))


def _read_hub(name: str, spec: HubCorpus) -> tuple[str, ...]:
    import datasets

    try:
        if spec.max_docs:
            stream = datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
            rows = [row[spec.field] for _, row in zip(range(spec.max_docs), stream)]
        else:
            data = datasets.load_dataset(spec.path, spec.config, split=spec.split, data_files=spec.data_files)
            rows = data[spec.field]
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise EsaError(
            f"dataset {name!r} ({spec.path}, {spec.split}) could not be read: the hub is unreachable and it is "
            f"not in the local datasets cache ({type(exc).__name__}); pass a local .txt/.jsonl file instead, "
            f"e.g. --datasets /path/to/{name}.txt, or use the embedded corpus python-docs"
        ) from exc
    return tuple(rows)


def load_corpus(name: str) -> Corpus:
    """Read a corpus by registry name or local path; refuse empty or whitespace-only text."""
    if name == "python-docs":
        corpus = python_docs()
    elif name in HUB_CORPORA:
        spec = HUB_CORPORA.get(name)
        corpus = Corpus(name, f"hf:{spec.path}/{spec.config or spec.data_files}:{spec.split}",
                        _read_hub(name, spec))
    elif name.endswith((".txt", ".jsonl")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise EsaError(f"corpus file {name!r} does not exist; give a readable .txt or .jsonl path or one of: "
                           f"{', '.join(corpus_names())}")
        corpus = Corpus(name, f"file:{path.resolve()}", _read_local(path))
    else:
        raise EsaError(suggest(name, corpus_names(), "dataset") + " Or give a path to a .txt/.jsonl file.")
    docs = tuple(d for d in corpus.documents if d.strip())
    if not docs:
        raise EsaError(f"corpus {name!r} is empty or whitespace-only; give a file with text in it")
    return Corpus(corpus.name, corpus.source, docs)
