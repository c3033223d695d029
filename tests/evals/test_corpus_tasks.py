"""Corpus-derived zero-shot tasks (esa.evals.tasks.corpus): names, determinism, schema, item properties, scoring."""

import json
import math
from collections import Counter

import pytest

from esa.core.errors import EsaError
from esa.evals.tasks import TASKS, load_task_data
from esa.evals.tasks import corpus as ct
from esa.evals.zeroshot import evaluate_task
from esa.core.hashing import sha256_file
from esa.models.tiny import tiny_model

CLOZE, MC = "corpus_cloze:python-docs", "corpus_mc:python-docs"
CLOZE_KEYS = {"text", "doc", "paragraph"}
MC_KEYS = {"context", "options", "gold", "doc", "start", "option_docs", "option_starts"}


@pytest.fixture(scope="module")
def cloze():
    return ct.generate(CLOZE)


@pytest.fixture(scope="module")
def mc():
    return ct.generate(MC)


def _words_file(path, docs):
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------- names
def test_names_parse_with_defaults_and_parameters():
    assert ct.parse(MC) == ct.CorpusTask(MC, "corpus_mc", "python-docs", ct.PARAMS["corpus_mc"])
    t = ct.parse("corpus_cloze:wikitext-2=/data/wt2/test.parquet:min_context=40:alpha=false")
    assert t.corpus == "wikitext-2=/data/wt2/test.parquet"  # NAME=/path is the corpus, not a parameter
    assert t.params == {**ct.PARAMS["corpus_cloze"], "min_context": 40, "alpha": 0}
    assert ct.parse("corpus_mc:/d/notes.txt:seed=7").corpus == "/d/notes.txt"


def test_names_work_wherever_a_task_name_does():
    from esa.kinds.zeroshot import KIND
    from esa.core.schema import parse_section

    assert CLOZE in TASKS and MC in TASKS and "corpus_mc:python-docs:k=4" in TASKS
    assert CLOZE not in TASKS.names()  # names() stays the registered lm-eval tasks
    spec, lambada = TASKS.get(CLOZE), TASKS.get("lambada_openai")
    assert (spec.name, spec.kind, spec.metrics, spec.prompt) == (CLOZE, "greedy", lambada.metrics, lambada.prompt)
    assert TASKS.get(MC).kind == "multiple_choice" and TASKS.get(MC).metrics == ("acc", "acc_norm")
    section = parse_section(KIND.schema, {"tasks": [MC, CLOZE, "piqa"]}, "study.zeroshot")
    KIND.check(section, None, "study.zeroshot")


@pytest.mark.parametrize("name, message", [
    ("corpus_mc:python-doc", r"task 'corpus_mc:python-doc': unknown dataset 'python-doc'\. Did you mean 'python-docs'"),
    ("corpus_mc:python-docs:k=0", r"k='0' must be an integer ≥ 1; use corpus_mc:CORPUS"),
    ("corpus_mc:python-docs:k=three", r"k='three' must be an integer"),
    ("corpus_mc:python-docs:kk=3", r"unknown parameter 'kk'; corpus_mc takes context, span, k, seed"),
    ("corpus_mc:python-docs:k=3:k=4", r"parameter 'k' is given twice"),
    ("corpus_cloze", r"task 'corpus_cloze' names no corpus; use corpus_cloze:CORPUS"),
    ("corpus_cloze:python-docs:max_context=5", r"max_context=5 is below min_context=20"),
    ("corpus_cloze:python-docs:alpha=2", r"alpha='2' must be 0 or 1"),
    ("corpus_mc:/no/such/corpus.txt", r"task 'corpus_mc:/no/such/corpus\.txt': corpus file .* does not exist"),
    ("corpus_cloze:python-docs:min_context=5000:max_context=9000", r"yields no items .* loosen the parameters"),
])
def test_bad_names_give_one_line_errors(name, message):
    with pytest.raises(EsaError, match=message) as err:
        name in TASKS and load_task_data(name)  # noqa: B015 -- membership raises for a malformed name
    assert "\n" not in str(err.value)


def test_an_unknown_task_mentions_the_corpus_scheme():
    with pytest.raises(EsaError, match=r"Did you mean 'piqa'.*corpus-derived task: corpus_cloze:CORPUS"):
        TASKS.get("piqaa")


