"""Write a random-initialised model of a real architecture's size to a local directory, with a real tokenizer.

Where the hub is unreachable (the lent GPU machines, CI) this is how ESA measures throughput, memory and MFU
at real sizes: the compute of a forward pass depends on the shapes, not on the weight values. The vocabulary is
the tokenizer's (SmolLM2's 49,152 by default), so parameter counts differ slightly from the named model's.

    python bench/make_random_model.py --arch llama-3.2-1b --tokenizer DIR --out /tmp/rand-llama-1b --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from esa.models.tiny import random_model

# Shapes of public models (their config.json), vocabulary excepted.
ARCHS = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0),
    "llama-smoke": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),  # dry runs
    "pythia-1.4b": dict(model_type="gpt_neox", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=16, max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="a directory with tokenizer.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the saved weights")
    p.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster at 1B+)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with torch.device(args.device):
        model = random_model({**ARCHS[args.arch], "vocab_size": len(tokenizer)}, args.seed, DTYPES[args.dtype])
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    n = sum(t.numel() for t in model.parameters())
    print(f"{args.arch}: {n / 1e9:.3f}B parameters ({args.dtype}) -> {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
