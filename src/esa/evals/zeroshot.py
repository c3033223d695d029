"""Zero-shot multiple-choice scoring that reproduces lm-evaluation-harness 0.4.x (HFLM) numbers.

Pipeline: task rows → :class:`Request` token pairs → micro-batched forwards → per-option log-likelihoods and
greedy flags → per-item :class:`ItemScore` → task metrics with lm-eval's standard errors.

Tokenisation follows HFLM ``_encode_pair``: trailing whitespace of the context moves to the front of the
continuation, the pair is encoded *jointly* and split at the length of the context's own encoding (so a
merge across the boundary lands in the continuation). Worked example with a BPE tokenizer::

    context "Question: hot?\\nAnswer: "   continuation "sun"
    → context "Question: hot?\\nAnswer:"  continuation " sun"    (the space moved)
    → ids(context + continuation) = [... ":", " sun"];  cont = those after len(ids(context))

The model reads ``(ctx + cont)[-(L+1):][:-1]`` (the context is left-truncated so the whole input fits the
model's L positions; the last continuation token is only a target). Position ``p`` predicts token ``p+1``,
so the continuation's ``c`` tokens are predicted by the last ``c`` input positions. Log-softmax is fp32 and
evaluated only at those positions. ``is_greedy`` is True when every continuation token is the argmax.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from esa.core import parallel, progress
from esa.core.errors import EsaError
from esa.evals.logprobs import hidden_and_head, score_states
from esa.evals.resources import is_oom
from esa.evals.tasks import TaskData
from esa.models import max_positions

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval HFLM's fallback when the config names no context length
DEFAULT_TOKEN_BUDGET = 8192  # padded tokens per forward micro-batch
BOOTSTRAP_ITERS = 100_000  # lm-eval simple_evaluate's default bootstrap_iters (perplexity stderr)


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair as token ids; ``item`` indexes ``TaskData.items``."""

    item: int
    choice: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def model_input(self, max_length: int) -> tuple[int, ...]:
        """``(ctx + cont)[-(L+1):][:-1]``: left-truncated to L tokens, last continuation token dropped."""
        return (self.context + self.continuation)[-(max_length + 1) :][:-1]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval HFLM builds them (see the module docstring).

    An empty context is replaced by the BOS (else EOS) token, as lm-eval's ``prefix_token_id``; when the
    continuation already starts with that token, its first token becomes the context instead.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def build_requests(tokenizer, data: TaskData, max_length: int) -> list[Request]:
    """All requests of a task, item by item and option by option (options of one item stay adjacent)."""
    requests = []
    for i, item in enumerate(data.items):
        for c, (ctx, cont) in enumerate(zip(item.prompt.contexts, item.prompt.continuations)):
            ctx_ids, cont_ids = encode_pair(tokenizer, ctx, cont)
            if not cont_ids or len(cont_ids) > max_length:
                raise EsaError(
                    f"{item.where}: option {c} encodes to {len(cont_ids)} continuation tokens; "
                    f"it must be between 1 and the model's {max_length} positions"
                )
            requests.append(Request(i, c, tuple(ctx_ids), tuple(cont_ids)))
    return requests