def test_a_study_check_reports_the_malformed_parameter():
    from esa.kinds.zeroshot import KIND
    from esa.core.schema import parse_section

    section = parse_section(KIND.schema, {"tasks": ["corpus_mc:python-docs:span=0"]}, "study.zeroshot")
    with pytest.raises(EsaError, match=r"span='0' must be an integer ≥ 1"):
        KIND.check(section, None, "study.zeroshot")


# ------------------------------------------------------------------------------ counts and determinism
def test_python_docs_yields_enough_items(cloze, mc):
    assert len(cloze.rows) >= 500 and len(mc.rows) >= 500
    assert cloze.provenance["n_rows"] == len(cloze.rows) and mc.provenance["n_documents"] == 79


def test_generation_is_deterministic_and_seeded(mc):
    again = ct.generate(MC)
    assert again.rows == mc.rows and again.provenance == mc.provenance
    other = ct.generate(MC + ":seed=1")
    assert other.rows != mc.rows and other.provenance["rows_sha256"] != mc.provenance["rows_sha256"]
    assert [r["context"] for r in other.rows] == [r["context"] for r in mc.rows]  # same windows, other draws
    assert ct.generate(CLOZE).rows == ct.generate(CLOZE).rows


def test_seeds_pick_different_subsets_of_identical_items():
    a, b, c = (load_task_data(MC, limit=40, seed=s) for s in (0, 0, 1))
    assert a.items == b.items and not a.seed_invariant
    assert [i.item_id for i in a.items] != [i.item_id for i in c.items]
    pool = {i.item_id: i.prompt for i in load_task_data(MC).items}
    assert all(pool[i.item_id] == i.prompt for i in c.items)  # a subset of the same pool, paired on item_id


def test_provenance_is_in_the_task_data(mc):
    data = load_task_data(MC)
    g = data.generator
    assert data.source == "corpus-derived:python-docs (python:pydoc_data.topics)" and data.task.split == "generated"
    assert {k: g[k] for k in ("generator", "generator_version", "corpus", "corpus_source", "params")} == {
        "generator": "corpus_mc", "generator_version": ct.GENERATOR_VERSION, "corpus": "python-docs",
        "corpus_source": "python:pydoc_data.topics", "params": ct.PARAMS["corpus_mc"]}
    assert g["rows_sha256"] == mc.provenance["rows_sha256"] and len(g["rows_sha256"]) == 64


# ------------------------------------------------------------------------------------- schema and JSONL
def test_rows_follow_the_schema(cloze, mc):
    for row in cloze.rows:
        assert set(row) == CLOZE_KEYS and isinstance(row["text"], str)
        assert isinstance(row["doc"], int) and isinstance(row["paragraph"], int)
    k = ct.PARAMS["corpus_mc"]["k"]
    for row in mc.rows:
        assert set(row) == MC_KEYS and isinstance(row["context"], str) and isinstance(row["gold"], int)
        assert len(row["options"]) == len(row["option_docs"]) == len(row["option_starts"]) == k + 1
        assert all(isinstance(o, str) for o in row["options"]) and 0 <= row["gold"] <= k


@pytest.mark.parametrize("name", [CLOZE, MC])
def test_rows_round_trip_through_jsonl(tmp_path, name):
    made = ct.generate(name)
    path = ct.write_rows(tmp_path / "rows.jsonl", made.rows)
    assert sha256_file(path) == made.provenance["rows_sha256"]  # the hash is the file's
    assert [json.loads(line) for line in path.read_text().splitlines()] == made.rows
    from_file, generated = load_task_data(name, str(path)), load_task_data(name)
    assert [i.prompt for i in from_file.items] == [i.prompt for i in generated.items]


def test_a_malformed_rows_file_names_the_schema(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "a", "options": ["b", "c"]}) + "\n")
    with pytest.raises(EsaError, match=r"bad\.jsonl:1: corpus_mc:python-docs row lacks field\(s\) gold"):
        load_task_data(MC, str(path))


# ----------------------------------------------------------------------------------------- item content
def test_the_cloze_target_is_the_passage_last_word(cloze, python_docs):
    p = ct.PARAMS["corpus_cloze"]
    for row, item in zip(cloze.rows, load_task_data(CLOZE).items):
        words = row["text"].split(" ")
        target = words[-1]
        assert item.prompt.contexts == (" ".join(words[:-1]),) and item.prompt.continuations == (" " + target,)
        assert target.isalpha() and len(target) >= p["min_target"]
        assert p["min_context"] <= len(words) - 1 <= p["max_context"]
        paragraph = ct._paragraphs(python_docs.documents[row["doc"]])[row["paragraph"]]
        assert paragraph[-1].rstrip(".!?:;") == target  # the paragraph's own last word, punctuation stripped
        assert paragraph[-len(words):-1] == words[:-1]  # and the words right before it
    assert len({r["text"] for r in cloze.rows}) == len(cloze.rows)


