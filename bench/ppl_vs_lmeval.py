"""Cross-check and benchmark ESA's ``rolling`` perplexity against lm-evaluation-harness ``loglikelihood_rolling``.

Both score the same documents (a prefix of the embedded ``python-docs`` corpus) with the same weights (by
default SmolLM2-135M, the cached safetensors directory of the embedded GGUF; ``--model`` takes any alias or
local directory, e.g. a random-initialised model of a real size from ``bench/make_random_model.py``), the same
max length, device and dtype:

* lm-eval 0.4.x through its Python API: ``simple_evaluate(model="hf", ...)`` on a local JSONL task with
  ``output_type: loglikelihood_rolling``, once per batch size in ``--lmeval-batch-sizes`` (its best is kept);
* ESA: ``make_windows(..., "rolling")`` + ``evaluate_windows``;
* a bare ``model(input_ids)`` forward over ESA's exact batches, without attention mask, log-softmax or
  gathering — the speed limit of any method that must run the model over these windows.

Reported: summed NLL of each and their relative difference (target ≤ 1e-4), scoring tokens/s of each (scored
tokens / seconds spent scoring, warm-up excluded for ESA and the bare forward, lm-eval's ``loglikelihood_rolling``
call timed whole, so it includes its tokenization — a few ms here), the ESA/lm-eval and ESA/bare ratios, and
ESA's padding share and time split (backbone vs fp32 head + log-softmax) to show where time goes.

On CUDA (``--device cuda``) every clock reading synchronises the device first, seconds are wall seconds, and
MFU (2·N FLOPs per token against the GPU's dense bf16 peak) is printed for each tool. ``--reference-fp32``
re-scores the same weights in fp32 with ESA so that, at bf16, each tool's NLL error can be measured against it
(lm-eval computes its log-softmax in the model's dtype; ESA always in fp32). ``--repeats R`` times every
configuration R times and keeps the fastest, for both tools alike.

On CPU, seconds are process CPU seconds by default (``--clock cpu``): on a machine shared with other jobs, wall time
measures the neighbours as much as the code, while a single-threaded process's CPU time does not
(``OMP_NUM_THREADS=1``; with more threads CPU seconds add up over threads). Use ``--clock wall`` on a
dedicated machine.

Needs lm-eval (not an ESA dependency): ``pip install 'lm_eval==0.4.*'``. CPU timings on a shared machine are noisy.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/ppl_vs_lmeval.py --max-docs 5 --ctx 512
    python bench/ppl_vs_lmeval.py --model /tmp/rand-llama-1b --device cuda --dtype bf16 --ctx 2048 --max-docs 0 \
        --token-budgets 16384,65536,262144 --lmeval-batch-sizes 1,8,32,auto --repeats 2 --reference-fp32
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
from esa.evals.resources import mfu
from esa.models import ModelSpec, load_model

TASK = "esa_python_docs_rolling"
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
LMEVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_clock(name: str, device: torch.device):
    """The timer: on CUDA, wall time read after a device synchronisation (kernels are asynchronous)."""
    if device.type != "cuda":
        return CLOCKS[name]

    def cuda_wall() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return cuda_wall


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="ESA model: suite alias or local directory")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", choices=LMEVAL_DTYPES, default="fp32")
    p.add_argument("--ctx", type=int, default=512, help="max length (tokens the model reads per window)")
    p.add_argument("--max-docs", type=int, default=5,
                   help="first N python-docs documents (sorted topic order): 5 = 4468 tokens in documents of "
                        "174 to 2572 tokens, 12 = 9747, 0 = all 79 (113k)")
    p.add_argument("--lmeval-batch-sizes", default="1,4,16", help="lm-eval batch sizes to try ('auto' too)")
    p.add_argument("--repeats", type=int, default=1, help="time each configuration this often, keep the fastest")
    p.add_argument("--reference-fp32", action="store_true",
                   help="also score the same weights in fp32 (ESA) and report each tool's NLL error against it")
    p.add_argument("--token-budgets", default="513,2052,8192",
                   help="ESA micro-batch token budgets to try (the best is compared, as for lm-eval batch sizes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as set by OMP_NUM_THREADS)")
    p.add_argument("--clock", choices=CLOCKS, default="cpu",
                   help="cpu: process CPU seconds (robust on a shared machine when single-threaded); wall. "
                        "On CUDA always wall, synchronised")
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


def run_lmeval(source: str, folder: Path, args, batch_size: str, clock) -> dict:
    """One lm-eval run: per-document log-likelihoods (in document order) and the scoring seconds."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    seconds: list[float] = []
    model_args = {"pretrained": source, "dtype": LMEVAL_DTYPES[args.dtype], "max_length": args.ctx,
                  "device": args.device}
    batch_size = batch_size if batch_size == "auto" else int(batch_size)
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
    def clocked(device, into):  # the clock synchronises CUDA itself
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
    model(input_ids=batches[0][0][:, :-1].to(model.device))  # warm-up, like evaluate_windows
    for ids, attn, _ in batches:
        ids, attn = ids.to(model.device), attn.to(model.device)
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

    ids, attn, scored = (t.to(model.device) for t in batch)
    score_batch(model, ids, attn, scored)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score_batch(model, ids, attn, scored)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# --- report ----------------------------------------------------------------------------------------------

