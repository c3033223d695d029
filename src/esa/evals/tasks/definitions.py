"""The task suite, one declarative entry per task, transcribed from lm-evaluation-harness 0.4.x task YAMLs.

Each entry names the hub dataset, the split lm-eval scores and the prompt; the comment above it quotes the
lm-eval source it reproduces. Rows are in the dataset's own schema, so a local JSONL copy of the split works
unchanged (``--task-data piqa=piqa.jsonl``).
"""

from __future__ import annotations

import re

from esa.core.errors import EsaError
from esa.evals.tasks.corpus import is_corpus_task, parse, task_spec
from esa.evals.tasks.spec import TaskSpec, greedy, multiple_choice, partial
from esa.core.registry import Registry, suggest


class TaskRegistry(Registry[TaskSpec]):
    """The registered tasks, plus corpus-derived names (``corpus_cloze:CORPUS``, ``corpus_mc:CORPUS``; see
    :mod:`esa.evals.tasks.corpus`) resolved on demand. ``names()`` lists only the registered tasks.

    ``name in TASKS`` is True for a well-formed corpus-derived name and raises its one-line EsaError for a
    malformed one (bad parameter, unknown corpus), so a study check reports the real problem.
    """

    def get(self, name: str) -> TaskSpec:
        if is_corpus_task(name):
            return task_spec(name, self._items["lambada_openai"])
        if name not in self._items:
            raise EsaError(suggest(name, list(self._items), self.what)
                           + " Or a corpus-derived task: corpus_cloze:CORPUS or corpus_mc:CORPUS, e.g. "
                           "corpus_mc:python-docs.")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and is_corpus_task(name):
            parse(name)  # raises the one-line EsaError of a malformed name
            return True
        return super().__contains__(name)


TASKS = TaskRegistry("task")


def _add(spec: TaskSpec) -> None:
    TASKS.register(spec.name, spec)


def _hellaswag_clean(text: str) -> str:
    """lm-eval hellaswag/utils.py ``preprocess``: " [title]" becomes ". ", other [tags] vanish."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_query(row: dict) -> str:
    # utils.process_docs: activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    # (str.capitalize also lowercases the rest of ctx_b, as in lm-eval)
    return _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())


# One compact keyword-argument entry per task reads as a table, so the formatter leaves them alone.
# fmt: off
# hellaswag.yaml: doc_to_text "{{query}}", doc_to_choice "choices" (the cleaned endings),
# doc_to_target "{{label}}"
_add(TaskSpec(
    name="hellaswag", hub_path="Rowan/hellaswag", hub_config=None, split="validation",
    fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    prompt=multiple_choice(text=_hellaswag_query,
                           choices=lambda r: [_hellaswag_clean(e) for e in r["endings"]],
                           gold=lambda r: int(r["label"]))))

# piqa.yaml: doc_to_text "Question: {{goal}}\nAnswer:", doc_to_choice [sol1, sol2], doc_to_target label
_add(TaskSpec(
    name="piqa", hub_path="baber/piqa", hub_config=None, split="validation",
    fields=("goal", "sol1", "sol2", "label"),
    prompt=multiple_choice(text=lambda r: f"Question: {r['goal']}\nAnswer:",
                           choices=lambda r: [r["sol1"], r["sol2"]],
                           gold=lambda r: r["label"])))

# super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"]; acc only
_add(TaskSpec(
    name="boolq", hub_path="aps/super_glue", hub_config="boolq", split="validation",
    fields=("passage", "question", "label"),
    prompt=multiple_choice(text=lambda r: f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                           choices=lambda r: ["no", "yes"],
                           gold=lambda r: r["label"]),
    metrics=("acc",)))


def _arc(name: str, config: str) -> TaskSpec:
    # arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, target choices.label.index(answerKey)
    return TaskSpec(
        name=name, hub_path="allenai/ai2_arc", hub_config=config, split="test",
        fields=("question", "choices", "answerKey"),
        prompt=multiple_choice(text=lambda r: f"Question: {r['question']}\nAnswer:",
                               choices=lambda r: r["choices"]["text"],
                               gold=lambda r: r["choices"]["label"].index(r["answerKey"])))


_add(_arc("arc_easy", "ARC-Easy"))
_add(_arc("arc_challenge", "ARC-Challenge"))


def _before_blank(row: dict) -> str:
    return row["sentence"][:row["sentence"].index("_")]  # ValueError when the sentence has no blank


# winogrande/preprocess_winogrande.py: contexts sentence[:blank] + option,
# continuation sentence[blank+1:].strip(), gold {"1": 0, "2": 1}[answer]; acc only
_add(TaskSpec(
    name="winogrande", hub_path="allenai/winogrande", hub_config="winogrande_xl", split="validation",
    fields=("sentence", "option1", "option2", "answer"),
    prompt=partial(contexts=lambda r: [_before_blank(r) + r["option1"], _before_blank(r) + r["option2"]],
                   suffix=lambda r: r["sentence"][len(_before_blank(r)) + 1:].strip(),
                   gold=lambda r: {"1": 0, "2": 1}[str(r["answer"])]),
    metrics=("acc",)))

# lambada_openai.yaml: context = all but the last space-separated word, target = " " + last word;
# metrics acc (greedy match of the whole target) and perplexity exp(-mean log-likelihood)
_add(TaskSpec(
    name="lambada_openai", hub_path="EleutherAI/lambada_openai", hub_config="default", split="test",
    fields=("text",),
    prompt=greedy(text=lambda r: " ".join(r["text"].split(" ")[:-1]),
                  target=lambda r: " " + r["text"].split(" ")[-1]),
    kind="greedy", metrics=("acc", "perplexity")))

# sciq.yaml: "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", choices [d1, d2, d3, correct], target 3
_add(TaskSpec(
    name="sciq", hub_path="allenai/sciq", hub_config=None, split="test",
    fields=("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
    prompt=multiple_choice(
        text=lambda r: f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
        choices=lambda r: [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]],
        gold=lambda r: 3)))
# fmt: on
