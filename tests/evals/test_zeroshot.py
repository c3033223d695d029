"""Zero-shot tasks: prompts as lm-eval builds them, exact scoring, metrics and the errors users see."""

import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from esa.core.errors import EsaError
from esa.evals.tasks import TASKS, Prompt, TaskData, TaskItem, load_task_data, subsample, task_names
from esa.evals.zeroshot import (
    Request,
    bootstrap_stderr,
    build_requests,
    encode_pair,
    item_scores,
    mean_stderr,
    parse_task_data,
    plan_batches,
    score_requests,
    task_metrics,
    write_results,
)
from esa.models.tiny import tiny_model

FIX = Path(__file__).parent / "fixtures"


def _data(name, **kw):
    return load_task_data(name, str(FIX / f"{name}.jsonl"), **kw)


def _row(name, i=0):
    return json.loads((FIX / f"{name}.jsonl").read_text().splitlines()[i])


# ---------------------------------------------------------------- prompts (strings from lm-eval's task YAMLs)


@pytest.mark.parametrize("name", task_names())
def test_every_fixture_loads_with_enough_items(name):
    data = _data(name)
    assert len(data.items) >= 20 and data.n_total == len(data.items) and data.seed_invariant
    assert [i.item_id for i in data.items] == list(range(len(data.items)))
    for item in data.items:
        p = item.prompt
        assert len(p.contexts) == len(p.continuations) == len(p.norm_lengths) and 0 <= p.gold < len(
            p.contexts
        )


def test_piqa_prompt():
    row, p = _row("piqa"), _data("piqa").items[0].prompt
    assert p.contexts == (f"Question: {row['goal']}\nAnswer:",) * 2
    assert p.continuations == (" " + row["sol1"], " " + row["sol2"]) and p.gold == row["label"]
    assert p.norm_lengths == (len(row["sol1"]), len(row["sol2"]))  # the delimiter is not counted


def test_boolq_prompt_adds_question_mark_and_yes_no():
    row, p = _row("boolq"), _data("boolq").items[0].prompt
    assert p.contexts[0] == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    assert p.continuations == (" no", " yes") and p.gold == row["label"]


def test_arc_gold_is_the_index_of_answer_key_even_for_numeric_labels():
    data = _data("arc_easy")
    numeric = [
        (i, _row("arc_easy", i)) for i in range(len(data.items)) if _row("arc_easy", i)["answerKey"].isdigit()
    ]
    assert numeric, "the fixture should hold an item with labels 1-4"
    for i, row in numeric:
        assert data.items[i].prompt.gold == row["choices"]["label"].index(row["answerKey"])
    three = [it for it in data.items if len(it.prompt.continuations) == 3]
    assert three and three[0].prompt.contexts[0].startswith("Question: ")


def test_hellaswag_preprocessing():
    row = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to repot a plant [title] Pick a pot.",
        "ctx_b": "[title] Water The plant.",
        "endings": ["[step] Moist soil  slides out.", "b"],
        "label": "0",
    }
    p = TASKS.get("hellaswag").prompt(row)
    # " [title]" → ". ", other [tags] removed, double spaces collapsed once;
    # ctx_b.capitalize() lowercases the rest of ctx_b
    assert p.contexts[0] == "Home and Garden: How to repot a plant. Pick a pot.. water the plant."
    assert p.continuations == ("  Moist soil slides out.", " b")
    assert p.norm_lengths == (len(" Moist soil slides out."), 1)