def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def report(args, esa: dict, bare: dict, lme_runs: list[dict], n_tokens: int, n_params: int,
           device: torch.device, reference: float | None) -> dict:
    best = max(lme_runs, key=lambda r: n_tokens / r["seconds"])
    esa_tps = esa["tokens"] / esa["seconds"]
    lme_tps = n_tokens / best["seconds"]
    bare_tps = esa["tokens"] / bare["bare_seconds"]
    nll_esa, nll_lme = esa["doc_nll"].sum(), best["doc_nll"].sum()
    per_doc = np.abs(esa["doc_nll"] - best["doc_nll"]) / np.abs(best["doc_nll"])
    out = {
        "model": args.model, "params": n_params, "device": str(device), "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "ctx": args.ctx, "docs": len(esa["doc_nll"]), "scored_tokens": esa["tokens"],
        "clock": "wall (cuda-synchronised)" if device.type == "cuda" else args.clock,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "nll_esa": float(nll_esa), "nll_lmeval": float(nll_lme),
        "rel_nll_diff": rel_diff(nll_esa, nll_lme), "max_rel_doc_nll_diff": float(per_doc.max()),
        "ppl_esa": math.exp(nll_esa / esa["tokens"]), "ppl_lmeval": math.exp(nll_lme / n_tokens),
        "esa_tokens_per_s": esa_tps, "esa_end_to_end_tokens_per_s": esa["tokens"] / esa["end_to_end_seconds"],
        "bare_forward_tokens_per_s": bare_tps,
        "lmeval_tokens_per_s": {r["batch_size"]: n_tokens / r["seconds"] for r in lme_runs},
        "lmeval_best_batch_size": best["batch_size"],
        "lmeval_rel_nll_diff_by_batch_size": {r["batch_size"]: rel_diff(r["doc_nll"].sum(), nll_esa)
                                              for r in lme_runs},
        "esa_over_lmeval_best": esa_tps / lme_tps,
        "esa_over_bare_forward": esa_tps / bare_tps,
        "esa_tokens_per_s_by_budget": esa["tokens_per_s_by_budget"],
        "esa_best_token_budget": esa["token_budget"],
        "esa_batch_sizes": sorted(set(esa["batch_sizes"])),
        "esa_padding_share": bare["padding_share"],
        "esa_backbone_share": bare["backbone_seconds"] / esa["seconds"],
        "mfu_esa": mfu(n_params, esa_tps, device), "mfu_lmeval_best": mfu(n_params, lme_tps, device),
        "mfu_bare_forward": mfu(n_params, bare_tps, device),
    }
    if reference is not None:  # each tool's error against ESA's fp32 scoring of the same weights
        out["nll_fp32_reference"] = reference
        out["rel_err_vs_fp32_esa"] = rel_diff(nll_esa, reference)
        out["rel_err_vs_fp32_lmeval"] = {r["batch_size"]: rel_diff(r["doc_nll"].sum(), reference) for r in lme_runs}
    for key, value in out.items():
        print(f"{key:36s} {value}")
    return out