def plan_batches(requests: list[Request], max_length: int, token_budget: int) -> list[list[int]]:
    """Request indices per micro-batch: items longest-first, rows × longest row ≤ ``token_budget``.

    The options of one item stay in one batch (they share a context) unless they alone exceed the budget;
    then the item is split. A single request always gets a batch, whatever its length.
    """
    by_item: dict[int, list[int]] = {}
    for r, req in enumerate(requests):
        by_item.setdefault(req.item, []).append(r)
    length = [len(req.model_input(max_length)) for req in requests]
    groups = sorted(by_item.values(), key=lambda g: -max(length[r] for r in g))
    batches: list[list[int]] = []
    current: list[int] = []

    def fits(rows: list[int]) -> bool:
        return len(rows) * max(length[r] for r in rows) <= token_budget

    for group in groups:
        if current and not fits(current + group):
            batches.append(current)
            current = []
        for r in group:  # only an item too big for the budget on its own is split
            if current and not fits(current + [r]):
                batches.append(current)
                current = []
            current.append(r)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def score_batch(model, batch: list[Request], max_length: int) -> tuple[list[float], list[bool]]:
    """Summed continuation log-likelihood (fp32 log-softmax, float64 sum) and greedy flag per request."""
    device = model.get_input_embeddings().weight.device
    inputs = [req.model_input(max_length) for req in batch]
    T = max(len(x) for x in inputs)
    ids = torch.zeros((len(batch), T), dtype=torch.long)  # right-padded, as lm-eval (pad value 0)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    targets = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T) token each scored position predicts
    scored = torch.zeros((len(batch), T), dtype=torch.bool)
    for b, (x, req) in enumerate(zip(inputs, batch)):
        ids[b, : len(x)], attn[b, : len(x)] = torch.tensor(x), 1
        c = len(req.continuation)  # the last c input positions predict the c continuation tokens
        targets[b, len(x) - c:len(x)], scored[b, len(x) - c:len(x)] = torch.tensor(req.continuation), True
    states, head_fn = hidden_and_head(model, {"input_ids": ids.to(device), "attention_mask": attn.to(device)})
    nll, n, correct = score_states(states, head_fn, targets.to(device), scored.to(device))  # (B,) each
    return (-nll).tolist(), (correct == n).tolist()


