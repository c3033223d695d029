"""What the scoring benches share (``head_step.py``, ``profile_scoring.py``, ``compile_backbone.py``): their
model and batch arguments, the model load, a device-synchronised clock, and the planned micro-batches of
python-docs windows that ``evaluate_windows`` would score."""

from __future__ import annotations

import json
import time

import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows
from esa.evals.perplexity import batch_plan, collate
from esa.models import ATTENTION_NAMES, ModelSpec, load_model


def add_scoring_args(p) -> None:
    """--model, --device, --dtype, --attention, --ctx and --token-budget (defaults: embedded SmolLM2, fp32 CPU,
    transformers' attention choice, 512, 4096)."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--attention", default="auto", choices=ATTENTION_NAMES, help="attention kernel (esa --attention)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--token-budget", type=int, default=4096)


def load(args, attention: str | None = None):
    """The model named by ``args`` (with ``attention``, else ``args.attention``) and the device its input
    embeddings live on."""
    lm = load_model(ModelSpec(args.model, device=args.device, dtype=args.dtype,
                              attention=attention or args.attention))
    return lm, lm.model.get_input_embeddings().weight.device


def clock(device) -> float:
    """perf_counter after the device's queued work finished (CUDA), so intervals cover the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def planned_batches(lm, ctx: int, budget: int, n_batches: int | None, device, method: str = "chunks",
                    stride: int | None = None, n_windows: int | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids, attn, scored) (B, T) each, on ``device``, of the first ``n_batches`` (None: all) micro-batches of
    :func:`esa.evals.perplexity.batch_plan` over python-docs windows cut by ``method`` — the first ``n_windows``
    of them when given, so that different budgets plan the same windows."""
    windows = make_windows(lm.tokenizer, load_corpus("python-docs").documents, method, ctx=ctx, stride=stride).windows
    windows = windows[:n_windows]
    return [tuple(t.to(device) for t in collate([windows[i] for i in idx], lm.tokenizer.pad_token_id))
            for idx in batch_plan(windows, budget)[:n_batches]]


def write_json(path: str | None, obj) -> None:
    """``obj`` as indented JSON at ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
