"""Cross-check and benchmark ESA's ``rolling`` perplexity against lm-evaluation-harness ``loglikelihood_rolling``.

Both score the same documents (a prefix of the embedded ``python-docs`` corpus) with the same SmolLM2-135M
weights (the cached safetensors directory of the embedded GGUF), the same max length and fp32:

* lm-eval 0.4.x through its Python API: ``simple_evaluate(model="hf", ...)`` on a local JSONL task with
  ``output_type: loglikelihood_rolling``, once per batch size in ``--lmeval-batch-sizes`` (its best is kept);
* ESA: ``make_windows(..., "rolling")`` + ``evaluate_windows``;
* a bare ``model(input_ids)`` forward over ESA's exact batches, without attention mask, log-softmax or
  gathering — the speed limit of any method that must run the model over these windows.

Reported: summed NLL of each and their relative difference (target ≤ 1e-4), scoring tokens/s of each (scored
tokens / seconds spent scoring, warm-up excluded for ESA and the bare forward, lm-eval's ``loglikelihood_rolling``
call timed whole, so it includes its tokenization — a few ms here), the ESA/lm-eval and ESA/bare ratios, and
ESA's padding share and time split (backbone vs fp32 head + log-softmax) to show where time goes.

Seconds are process CPU seconds by default (``--clock cpu``): on a machine shared with other jobs, wall time
measures the neighbours as much as the code, while a single-threaded process's CPU time does not
(``OMP_NUM_THREADS=1``; with more threads CPU seconds add up over threads). Use ``--clock wall`` on a
dedicated machine.

Needs lm-eval (not an ESA dependency): ``pip install 'lm_eval==0.4.*'``. CPU timings on a shared machine are noisy.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/ppl_vs_lmeval.py --max-docs 5 --ctx 512
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows
from esa.evals.perplexity import batch_plan, collate, evaluate_windows
from esa.models import ModelSpec, load_model

TASK = "esa_python_docs_rolling"
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, default=512, help="max length (tokens the model reads per window)")
    p.add_argument("--max-docs", type=int, default=5,
                   help="first N python-docs documents (sorted topic order): 5 = 4468 tokens in documents of "
                        "174 to 2572 tokens, 12 = 9747, 0 = all 79 (113k)")
    p.add_argument("--lmeval-batch-sizes", default="1,4,16", help="lm-eval batch sizes to try")
    p.add_argument("--token-budgets", default="513,2052,8192",
                   help="ESA micro-batch token budgets to try (the best is compared, as for lm-eval batch sizes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as set by OMP_NUM_THREADS)")
    p.add_argument("--clock", choices=CLOCKS, default="cpu",
                   help="cpu: process CPU seconds (robust on a shared machine when single-threaded); wall")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators for one ESA micro-batch (score_batch)")
    return p.parse_args(argv)


# --- lm-evaluation-harness -------------------------------------------------------------------------------

def write_task(docs: tuple[str, ...], folder: Path) -> None:
    """A local lm-eval task: one JSONL row per document; the rolling request is the raw ``text`` field."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        "doc_to_target: text\n"  # a column name: lm-eval passes doc["text"] through untouched
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n", encoding="utf-8")


@contextmanager
def timed_rolling(into: list[float], clock):
    """Time every ``HFLM.loglikelihood_rolling`` call (the scoring), restoring the method afterwards."""
    from lm_eval.models.huggingface import HFLM

    original = HFLM.loglikelihood_rolling

    def wrapper(self, *args, **kwargs):
        start = clock()
        out = original(self, *args, **kwargs)
        into.append(clock() - start)
        return out

    HFLM.loglikelihood_rolling = wrapper
    try:
        yield
    finally:
        HFLM.loglikelihood_rolling = original


def run_lmeval(source: str, folder: Path, ctx: int, batch_size: int, clock) -> dict:
    """One lm-eval run: per-document log-likelihoods (in document order) and the scoring seconds."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    seconds: list[float] = []
    model_args = {"pretrained": source, "dtype": "float32", "max_length": ctx, "device": "cpu"}
    with timed_rolling(seconds, clock):
        out = simple_evaluate(
            model="hf", model_args=model_args,
            tasks=[TASK], batch_size=batch_size, task_manager=TaskManager(include_path=str(folder)),
            log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    loglik = np.array([float(np.ravel(s["filtered_resps"])[0]) for s in samples])  # (N_docs,)
    return {"batch_size": batch_size, "doc_nll": -loglik, "seconds": sum(seconds),
            "bits_per_byte": out["results"][TASK].get("bits_per_byte,none")}


# --- ESA and the bare forward ----------------------------------------------------------------------------

@contextmanager
def esa_clock(clock):
    """Make ``evaluate_windows`` time its passes with ``clock`` (its own timer is wall time), then restore."""
    import esa.evals.perplexity as perplexity

    @contextmanager
    def clocked(device, into):
        start = clock()
        yield
        into.append(clock() - start)

    original, perplexity.timed = perplexity.timed, clocked
    try:
        yield
    finally:
        perplexity.timed = original


def run_esa(lm, docs: tuple[str, ...], ctx: int, token_budget: int, clock) -> dict:
    """ESA rolling perplexity: window construction + fp32 chunked scoring; per-document summed NLL."""
    start = clock()
    with esa_clock(clock):
        ws = make_windows(lm.tokenizer, docs, "rolling", ctx)
        scores = evaluate_windows(lm.model, ws.windows, lm.tokenizer.pad_token_id or 0, token_budget)
    end_to_end = clock() - start  # includes tokenization and the untimed warm-up batch
    doc_nll = np.zeros(len(docs))
    np.add.at(doc_nll, [w.doc for w in ws.windows], scores.nll)
    return {"windows": ws.windows, "doc_nll": doc_nll, "tokens": int(scores.n_scored.sum()),
            "seconds": scores.forward_seconds, "end_to_end_seconds": end_to_end, "batch_sizes": scores.batch_sizes}


def esa_batches(windows, token_budget: int, pad_id: int):
    """ESA's exact micro-batches (``batch_plan``: same windows, order and sizes) as collated tensors."""
    for idx in batch_plan(windows, token_budget):
        yield collate([windows[j] for j in idx], pad_id)