def fastest(runs: list[dict]) -> dict:
    """Of repeated timings of one configuration (same numbers), the one with the fewest seconds."""
    return min(runs, key=lambda r: r["seconds"])


def best_esa(lm, docs, args, clock) -> dict:
    """ESA at each token budget (``--repeats`` times each, fastest kept); the best budget's run, like lm-eval's."""
    by_budget = {}
    for b in (int(x) for x in args.token_budgets.split(",")):
        by_budget[b] = fastest([run_esa(lm, docs, args.ctx, b, clock) | {"token_budget": b}
                                for _ in range(args.repeats)])
        r = by_budget[b]
        print(f"ESA token budget {b:>7}: {r['tokens'] / r['seconds']:.1f} tokens/s, batch sizes "
              f"{sorted(set(r['batch_sizes']))}", flush=True)
    best = max(by_budget.values(), key=lambda r: r["tokens"] / r["seconds"])
    return best | {"tokens_per_s_by_budget": {b: r["tokens"] / r["seconds"] for b, r in by_budget.items()}}


def fp32_reference(args, docs, token_budget: int, clock) -> float | None:
    """ESA's summed NLL of the same weights loaded in fp32 (None when the run already is fp32)."""
    if args.dtype == "fp32":
        return None
    lm = load_model(ModelSpec(name=args.model, device=args.device, dtype="fp32"))
    ref = float(run_esa(lm, docs, args.ctx, token_budget, clock)["doc_nll"].sum())
    del lm
    return ref


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(name=args.model, device=args.device, dtype=args.dtype))
    n_params = sum(t.numel() for t in lm.model.parameters())
    docs = load_corpus("python-docs").documents
    docs = docs[:args.max_docs] if args.max_docs else docs
    clock = make_clock(args.clock, lm.device)
    esa = best_esa(lm, docs, args, clock)
    batches = list(esa_batches(esa["windows"], esa["token_budget"], lm.tokenizer.pad_token_id or 0))
    timings = [time_bare_and_split(lm.model, batches, clock) for _ in range(args.repeats)]
    bare = {key: min(t[key] for t in timings) for key in timings[0]}  # fastest of each, like the other timings
    if args.profile:
        profile_batch(lm.model, batches[0])
    source = lm.fingerprint.source
    del lm, batches
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        write_task(docs, Path(tmp))
        lme_runs = []
        for bs in args.lmeval_batch_sizes.split(","):
            lme_runs.append(fastest([run_lmeval(source, Path(tmp), args, bs, clock) for _ in range(args.repeats)]))
            r = lme_runs[-1]
            print(f"lm-eval batch size {bs:>5}: {esa['tokens'] / r['seconds']:.1f} tokens/s", flush=True)
    reference = fp32_reference(args, docs, esa["token_budget"], clock) if args.reference_fp32 else None
    out = report(args, esa, bare, lme_runs, esa["tokens"], n_params, torch.device(args.device), reference)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return verdict(out)


def verdict(out: dict) -> int:
    """Exit status: 0 when ESA and lm-eval agree to 1e-4, or (low precision, with ``--reference-fp32``) when
    ESA is within 1e-4 of the fp32 scoring of the same weights. At bf16 the tools round differently (ESA's head
    and log-softmax run in fp32, lm-eval's log-softmax in bf16), so the printed errors against the fp32
    scoring say which tool is nearer the exact number."""
    ok = out["rel_nll_diff"] <= 1e-4
    print("NLL agreement ESA vs lm-eval:", "PASS" if ok else "FAIL",
          f"(target ≤ 1e-4, got {out['rel_nll_diff']:.2e}, dtype {out['dtype']})")
    if "nll_fp32_reference" in out:
        lme = out["rel_err_vs_fp32_lmeval"][out["lmeval_best_batch_size"]]
        print(f"NLL error vs fp32 scoring of the same weights: ESA {out['rel_err_vs_fp32_esa']:.2e}, "
              f"lm-eval {lme:.2e}")
        ok = ok or out["rel_err_vs_fp32_esa"] <= 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
