"""Corpus registry: named text sources → a list of documents, as each evaluation protocol reads them.

Hub corpora come through ``datasets`` (offline they must already be in the local cache); local ``.txt``
(one corpus, documents separated by blank lines) and ``.jsonl`` (field ``text``) files are read by path; any hub
dataset (``org/name[:config][:split][:field]``), local ``.parquet``/``.arrow`` files and ``save_to_disk``
directories are dataset specs (:mod:`esa.data.specs`). Every corpus records its hub revision (when it has one)
and the sha256 of its text (:meth:`Corpus.sha256`). The embedded ``python-docs`` corpus is the text of CPython's
``pydoc_data.topics`` and exists on every Python. ``NAME=PATH`` reads a registered corpus from a local copy in
its Hugging Face layout (a ``.parquet`` file, or a directory of them, with the hub's columns), e.g.
``wikitext-2=/data/wikitext-2-raw-v1/test-00000-of-00001.parquet`` — for offline runs and for ``ptb``.

A protocol may read a corpus from its own source (see :data:`PROTOCOL_SOURCES`):

* ``esa`` (``chunks``, ``sliding``, ``rolling`` without an lm-eval source): the split's rows, whitespace-only
  rows dropped;
* ``gptq``: the rows the GPTQ / SparseGPT / Wanda loaders join, empty rows kept, with their joiner and cut;
* ``lm-eval`` (``rolling`` on ``wikitext-2``): lm-eval's ``wikitext`` task — document-level pages, its
  detokenizer applied, word and byte counts on the raw page.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from esa.core.errors import EsaError
from esa.core.registry import Registry, suggest
from esa.data.specs import DATASET_SUFFIXES, column, hub_revision, is_spec, read_parquet, read_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubCorpus:
    """Where a named corpus lives on the hub (read with ``datasets.load_dataset``)."""

    path: str
    config: str | None
    split: str
    field: str = "text"
    data_files: str | None = None
    max_docs: int | None = None  # read only the first N rows (very large splits are streamed)
    script: bool = False  # a loading-script dataset: current ``datasets`` cannot read it from the hub
    stream: bool = False  # stream the split instead of downloading it whole (with max_docs)


@dataclass(frozen=True)
class Protocol:
    """How a protocol turns a corpus source into text (the GPTQ fields only matter to the ``gptq`` method)."""

    name: str  # "esa" | "gptq" | "lm-eval"
    source: HubCorpus
    joiner: str = "\n\n"  # gptq: the string the reference loader joins rows with
    stream_windows: int | None = None  # gptq: keep only the first N·ctx tokens of the stream (GPTQ c4_new: 256)
    detokenize: bool = False  # lm-eval: apply lm-eval's wikitext detokenizer; counts stay on the raw page


@dataclass(frozen=True)
class Corpus:
    name: str  # what the user gave: a registry name, NAME=PATH or a path
    source: str  # human-readable provenance (hub path/config/split, file path, python module)
    documents: tuple[str, ...]  # the texts that are tokenized (gptq: every row, empty ones included)
    protocol: str = "esa"  # "esa" | "gptq" | "lm-eval" — see the module docstring
    raw: tuple[str, ...] | None = None  # lm-eval: each document before detokenization (word/byte counts)
    joiner: str = "\n\n"  # what ``chunks``, ``sliding`` and ``gptq`` join documents with
    stream_windows: int | None = None  # gptq: the stream is cut to this many windows of ctx tokens
    revision: str | None = None  # hub: the dataset commit datasets resolved; None for local and embedded text

    def joined(self) -> str:
        """Documents joined by ``joiner`` — the text the ``chunks``, ``sliding`` and ``gptq`` methods tokenize."""
        return self.joiner.join(self.documents)

    def sha256(self) -> str:
        """Hex sha256 of :meth:`joined` as UTF-8: the text this protocol reads, identifying the corpus's content
        (a local file's bytes may differ: ``.txt`` blank-line runs become ``joiner``)."""
        return hashlib.sha256(self.joined().encode("utf-8")).hexdigest()


HUB_CORPORA: Registry[HubCorpus] = Registry("dataset")
HUB_CORPORA.register("wikitext-2", HubCorpus("wikitext", "wikitext-2-raw-v1", "test"))
HUB_CORPORA.register("wikitext-103", HubCorpus("wikitext", "wikitext-103-raw-v1", "test"))
HUB_CORPORA.register("c4", HubCorpus("allenai/c4", None, "validation",
                                     data_files="en/c4-validation.00000-of-00008.json.gz"))
HUB_CORPORA.register("openwebtext", HubCorpus("Skylion007/openwebtext", None, "train", max_docs=10_000,
                                              stream=True))
HUB_CORPORA.register("ptb", HubCorpus("ptb_text_only", "penn_treebank", "test", field="sentence", script=True))
HUB_CORPORA.register("pile-10k", HubCorpus("NeelNanda/pile-10k", None, "train"))

# Protocol-specific sources, after the reference loaders: IST-DASLab/gptq datautils.py (get_wikitext2, get_ptb,
# get_ptb_new, get_c4_new; SparseGPT and Wanda lib/data.py use the same) and lm-eval's tasks/wikitext/wikitext.yaml.
PROTOCOL_SOURCES: dict[tuple[str, str], Protocol] = {
    ("gptq", "wikitext-2"): Protocol("gptq", HUB_CORPORA.get("wikitext-2"), "\n\n"),
    ("gptq", "ptb"): Protocol("gptq", replace(HUB_CORPORA.get("ptb"), split="validation"), "\n\n"),
    ("gptq", "ptb-new"): Protocol("gptq", HUB_CORPORA.get("ptb"), " "),
    ("gptq", "c4"): Protocol("gptq", replace(HUB_CORPORA.get("c4"), max_docs=1100), " ", stream_windows=256),
    ("lm-eval", "wikitext-2"): Protocol("lm-eval", HubCorpus("EleutherAI/wikitext_document_level",
                                                             "wikitext-2-raw-v1", "test", field="page"),
                                        detokenize=True),
}

EMBEDDED = ("python-docs",)
LOCAL_SUFFIXES = (".txt", ".jsonl", *DATASET_SUFFIXES)


def corpus_names() -> list[str]:
    return list(EMBEDDED) + HUB_CORPORA.names()


def python_docs() -> Corpus:
    """The values of ``pydoc_data.topics.topics`` in sorted key order (~113k SmolLM2 tokens)."""
    from pydoc_data import topics

    docs = tuple(topics.topics[key] for key in sorted(topics.topics))
    return Corpus("python-docs", "python:pydoc_data.topics", docs)


def wikitext_detokenizer(page: str) -> str:
    """lm-eval's ``wikitext_detokenizer`` (lm_eval/tasks/wikitext/preprocess_wikitext.py, 0.4.x), rule for rule.

    Undoes WikiText's tokenization (`` @-@ `` → ``-``, `` , `` → ``, ``, ``= = =`` → ``===`` …) so the model reads
    natural text; lm-eval still counts words and bytes on the raw page.
    """
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                     (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(old, new)
    for pattern, repl in ((r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                          (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
                          (r"'\s*([^']*?)\s*'", r"'\1'")):
        s = re.sub(pattern, repl, s)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                     (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(old, new)
    return s


def _read_text(path: Path) -> str:
    """The file as UTF-8, or one EsaError naming the file, the byte offset and how to re-encode it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EsaError(f"corpus file {path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                       f"re-encode it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}") from None


def _read_local(path: Path) -> tuple[str, ...]:
    """A ``.jsonl`` file's ``text`` fields, or a ``.txt`` file's blank-line-separated documents."""
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EsaError(f"{path}:{lineno}: each JSONL line must be an object with a string field "
                               f"'text' ({type(exc).__name__}: {exc})") from exc
        return tuple(docs)
    return tuple(re.split(r"\n\s*\n", _read_text(path)))


def _read_hf_layout(path: Path, field: str, max_docs: int | None, split: str = "test") -> tuple[str, ...]:
    """Rows of ``field`` from a local parquet file (or a directory's ``*{split}*.parquet``), in file order."""
    data = read_parquet(path, split)
    if field not in data.column_names:
        raise EsaError(f"{path} has columns {data.column_names} but this protocol reads column {field!r}; "
                       f"give a file in the dataset's Hugging Face layout")
    return column(data, field, str(path), max_docs)


def _read_hub(name: str, spec: HubCorpus) -> tuple[tuple[str, ...], str | None]:
    """The rows of a registered hub corpus and the commit ``datasets`` resolved (None when streamed)."""
    import datasets

    if spec.script:
        raise EsaError(f"dataset {name!r} is the loading-script dataset {spec.path}, which datasets "
                       f"{datasets.__version__} cannot read; pass a local copy in its layout (column "
                       f"{spec.field!r}, e.g. from the hub's refs/convert/parquet branch): --datasets "
                       f"{name}=/path/to/{spec.split}.parquet")
    try:
        if spec.stream:
            stream = datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
            rows, revision = [row[spec.field] for _, row in zip(range(spec.max_docs), stream)], None
        else:
            data = datasets.load_dataset(spec.path, spec.config, split=spec.split, data_files=spec.data_files)
            rows = data[spec.field][:spec.max_docs] if spec.max_docs else data[spec.field]
            revision = hub_revision(data)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise EsaError(
            f"dataset {name!r} ({spec.path}, {spec.split}) could not be read: the hub is unreachable and it is "
            f"not in the local datasets cache ({type(exc).__name__}); pass a local .txt/.jsonl file instead, "
            f"e.g. --datasets /path/to/{name}.txt, or a local copy in its layout ({name}=/path/to/file.parquet), "
            f"or use the embedded corpus python-docs"
        ) from exc
    return tuple(rows), revision


def _split(name: str) -> tuple[str, str]:
    """``NAME=PATH`` → (NAME, PATH); anything else (a name, or a path that may contain ``=``) → (name, "")."""
    key, sep, local = name.partition("=")
    return (key, local) if sep and "/" not in key and local else (name, "")


def protocol_of(name: str, method: str) -> Protocol | None:
    """The protocol-specific source of corpus ``name`` (``NAME`` or ``NAME=PATH``) under ``method``, if any."""
    key = _split(name)[0]
    if method == "gptq":
        return PROTOCOL_SOURCES.get(("gptq", key))
    return PROTOCOL_SOURCES.get(("lm-eval", key)) if method == "rolling" else None


Rows = tuple[str, str, tuple[str, ...], Protocol | None, str | None]  # name, provenance, rows, protocol, revision


def _rows(name: str, method: str) -> Rows:
    """(corpus name, provenance, raw rows, protocol source, hub revision) for ``name`` read the way ``method``
    reads it."""
    key, local = _split(name)
    proto = protocol_of(name, method)
    if local:
        if key not in HUB_CORPORA and proto is None:
            raise EsaError(suggest(key, corpus_names(), "dataset") + " (NAME=PATH needs a registered NAME)")
        spec = proto.source if proto else HUB_CORPORA.get(key)
        path = _existing(local)
        return (name, f"file:{path.resolve()} ({spec.path} layout)",
                _read_hf_layout(path, spec.field, spec.max_docs, spec.split), proto, None)
    if name == "python-docs":
        return name, "python:pydoc_data.topics", python_docs().documents, proto, None
    if name in HUB_CORPORA or proto is not None:
        spec = proto.source if proto else HUB_CORPORA.get(name)
        rows, revision = _read_hub(name, spec)
        return name, f"hf:{spec.path}/{spec.config or spec.data_files}:{spec.split}", rows, proto, revision
    if name.endswith((".txt", ".jsonl")):
        path = _existing(name)
        return name, f"file:{path.resolve()}", _read_local(path), proto, None
    if is_spec(name):  # esa.data.specs: a hub org/name, a path with a :field part, a dataset file or directory
        source, rows, revision = read_spec(name)
        return name, source, rows, proto, revision
    raise EsaError(suggest(name, corpus_names(), "dataset") + " Or give a .txt/.jsonl/.parquet/.arrow file, a "
                   "save_to_disk directory or a hub dataset org/name[:config][:split][:field].")


def _existing(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise EsaError(f"corpus file {name!r} does not exist; give a readable .txt, .jsonl, .parquet or .arrow path or "
                       f"one of: {', '.join(corpus_names())}")
    return path


def load_corpus(name: str, method: str = "chunks") -> Corpus:
    """Read a corpus by registry name, ``NAME=PATH``, local path or dataset spec (:mod:`esa.data.specs`: hub
    ``org/name[:config][:split][:field]``, ``.parquet``/``.arrow``/``save_to_disk`` paths), the way window
    ``method`` reads it.

    ``gptq`` keeps every row (the reference loaders join empty rows too); other methods drop whitespace-only
    rows. Refuses a corpus with no text.
    """
    name, source, rows, proto, revision = _rows(name, method)
    if not any(r.strip() for r in rows):
        raise EsaError(f"corpus {name!r} is empty or whitespace-only; give a file with text in it")
    if method == "gptq":
        joiner = proto.joiner if proto else "\n\n"
        return Corpus(name, source, rows, "gptq", joiner=joiner, stream_windows=proto and proto.stream_windows,
                      revision=revision)
    docs = tuple(d for d in rows if d.strip())
    if proto is not None and proto.detokenize:
        return Corpus(name, source, tuple(wikitext_detokenizer(d) for d in docs), "lm-eval", raw=docs,
                      revision=revision)
    return Corpus(name, source, docs, revision=revision)


def for_method(corpus: Corpus, method: str) -> Corpus:
    """``corpus`` as ``method`` reads it: re-read when the method's protocol has its own source or rows."""
    wanted = "gptq" if method == "gptq" else ("lm-eval" if protocol_of(corpus.name, method) else "esa")
    return corpus if corpus.protocol == wanted else load_corpus(corpus.name, method)
