"""Corpus-derived zero-shot tasks: cloze and multiple-choice continuation items generated from any corpus.

These are **not** published benchmarks: they are built here, deterministically, from whatever text
:func:`esa.data.corpora.load_corpus` reads, so that an offline run has hundreds of items (enough to resolve a
few points of accuracy) instead of a fixture's twenty. Every name starts with ``corpus_`` and names its corpus,
so no table can pass them off as LAMBADA or HellaSwag.

Names, accepted wherever a task name is (``zeroshot: {tasks: [...]}``, ``esa zeroshot --tasks``)::

    corpus_cloze:CORPUS[:KEY=VALUE]...      e.g. corpus_cloze:python-docs, corpus_cloze:/data/notes.txt:min_context=40
    corpus_mc:CORPUS[:KEY=VALUE]...         e.g. corpus_mc:python-docs:k=4:seed=1

``CORPUS`` is anything ``load_corpus`` reads (``python-docs``, a hub name, ``NAME=PATH``, a .txt/.jsonl/.parquet
path); trailing ``KEY=VALUE`` segments are the generator's parameters (a value holds no ``/``, so a
``NAME=/path`` corpus is never mistaken for one). Defaults are in :data:`PARAMS`.

**corpus_cloze** (LAMBADA-style last word, scored exactly as lm-eval's ``lambada_openai``: greedy-match ``acc``
and ``perplexity``, with that task's very prompt). Each document is split into paragraphs at blank lines;
heading underlines (``*****``, ``=====``) are dropped and whitespace is collapsed to single spaces. A
paragraph gives one item when, after stripping its sentence-final punctuation (``.!?:;``), its last word has
≥ ``min_target`` characters (all letters when ``alpha=1``) and ≥ ``min_context`` words precede it; the context
keeps at most the last ``max_context`` of them. Duplicate passages are kept once. Worked example::

    paragraph "The loop ends.\\n\\n"  →  text "The loop ends"  →  context "The loop"  continuation " ends"

**corpus_mc** (multiple-choice continuation, scored as every shipped MC task: ``acc`` and ``acc_norm``). Each
document's words (underlines dropped) are cut into consecutive, non-overlapping windows of ``context + span``
words; the first ``context`` words are the context, the next ``span`` the true option. The ``k`` distractors
are ``span``-word spans at random positions of ``k`` distinct *other* documents, redrawn when equal to the true
span or to each other; the true option's position is uniform. One ``numpy`` generator seeded by ``seed`` makes
every draw, so the same corpus, parameters and seed give the same items.

Generated rows have a fixed schema (:func:`write_rows` writes them as JSONL; ``--task-data NAME=rows.jsonl``
reads them back, validated like any task file):

* corpus_cloze: ``text`` (str; its last space-separated word is the target), ``doc`` (int, document index in
  the corpus), ``paragraph`` (int, paragraph index in that document). Only ``text`` is read by the prompt.
* corpus_mc: ``context`` (str), ``options`` (list of k+1 str), ``gold`` (int, index of the true option),
  ``doc`` (int), ``start`` (int, word offset of the context in the document), ``option_docs`` and
  ``option_starts`` (lists of int: the document and word offset each option was cut from). The prompt reads
  ``context``, ``options`` and ``gold``.

The item pool is every eligible passage; ``limit``/``seed`` of :func:`esa.evals.tasks.load_task_data` then pick
a seeded subsample, as for any task. :func:`generate` also returns the provenance stored in the results config
(``generator``): generator name and version, corpus name and source, the resolved parameters, the number of
documents and rows, and ``rows_sha256`` — the sha256 of the rows as :func:`write_rows` writes them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from esa.core.errors import EsaError
from esa.evals.tasks.spec import TaskSpec, multiple_choice

GENERATOR_VERSION = 1  # bump when the same name would generate different rows
# kind → {parameter: default}; every value is an int (alpha: 0/1)
PARAMS: dict[str, dict[str, int]] = {
    "corpus_cloze": {"min_context": 20, "max_context": 200, "min_target": 4, "alpha": 1},
    "corpus_mc": {"context": 48, "span": 16, "k": 3, "seed": 0},
}
_MINIMUM = {"alpha": 0, "seed": 0}  # every other parameter must be ≥ 1
_PARAM = re.compile(r"^([a-z_]+)=([A-Za-z0-9_.+-]*)$")  # no "/" or "=" in a value: NAME=/path stays a corpus
_UNDERLINE = re.compile(r"^\s*([=*\-~^#])\1{2,}\s*$")  # reST heading underlines
_FINAL_PUNCT = ".!?:;"


@dataclass(frozen=True)
class CorpusTask:
    """A parsed corpus-derived task name."""

    name: str  # as given, e.g. "corpus_mc:python-docs:k=4"
    kind: str  # "corpus_cloze" | "corpus_mc"
    corpus: str  # what load_corpus reads
    params: dict[str, int]  # every parameter, defaults filled in


def is_corpus_task(name: str) -> bool:
    return isinstance(name, str) and name.partition(":")[0] in PARAMS


def rebase(name: str, fix) -> str:
    """The task name with its corpus replaced by ``fix(corpus)`` (e.g. a study-relative path made absolute);
    names that are not corpus-derived come back unchanged. ``corpus_mc:./n.txt:k=4`` → ``corpus_mc:/s/n.txt:k=4``."""
    if not is_corpus_task(name):
        return name
    kind, _, rest = name.partition(":")
    segments = rest.split(":")
    n_params = next((i for i, seg in enumerate(reversed(segments)) if not _PARAM.match(seg)), len(segments))
    corpus, params = segments[:len(segments) - n_params], segments[len(segments) - n_params:]
    return ":".join([kind, fix(":".join(corpus)), *params]) if corpus else name


def _usage(kind: str) -> str:
    defaults = ":".join(f"{k}={v}" for k, v in PARAMS[kind].items())
    return f"use {kind}:CORPUS[:KEY=VALUE]..., e.g. {kind}:python-docs (defaults {defaults})"


def _check_corpus(name: str, corpus: str) -> None:
    """The names load_corpus accepts, checked without reading anything (a path is checked when read)."""
    from esa.data.corpora import LOCAL_SUFFIXES, corpus_names
    from esa.core.registry import suggest

    if corpus in corpus_names() or corpus.endswith(LOCAL_SUFFIXES) or "/" in corpus or "=" in corpus:
        return
    raise EsaError(f"task {name!r}: " + suggest(corpus, corpus_names(), "dataset")
                   + " Or give a path to a .txt/.jsonl/.parquet file.")


def _int(name: str, kind: str, key: str, value: str) -> int:
    if value.lower() in ("true", "false") and key == "alpha":
        return int(value.lower() == "true")
    lo = _MINIMUM.get(key, 1)
    try:
        out = int(value)
    except ValueError:
        out = None
    if out is None or out < lo or (key == "alpha" and out > 1):
        want = "0 or 1" if key == "alpha" else f"an integer ≥ {lo}"
        raise EsaError(f"task {name!r}: {key}={value!r} must be {want}; {_usage(kind)}")
    return out


@lru_cache(maxsize=256)
def parse(name: str) -> CorpusTask:
    """``corpus_mc:python-docs:k=4`` → CorpusTask; one EsaError line for any malformed name."""
    kind, _, rest = name.partition(":")
    if kind not in PARAMS:
        raise EsaError(f"task {name!r} is not corpus-derived; corpus tasks are {', '.join(PARAMS)}")
    segments = rest.split(":") if rest else []
    given: dict[str, int] = {}
    while segments and (m := _PARAM.match(segments[-1])):
        key, value = m.groups()
        if key not in PARAMS[kind]:
            raise EsaError(f"task {name!r}: unknown parameter {key!r}; {kind} takes "
                           f"{', '.join(PARAMS[kind])} ({_usage(kind)})")
        if key in given:
            raise EsaError(f"task {name!r}: parameter {key!r} is given twice")
        given[key] = _int(name, kind, key, value)
        segments.pop()
    corpus = ":".join(segments)
    if not corpus:
        raise EsaError(f"task {name!r} names no corpus; {_usage(kind)}")
    _check_corpus(name, corpus)
    params = {**PARAMS[kind], **given}
    if kind == "corpus_cloze" and params["max_context"] < params["min_context"]:
        raise EsaError(f"task {name!r}: max_context={params['max_context']} is below "
                       f"min_context={params['min_context']}; {_usage(kind)}")
    return CorpusTask(name, kind, corpus, params)


def _mc_prompt():
    return multiple_choice(text=lambda r: r["context"], choices=lambda r: r["options"], gold=lambda r: r["gold"])


@lru_cache(maxsize=256)
def task_spec(name: str, cloze_base: TaskSpec) -> TaskSpec:
    """The TaskSpec of a corpus-derived name: cloze reuses ``cloze_base``'s (lambada_openai's) prompt, kind and
    metrics — the registry passes it in, so this module never imports the task definitions."""
    task = parse(name)
    where = "esa.evals.tasks.corpus generator"
    if task.kind == "corpus_cloze":
        return replace(cloze_base, name=name, hub_path=where, hub_config=None,
                       split="generated", fields=("text",))
    return TaskSpec(name=name, hub_path=where, hub_config=None, split="generated",
                    fields=("context", "options", "gold"), prompt=_mc_prompt())


# ------------------------------------------------------------------------------------------- generation
def _lines_words(text: str) -> list[str]:
    """Words of ``text`` with heading-underline lines removed."""
    return " ".join(line for line in text.splitlines() if not _UNDERLINE.match(line)).split()


def _paragraphs(doc: str) -> list[list[str]]:
    return [_lines_words(p) for p in re.split(r"\n\s*\n", doc)]


def cloze_rows(documents: tuple[str, ...], min_context: int, max_context: int, min_target: int,
               alpha: int) -> list[dict]:
    """One row per eligible paragraph (see the module docstring), in corpus order, duplicates dropped."""
    rows, seen = [], set()
    for d, doc in enumerate(documents):
        for p, words in enumerate(_paragraphs(doc)):
            if len(words) < min_context + 1:
                continue
            target = words[-1].rstrip(_FINAL_PUNCT)
            if len(target) < min_target or (alpha and not target.isalpha()):
                continue
            text = " ".join(words[-(max_context + 1):-1] + [target])
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "doc": d, "paragraph": p})
    return rows


def _distractor(rng: np.random.Generator, words: list[str], span: int, taken: set[str]) -> tuple[int, str] | None:
    for _ in range(100):  # a collision needs repeated text; 100 draws that all collide means there is no other
        start = int(rng.integers(0, len(words) - span + 1))
        text = " ".join(words[start:start + span])
        if text not in taken:
            return start, text
    return None


def mc_rows(documents: tuple[str, ...], context: int, span: int, k: int, seed: int) -> list[dict]:
    """Windows of ``context + span`` words, each with ``k`` distractors from other documents (module docstring)."""
    words = [_lines_words(doc) for doc in documents]
    donors = np.array([d for d, w in enumerate(words) if len(w) >= span])
    rng = np.random.default_rng(seed)
    rows = []
    for d, w in enumerate(words):
        others = donors[donors != d]
        if len(w) >= context + span and len(others) < k:
            raise EsaError(f"corpus_mc needs k={k} other documents of ≥ span={span} words for distractors, "
                           f"but the corpus has only {len(others)} besides document {d}; lower k or span, or "
                           f"use a corpus with more documents")
        for start in range(0, len(w) - context - span + 1, context + span):
            true = " ".join(w[start + context:start + context + span])
            options, docs, starts = [true], [d], [start + context]
            for e in rng.choice(others, size=k, replace=False):
                drawn = _distractor(rng, words[e], span, set(options))
                if drawn is not None:
                    options.append(drawn[1])
                    docs.append(int(e))
                    starts.append(drawn[0])
            if len(options) < k + 1:
                continue  # a donor held nothing but copies of the true span (or of another option)
            gold = int(rng.integers(0, k + 1))
            order = [*range(1, gold + 1), 0, *range(gold + 1, k + 1)]  # the true option lands at ``gold``
            rows.append({"context": " ".join(w[start:start + context]), "options": [options[i] for i in order],
                         "gold": gold, "doc": d, "start": start, "option_docs": [docs[i] for i in order],
                         "option_starts": [starts[i] for i in order]})
    return rows


def rows_jsonl(rows: list[dict]) -> str:
    """The rows as JSONL, one canonical JSON object per line (what ``rows_sha256`` hashes)."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write generated rows as JSONL, readable back with ``--task-data NAME=PATH``."""
    path = Path(path)
    path.write_text(rows_jsonl(rows), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Generated:
    rows: list[dict]
    source: str  # TaskData.source, e.g. "corpus-derived:python-docs (python:pydoc_data.topics)"
    provenance: dict  # TaskData.generator: generator, version, corpus, parameters, rows_sha256 …


def generate(name: str) -> Generated:
    """Read the corpus a corpus-derived task names and generate its rows with their provenance."""
    from esa.data.corpora import load_corpus

    task = parse(name)
    try:
        corpus = load_corpus(task.corpus)
    except EsaError as exc:
        raise EsaError(f"task {name!r}: {exc}") from None
    build = cloze_rows if task.kind == "corpus_cloze" else mc_rows
    try:
        rows = build(corpus.documents, **task.params)
    except EsaError as exc:
        raise EsaError(f"task {name!r}: {exc}") from None
    if not rows:
        raise EsaError(f"task {name!r}: corpus {task.corpus!r} ({len(corpus.documents)} documents) yields no "
                       f"items with {task.params}; loosen the parameters ({_usage(task.kind)})")
    provenance = {"generator": task.kind, "generator_version": GENERATOR_VERSION, "corpus": corpus.name,
                  "corpus_source": corpus.source, "params": dict(task.params),
                  "n_documents": len(corpus.documents), "n_rows": len(rows),
                  "rows_sha256": hashlib.sha256(rows_jsonl(rows).encode("utf-8")).hexdigest()}
    return Generated(rows, f"corpus-derived:{corpus.name} ({corpus.source})", provenance)