def test_winogrande_partial_scoring_prompt():
    row, p = _row("winogrande"), _data("winogrande").items[0].prompt
    blank = row["sentence"].index("_")
    assert p.contexts == (row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"])
    assert p.continuations == (" " + row["sentence"][blank + 1 :].strip(),) * 2
    assert p.gold == int(row["answer"]) - 1


def test_lambada_splits_off_the_last_word():
    p = TASKS.get("lambada_openai").prompt({"text": "the cat sat on the mat"})
    assert p.contexts == ("the cat sat on the",) and p.continuations == (" mat",)


def test_sciq_strips_leading_support_whitespace_and_puts_the_answer_last():
    data = _data("sciq")
    for item, i in zip(data.items, range(len(data.items))):
        row = _row("sciq", i)
        assert item.prompt.contexts[0] == f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
        assert item.prompt.continuations[3] == " " + row["correct_answer"] and item.prompt.gold == 3


# ---------------------------------------------------------------- tokenisation (lm-eval HFLM _encode_pair)


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: hot?\nAnswer: ", "sun")
    assert ctx == tokenizer.encode("Question: hot?\nAnswer:")
    assert ctx + cont == tokenizer.encode("Question: hot?\nAnswer: sun")
    assert tokenizer.decode(cont) == " sun"


def test_encode_pair_empty_context_uses_bos(tokenizer):
    ctx, cont = encode_pair(tokenizer, "", " mat")
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer.encode(" mat")


# ---------------------------------------------------------------- scoring


def _reference_ll(model, req, max_length):
    """Independent reference: one unpadded forward, full logits, fp32 log-softmax."""
    ids = torch.tensor([list(req.model_input(max_length))])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    c = len(req.continuation)
    rows = logp[-c:]
    tgt = torch.tensor(req.continuation)
    return float(rows.gather(-1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=1)


@pytest.mark.parametrize("budget,max_length", [(64, 512), (4096, 512), (48, 12)])
def test_batched_scores_match_unbatched_reference(tiny, tokenizer, budget, max_length):
    data = _data("arc_easy", limit=6, seed=2)
    reqs = build_requests(tokenizer, data, max_length)
    ll, greedy = score_requests(tiny, reqs, max_length, budget)
    ref = [_reference_ll(tiny, r, max_length) for r in reqs]
    np.testing.assert_allclose(ll, [r[0] for r in ref], rtol=1e-5, atol=1e-5)
    assert greedy.tolist() == [r[1] for r in ref]
    if max_length == 12:  # left truncation really happened
        assert any(len(r.context) + len(r.continuation) > 13 for r in reqs)


def test_out_of_memory_halves_the_budget_and_other_errors_propagate(tiny, tokenizer, monkeypatch):
    import esa.evals.zeroshot as zs

    reqs = build_requests(tokenizer, _data("arc_easy", limit=4, seed=2), 512)
    expected, _ = score_requests(tiny, reqs, 512, 4096)
    real = zs.score_batch

    def cpu_oom_above_one(model, batch, max_length):
        if len(batch) > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real(model, batch, max_length)

    monkeypatch.setattr(zs, "score_batch", cpu_oom_above_one)
    np.testing.assert_allclose(score_requests(tiny, reqs, 512, 4096)[0], expected, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(zs, "score_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        score_requests(tiny, reqs, 512, 4096)


def test_plan_batches_covers_each_request_once_within_budget(tokenizer):
    reqs = build_requests(tokenizer, _data("hellaswag"), 512)
    for budget in (1, 200, 1000):
        batches = plan_batches(reqs, 512, budget)
        assert sorted(r for b in batches for r in b) == list(range(len(reqs)))
        for b in batches:
            assert len(b) == 1 or len(b) * max(len(reqs[r].model_input(512)) for r in b) <= budget
    # with room for a whole item, an item's options share one batch
    for b in plan_batches(reqs, 512, 4096):
        items = {reqs[r].item for r in b}
        assert all(sum(reqs[r].item == i for r in b) == 4 for i in items)


def test_is_greedy_true_only_when_every_token_is_the_argmax(tiny, tokenizer):
    ctx = tuple(tokenizer.encode("The quick brown fox"))
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(tiny(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_cont = tuple(ids[len(ctx) :])
    wrong_last = greedy_cont[:2] + ((greedy_cont[2] + 1) % 49152,)
    reqs = [Request(0, 0, ctx, greedy_cont), Request(0, 1, ctx, wrong_last)]
    ll, greedy = score_requests(tiny, reqs, 512)
    assert greedy.tolist() == [True, False] and ll[0] > ll[1]


def test_partial_scoring_compares_the_shared_suffix_under_each_context(tiny, tokenizer):
    data = _data("winogrande", limit=4, seed=0)
    reqs = build_requests(tokenizer, data, 512)
    for i in range(len(data.items)):
        a, b = [r for r in reqs if r.item == i]
        assert a.context != b.context and tokenizer.decode(a.continuation) == tokenizer.decode(b.continuation)
    ll, greedy = score_requests(tiny, reqs, 512)
    scores = item_scores(data, reqs, ll, greedy)
    for s in scores:
        assert s.correct == (int(np.argmax(s.loglikelihoods)) == s.gold)


# ---------------------------------------------------------------- metrics


def _fake(kind, prompts):
    spec = TASKS.get("piqa" if kind == "multiple_choice" else "lambada_openai")
    items = tuple(TaskItem(i, f"x:{i}", p) for i, p in enumerate(prompts))
    return TaskData(spec, "test", items, len(items), None, 0, True)


def _reqs(prompts):
    return [Request(i, c, (1,), (2,)) for i, p in enumerate(prompts) for c in range(len(p.contexts))]


def test_acc_and_acc_norm_differ_when_option_lengths_differ():
    short_long = Prompt(("q",) * 2, (" ab", " a much longer answer"), 1, (2, 20))
    data = _fake("multiple_choice", [short_long])
    ll = np.array([-4.0, -10.0])  # raw: option 0 wins; per character: -2.0 vs -0.5 → option 1 wins
    (s,) = item_scores(data, _reqs([short_long]), ll, np.array([False, False]))
    assert (s.correct, s.correct_norm) == (False, True)
    m = task_metrics(data, [s])
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0 and m["acc_stderr"] is None  # n = 1 has no stderr


def test_ties_go_to_the_first_option_as_np_argmax():
    p = Prompt(("q",) * 2, (" a", " b"), 1, (1, 1))
    (s,) = item_scores(_fake("multiple_choice", [p]), _reqs([p]), np.array([-1.0, -1.0]), np.zeros(2, bool))
    assert not s.correct and not s.correct_norm


def test_lambada_acc_is_greedy_match_and_perplexity_is_exp_mean_nll():
    prompts = [Prompt(("ctx",), (" w",), 0, (2,)) for _ in range(4)]
    data = _fake("greedy", prompts)
    ll = np.array([-1.0, -2.0, -3.0, -6.0])
    scores = item_scores(data, _reqs(prompts), ll, np.array([True, False, True, False]))
    assert [s.correct for s in scores] == [True, False, True, False] and scores[0].correct_norm is None
    m = task_metrics(data, scores)
    assert m["acc"] == 0.5 and math.isclose(m["perplexity"], math.exp(3.0))
    assert m["perplexity_stderr"] > 0
    assert m["higher_is_better"] == {"acc": True, "perplexity": False}


def test_perplexity_stderr_reproduces_lmeval_bootstrap_draws():
    """Reference: lm-eval's own algorithm in plain Python (random.Random(chunk).choices, 1000 per chunk)."""
    ll = -np.random.default_rng(0).gamma(2.0, 1.5, size=17)
    ref = []
    for i in range(3):
        rnd = random.Random(i)
        for _ in range(1000):
            ref.append(math.exp(-statistics.mean(rnd.choices(list(ll), k=len(ll)))))
    assert math.isclose(bootstrap_stderr(ll, 3000), statistics.stdev(ref), rel_tol=1e-9)
    assert bootstrap_stderr(ll[:1], 3000) is None


@pytest.mark.parametrize("p,n", [(0.3, 10), (0.5, 22), (0.9, 7)])
def test_binary_stderr_is_lmeval_formula(p, n):
    k = round(p * n)
    values = np.array([1.0] * k + [0.0] * (n - k))
    q = k / n
    assert math.isclose(mean_stderr(values), math.sqrt(q * (1 - q) / (n - 1)))


# ---------------------------------------------------------------- subsampling


def _ids(data):
    return [i.item_id for i in data.items]


def test_seed_picks_which_items_and_ids_stay_paired():
    a, b, a2 = _data("piqa", limit=5, seed=0), _data("piqa", limit=5, seed=1), _data("piqa", limit=5, seed=0)
    assert _ids(a) == _ids(a2) and _ids(a) != _ids(b) and _ids(a) == sorted(_ids(a))
    assert not a.seed_invariant and a.n_total == 22
    full = _data("piqa", limit=100, seed=3)
    assert full.seed_invariant and len(full.items) == 22
    assert a.items[0].prompt == full.items[_ids(a)[0]].prompt
    assert len(subsample(10, 3, 0)) == 3


# ---------------------------------------------------------------- bad input


def test_unknown_task_suggests_and_lists_names():
    with pytest.raises(EsaError, match=r"Did you mean 'piqa'.*Valid tasks: .*winogrande"):
        load_task_data("piqaa", str(FIX / "piqa.jsonl"))


@pytest.mark.parametrize(
    "lines,pattern",
    [
        (
            ['{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}', "", '{"goal": "g", "sol1": '],
            r"\.jsonl:3: not valid JSON",
        ),
        (['{"goal": "g", "sol1": "a", "label": 0}'], r"\.jsonl:1: piqa row lacks field\(s\) sol2"),
        (['{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}'], r"\.jsonl:1: malformed piqa row.*outside"),
        (['["g", "a", "b", 0]'], r"\.jsonl:1: a piqa row must be a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, pattern):
    path = tmp_path / "piqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EsaError, match=pattern):
        load_task_data("piqa", str(path))


def test_malformed_winogrande_and_arc_rows(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}\n')
    with pytest.raises(EsaError, match=r"w\.jsonl:1: malformed winogrande row"):
        load_task_data("winogrande", str(path))
    path.write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}\n')
    with pytest.raises(EsaError, match=r"w\.jsonl:1: malformed arc_easy row"):
        load_task_data("arc_easy", str(path))


def test_missing_files_and_bad_arguments(tmp_path):
    with pytest.raises(EsaError, match="does not exist"):
        load_task_data("piqa", str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EsaError, match="has no rows"):
        load_task_data("piqa", str(tmp_path / "empty.jsonl"))
    with pytest.raises(EsaError, match="--limit"):
        _data("piqa", limit=0)
    with pytest.raises(EsaError, match="TASK=PATH"):
        parse_task_data(["piqa"])
    with pytest.raises(EsaError, match="Did you mean 'boolq'"):
        parse_task_data(["boolk=x.jsonl"])
    with pytest.raises(EsaError, match="give the path after piqa="):
        parse_task_data(["piqa="])


def test_task_data_splits_at_the_rightmost_equals_after_a_known_task():
    got = parse_task_data(["piqa=/d/a=b.jsonl", "corpus_mc:python-docs:k=4=/d/mc.jsonl"])
    assert got == {"piqa": "/d/a=b.jsonl", "corpus_mc:python-docs:k=4": "/d/mc.jsonl"}


def test_offline_hub_failure_says_which_file_to_provide():
    with pytest.raises(EsaError, match=r"--task-data piqa=/path/to/piqa\.jsonl .*goal, sol1, sol2, label"):
        load_task_data("piqa")


# ---------------------------------------------------------------- storage and CLI


def test_write_results_stores_items_for_pairing(tmp_path, tiny, tokenizer):
    from esa.evals.zeroshot import evaluate_task

    result = evaluate_task(tiny, tokenizer, _data("boolq", limit=3, seed=4))
    summary = write_results(tmp_path, [result], {"model": "tiny"})
    rows = [json.loads(line) for line in (tmp_path / "boolq.items.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in rows] == [s.item_id for s in result.items]
    assert set(rows[0]) == {"item_id", "loglikelihoods", "is_greedy", "gold", "correct", "correct_norm"}
    stored = json.loads((tmp_path / "zeroshot.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    assert (
        stored["tasks"]["boolq"]["config"]["seed"] == 4
        and "acc_stderr" in stored["tasks"]["boolq"]["metrics"]
    )


@pytest.mark.model  # the CLI loads the embedded SmolLM2
def test_cli_runs_and_writes(tmp_path, capsys):
    from esa.cli import main

    rc = main(
        [
            "--no-progress",
            "zeroshot",
            "--tasks",
            "piqa",
            "winogrande",
            "--task-data",
            f"piqa={FIX / 'piqa.jsonl'}",
            f"winogrande={FIX / 'winogrande.jsonl'}",
            "--limit",
            "2",
            "--seed",
            "1",
            "--out-dir",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = json.loads((tmp_path / "zeroshot.json").read_text())
    assert set(out["tasks"]) == {"piqa", "winogrande"} and out["tasks"]["piqa"]["config"]["n"] == 2
    assert out["provenance"]["model"]["model_id"] == "smollm2-135m"
    assert "acc_norm" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    from esa.cli import main

    assert main(["zeroshot", "--tasks", "hellaswg"]) == 2
    assert "Did you mean 'hellaswag'" in capsys.readouterr().err
    assert main(["zeroshot", "--tasks", "piqa", "--task-data", "boolq=x.jsonl"]) == 2
    assert "not in --tasks" in capsys.readouterr().err
