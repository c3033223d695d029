"""Eager vs ``torch.compile`` backbone on ESA's scoring batches: compile time, speed ratio and NLL difference.

It scores the first planned micro-batches of python-docs windows with ``score_states`` on the backbone's
states, once with the eager backbone (the baseline, ESA's path today) and once with
``torch.compile(backbone, dynamic=True)``. The compiled pass runs twice: the first pass includes compilation,
and the second is timed. The script prints the timed ratio eager / compiled, the compile time and the largest
relative NLL difference between the two.

    HF_HUB_OFFLINE=1 python bench/compile_backbone.py                          # embedded SmolLM2, CPU (~5 min)
    python bench/compile_backbone.py --model /tmp/rand-8b --device cuda --dtype bf16 --ctx 2048 \
        --token-budget 65536                                                   # needs a GPU

ESA does not compile by default. The scoring path stays eager until this bench shows a gain on the hardware it
targets.
"""

from __future__ import annotations

import argparse

import torch
from scoring_common import add_scoring_args, clock, load, planned_batches, write_json

from esa.evals.logprobs import score_states
from esa.models.architectures import chunked_head


@torch.inference_mode()
def score(backbone, head_fn, batches, device) -> tuple[float, torch.Tensor]:
    """Seconds and summed NLL per window of scoring ``batches`` with ``backbone``."""
    start, nll = clock(device), []
    for ids, attn, scored in batches:
        states = backbone(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).last_hidden_state
        nll.append(score_states(states, head_fn, ids[:, 1:], scored[:, 1:])[0])
    return clock(device) - start, torch.cat(nll)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_args(p)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--mode", default=None, help="torch.compile mode (e.g. max-autotune, reduce-overhead)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    lm, device = load(args)
    batches = planned_batches(lm, args.ctx, args.token_budget, args.batches, device)
    backbone, head_fn = chunked_head(lm.model)
    score(backbone, head_fn, batches[:1], device)  # warm-up
    eager, want = score(backbone, head_fn, batches, device)
    compiled = torch.compile(backbone, dynamic=True, mode=args.mode)
    first, _ = score(compiled, head_fn, batches, device)  # compiles
    timed, got = score(compiled, head_fn, batches, device)
    diff = float(((got - want).abs() / want.abs()).max())
    row = {"model": args.model, "dtype": args.dtype, "device": str(device), "ctx": args.ctx,
           "token_budget": args.token_budget, "batches": len(batches), "mode": args.mode,
           "scored_tokens": int(sum(b[2][:, 1:].sum() for b in batches)), "eager_seconds": eager,
           "compiled_seconds": timed, "first_compiled_pass_seconds": first, "eager_over_compiled": eager / timed,
           "max_rel_nll_diff": diff, "threads": torch.get_num_threads()}
    print(f"{args.model} {args.dtype} on {device}, ctx {args.ctx}, {len(batches)} micro-batches "
          f"({row['scored_tokens']} scored tokens), threads {row['threads']}: eager {eager:.2f} s, compiled "
          f"{timed:.2f} s → {row['eager_over_compiled']:.2f}× (first compiled pass, compiling: {first:.0f} s); "
          f"max rel NLL diff {diff:.1e}")
    write_json(args.json, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