def test_mc_options_are_real_spans_and_distractors_come_from_other_documents(mc, python_docs):
    p = ct.PARAMS["corpus_mc"]
    words = [ct._lines_words(d) for d in python_docs.documents]
    for row in mc.rows:
        doc, gold, options = row["doc"], row["gold"], row["options"]
        assert row["context"] == " ".join(words[doc][row["start"]:row["start"] + p["context"]])
        assert row["option_docs"][gold] == doc and row["option_starts"][gold] == row["start"] + p["context"]
        distractor_docs = [d for i, d in enumerate(row["option_docs"]) if i != gold]
        assert doc not in distractor_docs and len(set(distractor_docs)) == p["k"]
        assert len(set(options)) == len(options)  # no distractor equals the true span (or another)
        for o, d, s in zip(options, row["option_docs"], row["option_starts"]):
            assert o == " ".join(words[d][s:s + p["span"]]) and len(o.split(" ")) == p["span"]


def test_the_gold_position_is_roughly_uniform(mc):
    k1 = ct.PARAMS["corpus_mc"]["k"] + 1
    counts, n = Counter(r["gold"] for r in mc.rows), len(mc.rows)
    sd = math.sqrt(n * (1 / k1) * (1 - 1 / k1))
    assert set(counts) == set(range(k1)) and all(abs(counts[g] - n / k1) < 4 * sd for g in range(k1))


def test_a_local_file_corpus_and_its_limits(tmp_path):
    docs = [" ".join(f"w{d}x{i}" for i in range(40)) for d in range(5)]
    path = _words_file(tmp_path / "notes.txt", docs)
    made = ct.generate(f"corpus_mc:{path}:context=8:span=4:k=2")
    assert len(made.rows) == 5 * (40 // 12) and made.provenance["corpus_source"].startswith("file:")
    with pytest.raises(EsaError, match=r"needs k=5 other documents .* only 4 besides"):
        ct.generate(f"corpus_mc:{path}:context=8:span=4:k=5")
    same = _words_file(tmp_path / "same.txt", ["a " * 30] * 4)  # every span equals every other: no item survives
    with pytest.raises(EsaError, match=r"yields no items"):
        ct.generate(f"corpus_mc:{same}:context=8:span=4:k=2")


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("name, metrics", [(CLOZE, {"acc", "perplexity"}), (MC, {"acc", "acc_norm"})])
def test_evaluate_task_on_a_tiny_model(tokenizer, name, metrics):
    data = load_task_data(name, limit=6, seed=2)
    result = evaluate_task(tiny_model("llama", seed=1), tokenizer, data, token_budget=2048, bootstrap_iters=100)
    assert result.task == name and metrics <= set(result.metrics) and len(result.items) == 6
    assert result.config["generator"] == data.generator and result.config["source"].startswith("corpus-derived:")
    assert [s.item_id for s in result.items] == [i.item_id for i in data.items]
    if name == MC:
        assert result.metrics["acc"] == sum(s.correct for s in result.items) / 6


def test_smollm2_beats_chance_on_corpus_mc(smol):
    data = load_task_data(MC, limit=24, seed=0)  # SmolLM2 scores ≈ 0.8 here (0.78 on 50 items), chance 0.25
    result = evaluate_task(smol.model, smol.tokenizer, data, token_budget=4096)
    chance = 1 / (ct.PARAMS["corpus_mc"]["k"] + 1)
    assert result.metrics["acc"] > chance + 2 * result.metrics["acc_stderr"], result.metrics


def test_rebase_rewrites_only_the_corpus_segment():
    from esa.evals.tasks.corpus import rebase

    up = str.upper
    assert rebase("corpus_mc:./n.txt:k=4:seed=2", up) == "corpus_mc:./N.TXT:k=4:seed=2"
    assert rebase("corpus_cloze:notes=/d/a:b.txt", up) == "corpus_cloze:NOTES=/D/A:B.TXT"  # NAME=PATH corpus
    assert rebase("piqa", up) == "piqa"
