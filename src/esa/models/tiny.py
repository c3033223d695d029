"""Tiny random-initialised models built from a config, for fast tests and GPU benchmarks at real sizes.

``tiny_model("llama")`` gives a 2-layer Llama with the real SmolLM2 vocabulary size so it can share the
embedded tokenizer; ``random_model(config_dict)`` builds any size (e.g. a Llama-3-8B-shaped model on a GPU
where the hub is unreachable). Weights are seeded, so a tiny model is the same on every machine.
"""

from __future__ import annotations

import torch

VOCAB = 49152  # SmolLM2 tokenizer size, so tiny models can use the embedded tokenizer

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def random_model(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised causal LM from a config dict with ``model_type`` (seeded, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **{"vocab_size": VOCAB, **cfg})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    return random_model(TINY_CONFIGS[family], seed)