@torch.inference_mode()
def time_bare_and_split(model, batches: list, clock) -> dict:
    """Seconds of a bare ``model(ids)`` forward (logits, no mask), of the backbone alone, and padding share."""
    bare, backbone = 0.0, 0.0
    model(input_ids=batches[0][0][:, :-1])  # warm-up, like evaluate_windows
    for ids, attn, _ in batches:
        start = clock()
        model(input_ids=ids[:, :-1])  # (B, T-1, V) logits — what lm-eval runs per batch
        mid = clock()
        model.base_model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1])  # ESA's backbone call
        backbone += clock() - mid
        bare += mid - start
    real = sum(int(a[:, :-1].sum()) for _, a, _ in batches)
    padded = sum(a[:, :-1].numel() for _, a, _ in batches)
    return {"bare_seconds": bare, "backbone_seconds": backbone, "padding_share": 1 - real / padded}


def profile_batch(model, batch, rows: int = 12) -> None:
    """Print where one ``score_batch`` call spends its time (operators by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    from esa.evals.perplexity import score_batch

    ids, attn, scored = batch
    score_batch(model, ids, attn, scored)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score_batch(model, ids, attn, scored)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# --- report ----------------------------------------------------------------------------------------------

def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def report(args, esa: dict, bare: dict, lme_runs: list[dict], n_tokens: int) -> dict:
    best = max(lme_runs, key=lambda r: n_tokens / r["seconds"])
    esa_tps = esa["tokens"] / esa["seconds"]
    nll_esa, nll_lme = esa["doc_nll"].sum(), best["doc_nll"].sum()
    per_doc = np.abs(esa["doc_nll"] - best["doc_nll"]) / np.abs(best["doc_nll"])
    out = {
        "ctx": args.ctx, "docs": len(esa["doc_nll"]), "scored_tokens": esa["tokens"], "clock": args.clock,
        "threads": torch.get_num_threads(),
        "nll_esa": float(nll_esa), "nll_lmeval": float(nll_lme),
        "rel_nll_diff": rel_diff(nll_esa, nll_lme), "max_rel_doc_nll_diff": float(per_doc.max()),
        "ppl_esa": math.exp(nll_esa / esa["tokens"]), "ppl_lmeval": math.exp(nll_lme / n_tokens),
        "esa_tokens_per_s": esa_tps, "esa_end_to_end_tokens_per_s": esa["tokens"] / esa["end_to_end_seconds"],
        "bare_forward_tokens_per_s": esa["tokens"] / bare["bare_seconds"],
        "lmeval_tokens_per_s": {r["batch_size"]: n_tokens / r["seconds"] for r in lme_runs},
        "lmeval_best_batch_size": best["batch_size"],
        "lmeval_rel_nll_diff_by_batch_size": {r["batch_size"]: rel_diff(r["doc_nll"].sum(), nll_esa)
                                              for r in lme_runs},
        "esa_over_lmeval_best": esa_tps / (n_tokens / best["seconds"]),
        "esa_over_bare_forward": esa_tps / (esa["tokens"] / bare["bare_seconds"]),
        "esa_best_token_budget": esa["token_budget"],
        "esa_batch_sizes": sorted(set(esa["batch_sizes"])),
        "esa_padding_share": bare["padding_share"],
        "esa_backbone_share": bare["backbone_seconds"] / esa["seconds"],
    }
    for key, value in out.items():
        print(f"{key:36s} {value}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(device="cpu", dtype="fp32"))
    docs = load_corpus("python-docs").documents
    docs = docs[:args.max_docs] if args.max_docs else docs
    clock = CLOCKS[args.clock]
    runs = [run_esa(lm, docs, args.ctx, int(b), clock) | {"token_budget": int(b)}
            for b in args.token_budgets.split(",")]
    esa = max(runs, key=lambda r: r["tokens"] / r["seconds"])  # ESA at its best budget, like lm-eval's best bs
    for r in runs:
        print(f"ESA token budget {r['token_budget']:>6}: {r['tokens'] / r['seconds']:.1f} tokens/s")
    batches = list(esa_batches(esa["windows"], esa["token_budget"], lm.tokenizer.pad_token_id or 0))
    bare = time_bare_and_split(lm.model, batches, clock)
    if args.profile:
        profile_batch(lm.model, batches[0])
    with tempfile.TemporaryDirectory() as tmp:
        write_task(docs, Path(tmp))
        lme_runs = [run_lmeval(lm.fingerprint.source, Path(tmp), args.ctx, int(bs), clock)
                    for bs in args.lmeval_batch_sizes.split(",")]
    out = report(args, esa, bare, lme_runs, esa["tokens"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    ok = out["rel_nll_diff"] <= 1e-4
    print("NLL agreement:", "PASS" if ok else "FAIL", f"(target ≤ 1e-4, got {out['rel_nll_diff']:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
