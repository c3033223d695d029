"""What a zero-shot task is: a dataset location plus a pure function from one row to its requests.

A task never touches a model. ``TaskSpec.prompt(row)`` turns one dataset row (in the dataset's own schema)
into a :class:`Prompt`: for every answer option a ``(context, continuation)`` string pair whose continuation
log-likelihood is scored, plus the gold option. The strings match lm-evaluation-harness 0.4.x exactly,
including its ``target_delimiter`` (a single space placed before every continuation).

Two request shapes exist, as in lm-eval:

* **shared context** (piqa, arc, hellaswag, boolq, sciq): one context, one continuation per option;
  ``"Question: Which is hot?\\nAnswer:"`` + ``" The sun"`` / ``" The moon"``.
* **partial scoring** (winogrande): the options fill a blank, so the *context* differs per option and the
  continuation is the shared suffix after the blank: ``"The trophy didn't fit because the trophy"`` /
  ``"... because the suitcase"`` + ``" was too big."``; the option whose context makes the suffix likelier
  wins.

``norm_lengths`` are the character counts that ``acc_norm`` divides by. lm-eval uses ``len(choice)`` of
``doc_to_choice``, i.e. the option text *without* the leading delimiter (for winogrande the choices are the
contexts, which is why it reports no ``acc_norm``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, put between context and every option


@dataclass(frozen=True)
class Prompt:
    """The scored requests of one item; all tuples have one entry per option (length 1 for lambada)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]  # delimiter included, e.g. " The sun"
    gold: int  # index of the correct option
    norm_lengths: tuple[int, ...]  # characters that acc_norm divides each log-likelihood by


@dataclass(frozen=True)
class TaskSpec:
    """A declarative task; ``prompt`` raises KeyError/ValueError/IndexError/TypeError on bad rows."""

    name: str
    hub_path: str  # datasets.load_dataset path
    hub_config: str | None  # datasets config name
    split: str  # the split lm-eval evaluates (test if it has labels, else validation)
    fields: tuple[str, ...]  # top-level row fields the prompt reads (shown when data is missing or malformed)
    prompt: Callable[[dict], Prompt]
    kind: str = "multiple_choice"  # multiple_choice | greedy (lambada: one continuation, greedy match)
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # higher is better for every acc-type metric


def multiple_choice(
    text: Callable[[dict], str], choices: Callable[[dict], list[str]], gold: Callable[[dict], int]
) -> Callable[[dict], Prompt]:
    """lm-eval's ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` → a shared-context prompt."""

    def prompt(row: dict) -> Prompt:
        ctx, opts, answer = text(row), [str(c) for c in choices(row)], int(gold(row))
        if not 0 <= answer < len(opts):
            raise ValueError(f"gold index {answer} is outside the {len(opts)} options")
        return Prompt(
            (ctx,) * len(opts), tuple(TARGET_DELIMITER + o for o in opts), answer, tuple(len(o) for o in opts)
        )

    return prompt


def partial(
    contexts: Callable[[dict], list[str]], suffix: Callable[[dict], str], gold: Callable[[dict], int]
) -> Callable[[dict], Prompt]:
    """Partial scoring: one context per option, the same continuation (``TARGET_DELIMITER + suffix``)."""

    def prompt(row: dict) -> Prompt:
        ctxs, cont, answer = [str(c) for c in contexts(row)], suffix(row), int(gold(row))
        if not 0 <= answer < len(ctxs):
            raise ValueError(f"gold index {answer} is outside the {len(ctxs)} options")
        return Prompt(
            tuple(ctxs), (TARGET_DELIMITER + cont,) * len(ctxs), answer, tuple(len(c) for c in ctxs)
        )

    return prompt


def greedy(text: Callable[[dict], str], target: Callable[[dict], str]) -> Callable[[dict], Prompt]:
    """A single request whose continuation is scored for log-likelihood and exact greedy match."""

    def prompt(row: dict) -> Prompt:
        ctx, cont = text(row), target(row)
        return Prompt((ctx,), (cont,), 0, (len(cont),))

    return prompt