def score_requests(
    model,
    requests: list[Request],
    max_length: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    description: str = "zero-shot",
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood (R,) float64 and is_greedy (R,) bool for every request; halves the budget on OOM.
    In a data-parallel run (:mod:`esa.core.parallel`) the planned batches are split between the replicas."""
    ll, greedy = np.zeros(len(requests)), np.zeros(len(requests), dtype=bool)
    plan = plan_batches(requests, max_length, token_budget)
    with progress.bar(len(requests), description) as advance:
        scored = parallel.units("requests", _score_planned,
                                [(model, requests, batch, max_length, token_budget, advance) for batch in plan])
    for batch, (out_ll, out_greedy) in zip(plan, scored):
        ll[batch], greedy[batch] = out_ll, out_greedy
    return ll, greedy


def _score_planned(model, requests: list[Request], batch: list[int], max_length: int, token_budget: int,
                   advance) -> tuple[list[float], list[bool]]:
    """One planned batch's log-likelihoods and greedy flags, in ``batch`` order; on out-of-memory it is
    re-planned at half the token budget (down to one request, which then raises)."""
    try:
        out = score_batch(model, [requests[r] for r in batch], max_length)
    except RuntimeError as exc:  # every allocator failure is one (esa.evals.resources.is_oom)
        if not is_oom(exc) or len(batch) == 1:
            raise
        token_budget = max(1, token_budget // 2)
        log.warning("out of memory; retrying with a token budget of %d", token_budget)
        got = {}  # request index → (log-likelihood, greedy)
        for part in plan_batches([requests[r] for r in batch], max_length, token_budget):
            rows = [batch[i] for i in part]
            got |= dict(zip(rows, zip(*_score_planned(model, requests, rows, max_length, token_budget, advance))))
        return [got[r][0] for r in batch], [got[r][1] for r in batch]
    advance(len(batch))
    return out


@dataclass(frozen=True)
class ItemScore:
    """One item's outcome; stored per item so a perturbed run pairs with the baseline on ``item_id``."""

    item_id: int
    loglikelihoods: tuple[float, ...]  # one per option, nats, summed over the continuation tokens
    is_greedy: tuple[bool, ...]  # every continuation token was the argmax
    gold: int
    correct: bool  # argmax log-likelihood == gold (lambada: the gold continuation is the greedy one)
    correct_norm: bool | None  # argmax log-likelihood / option characters == gold; None for greedy tasks


def _argmax(values: np.ndarray) -> int:
    """First index of the maximum, as ``np.argmax`` in lm-eval (ties go to the earlier option)."""
    return int(np.argmax(values))


def item_scores(
    data: TaskData, requests: list[Request], ll: np.ndarray, greedy: np.ndarray
) -> list[ItemScore]:
    per_item: list[list[int]] = [[] for _ in data.items]
    for r, req in enumerate(requests):
        per_item[req.item].append(r)
    scores = []
    for item, rs in zip(data.items, per_item):
        lls, flags, gold = ll[rs], greedy[rs], item.prompt.gold
        if data.task.kind == "greedy":
            correct, correct_norm = bool(flags[0]), None
        else:
            correct = _argmax(lls) == gold
            correct_norm = _argmax(lls / np.asarray(item.prompt.norm_lengths, dtype=float)) == gold
        scores.append(
            ItemScore(
                item.item_id,
                tuple(float(x) for x in lls),
                tuple(bool(x) for x in flags),
                gold,
                correct,
                correct_norm,
            )
        )
    return scores


def mean_stderr(values: np.ndarray) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); for 0/1 values sqrt(p(1-p)/(n-1))."""
    n = len(values)
    if n < 2:
        return None
    return float(np.sqrt(((values - values.mean()) ** 2).sum() / (n - 1)) / math.sqrt(n))


def _perplexity(ll: np.ndarray) -> np.ndarray:
    """exp(-mean log-likelihood) along the last axis (lm-eval's ``perplexity`` aggregation)."""
    nll = -ll.mean(axis=-1)
    return np.exp(np.minimum(nll, 700.0))


def bootstrap_stderr(ll: np.ndarray, iters: int = BOOTSTRAP_ITERS) -> float | None:
    """lm-eval's ``bootstrap_stderr`` for perplexity, reproduced draw for draw.

    lm-eval resamples in chunks of ``min(1000, iters)`` draws; chunk ``i`` uses ``random.Random(i).choices``,
    i.e. index ``floor(u · n)`` for consecutive ``random()`` values ``u``. NumPy's legacy ``RandomState([i])``
    is seeded by the same MT19937 ``init_by_array`` and yields the same ``u`` stream, so the resamples (and
    the sample standard deviation of their perplexities) are identical, only vectorised.
    """
    n, chunk = len(ll), min(1000, iters)
    if n < 2 or iters < 1:
        return None
    stats = []
    for i in range(iters // chunk):
        u = np.random.RandomState([i]).random_sample(chunk * n).reshape(chunk, n)
        stats.append(_perplexity(ll[np.floor(u * n).astype(np.int64)]))  # (chunk,)
    return float(np.std(np.concatenate(stats), ddof=1))


def task_metrics(data: TaskData, scores: list[ItemScore], bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict:
    """Metrics (acc-type: higher is better; perplexity: lower is better) with lm-eval's standard errors.

    acc/acc_norm: ``mean_stderr``. ``perplexity`` (lambada) is exp(-mean log-likelihood of the target word);
    its stderr is lm-eval's bootstrap with the same resamples (``bootstrap_iters``, lm-eval's default 100000).
    """
    out: dict = {}
    if "acc" in data.task.metrics:
        acc = np.array([s.correct for s in scores], dtype=float)
        out.update(acc=float(acc.mean()), acc_stderr=mean_stderr(acc))
    if "acc_norm" in data.task.metrics:
        norm = np.array([s.correct_norm for s in scores], dtype=float)
        out.update(acc_norm=float(norm.mean()), acc_norm_stderr=mean_stderr(norm))
    if "perplexity" in data.task.metrics:
        ll = np.array([s.loglikelihoods[0] for s in scores])
        out.update(perplexity=float(_perplexity(ll)), perplexity_stderr=bootstrap_stderr(ll, bootstrap_iters))
    out["n_nonfinite_items"] = sum(not np.all(np.isfinite(s.loglikelihoods)) for s in scores)
    out["higher_is_better"] = {k: k != "perplexity" for k in data.task.metrics}
    return out


@dataclass
class TaskResult:
    """One task's numbers, its per-item scores and how they were obtained."""

    task: str
    metrics: dict
    items: list[ItemScore]
    config: dict  # n, n_total, limit, seed, seed_invariant, source, split, max_length, token_budget, generator

    def to_dict(self, with_items: bool = True) -> dict:
        out = {"task": self.task, "metrics": self.metrics, "config": self.config}
        if with_items:
            out["items"] = [asdict(s) for s in self.items]
        return out


def evaluate_task(
    model,
    tokenizer,
    data: TaskData,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_length: int | None = None,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
) -> TaskResult:
    """Score one task's items; ``max_length`` defaults to the model's positions (lm-eval HFLM's rule)."""
    max_length = max_length or max_positions(model) or DEFAULT_MAX_LENGTH
    requests = build_requests(tokenizer, data, max_length)
    ll, greedy = score_requests(model, requests, max_length, token_budget, description=data.task.name)
    scores = item_scores(data, requests, ll, greedy)
    config = {
        "n": len(data.items),
        "n_total": data.n_total,
        "limit": data.limit,
        "seed": data.seed,
        "seed_invariant": data.seed_invariant,
        "source": data.source,
        "split": data.task.split,
        "n_requests": len(requests),
        "max_length": max_length,
        "token_budget": token_budget,
        "bootstrap_iters": bootstrap_iters if "perplexity" in data.task.metrics else None,
        **({"generator": data.generator} if data.generator else {}),  # corpus-derived tasks' provenance
    }
    return TaskResult(data.task.name, task_metrics(data, scores, bootstrap_iters), scores, config)


def parse_task_data(entries: list[str]) -> dict[str, str]:
    """``["piqa=/d/piqa.jsonl", "corpus_mc:notes.txt:k=4=/d/mc.jsonl"]`` → {task: path}.

    The split is at the rightmost ``=`` whose left side is a known task, so task names with ``KEY=VALUE``
    parameters and paths containing ``=`` both work; an unknown task raises with near matches."""
    from esa.evals.tasks import TASKS

    out = {}
    for entry in entries:
        cuts = [i for i, ch in enumerate(entry) if ch == "="][::-1]
        name, path = next(((entry[:i], entry[i + 1:]) for i in cuts if entry[:i] in TASKS), (None, None))
        if name is None:
            if not cuts or not entry[:cuts[-1]] or not entry[cuts[0] + 1:]:
                raise EsaError(f"--task-data takes TASK=PATH pairs, e.g. piqa=/data/piqa.jsonl; got {entry!r}")
            TASKS.get(entry[:cuts[-1]])  # the unknown-task error, with near matches
        if not path:
            raise EsaError(f"--task-data {entry!r}: give the path after {name}=, e.g. {name}=/data/{name}.jsonl")
        out[name] = path
    return out


def check_task_data(tasks: list[str], task_data: dict[str, str]) -> None:
    """Every --task-data entry must name one of --tasks (a typo would silently read the hub instead)."""
    extra = sorted(set(task_data) - set(tasks))
    if extra:
        raise EsaError(
            f"--task-data names task(s) {', '.join(extra)} that are not in --tasks {' '.join(tasks)}"
        )


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    task_data: dict[str, str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> list[TaskResult]:
    """Load every task first (so a missing dataset fails before any scoring), then score them in order."""
    from esa.evals.tasks import load_task_data

    task_data = task_data or {}
    check_task_data(tasks, task_data)
    data = [load_task_data(t, task_data.get(t), limit, seed) for t in tasks]
    return [evaluate_task(model, tokenizer, d, token_budget) for d in data]


def items_stem(task: str) -> str:
    """A file-name-safe stem for a task's per-item file: ``corpus_mc:/data/x.txt`` → ``corpus_mc_data_x.txt``."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_")


def write_results(out_dir, results: list[TaskResult], provenance: dict, lm_eval: dict | None = None) -> dict:
    """``zeroshot.json`` (metrics, config, provenance) and ``<task>.items.jsonl`` (one ItemScore per line);
    ``lm_eval``: where the same results are in lm-eval's layout (:mod:`esa.evals.lmeval_format`), recorded
    as ``{"results": path, "samples": {task: path}}`` relative to ``out_dir``."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for r in results:
        path = out / f"{items_stem(r.task)}.items.jsonl"
        path.write_text("".join(json.dumps(asdict(s)) + "\n" for s in r.items))
        paths[r.task] = path.name
    summary = {
        "provenance": provenance,
        "tasks": {r.task: {**r.to_dict(with_items=False), "items_file": paths[r.task]} for r in results},
        **({"lm_eval": lm_eval} if lm_eval else {}),
    }
    (out / "zeroshot.json").write_text(json.dumps(summary, indent=1))
    return summary
