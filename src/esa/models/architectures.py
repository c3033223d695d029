"""Per-family map of model internals — the one place that knows module names.

Everything else in ESA names a parameter by its ``named_parameters()`` path and asks this module for roles:
which modules are the decoder layers, which projection is "the MLP output" (where super weights live), whether
a weight is stored transposed (GPT-2's ``Conv1D`` keeps ``(in, out)`` instead of ``nn.Linear``'s ``(out, in)``),
and how to reach the final hidden states and the LM head separately (for chunked fp32 log-softmax).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from esa.core.errors import EsaError


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family, relative to the ``*ForCausalLM`` root."""

    layers: str  # dotted path of the ModuleList of decoder blocks
    mlp_out: str  # path of the MLP output projection inside one block
    transposed: bool  # True when weights are stored (in, out) — GPT-2 Conv1D
    roles: tuple[tuple[str, str], ...]  # (regex on the in-block parameter path, role name), first match wins
    exact_head: bool = True  # hidden → head(hidden) reproduces the model's logits exactly (no extra scaling)
    # Module inside a block whose output is the MLP's contribution to the residual stream, when that is not
    # mlp_out's own output. Gemma-2/3 and OLMo-2 add post_feedforward_layernorm(down_proj(·)) to the residual:
    # an RMSNorm with learned per-channel gains (Gemma-3-270M: up to ≈ 1657), so a modest down_proj output
    # can become a massive residual activation. It must map mlp_out's (B, T, D) output token by token.
    mlp_resid: str | None = None


_LLAMA_ROLES = (
    (r"self_attn\.q_proj", "attn_q"), (r"self_attn\.k_proj", "attn_k"), (r"self_attn\.v_proj", "attn_v"),
    (r"self_attn\.qkv_proj", "attn_qkv"), (r"self_attn\.o_proj", "attn_o"),
    (r"mlp\.gate_up_proj", "mlp_gate_up"), (r"mlp\.gate_proj", "mlp_gate"), (r"mlp\.up_proj", "mlp_up"),
    (r"mlp\.down_proj", "mlp_down"), (r"experts", "moe_expert"), (r"gate\.weight", "moe_router"),
    (r"norm|layernorm", "norm"),
)
_LLAMA = Family("model.layers", "mlp.down_proj", False, _LLAMA_ROLES)
_POST_NORM = Family("model.layers", "mlp.down_proj", False, _LLAMA_ROLES, mlp_resid="post_feedforward_layernorm")
_NEOX = Family(
    "gpt_neox.layers", "mlp.dense_4h_to_h", False,
    ((r"attention\.query_key_value", "attn_qkv"), (r"attention\.dense", "attn_o"),
     (r"mlp\.dense_h_to_4h", "mlp_up"), (r"mlp\.dense_4h_to_h", "mlp_down"), (r"layernorm|norm", "norm")),
)
_GPT2 = Family(
    "transformer.h", "mlp.c_proj", True,
    ((r"attn\.c_attn", "attn_qkv"), (r"attn\.c_proj", "attn_o"), (r"mlp\.c_fc", "mlp_up"),
     (r"mlp\.c_proj", "mlp_down"), (r"ln_\d", "norm")),
)

FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo", "mixtral", "gemma")},
    **{t: _POST_NORM for t in ("gemma2", "gemma3_text", "olmo2")},
    "gpt_neox": _NEOX,
    "gpt2": _GPT2,
}

_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def family_of(model: nn.Module) -> Family | None:
    """The family of a loaded model, or ``None`` when ESA has no map for it (callers fall back)."""
    return FAMILIES.get(getattr(model.config, "model_type", ""))


def require_family(model: nn.Module) -> Family:
    fam = family_of(model)
    if fam is None:
        raise EsaError(
            f"model_type {model.config.model_type!r} has no module map in esa.models.architectures; "
            f"supported: {', '.join(sorted(FAMILIES))}. Add a Family entry for it."
        )
    return fam


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (length L)."""
    return model.get_submodule(require_family(model).layers)


def layer_index(param_name: str) -> int | None:
    """Decoder-layer index of a parameter path, e.g. ``model.layers.3.mlp.down_proj.weight`` → 3."""
    match = _LAYER_INDEX.search(param_name)
    return int(match.group(1)) if match else None


def module_role(model: nn.Module, param_name: str) -> str:
    """Role of a parameter: ``attn_q`` … ``mlp_down``, ``norm``, ``embedding``, ``lm_head`` or ``other``."""
    if "embed" in param_name or param_name.endswith(("wte.weight", "wpe.weight")):
        return "embedding"
    if "lm_head" in param_name or "embed_out" in param_name:
        return "lm_head"
    fam = family_of(model)
    for pattern, role in fam.roles if fam else ():
        if re.search(pattern, param_name):
            return role
    if "norm" in param_name or "ln_f" in param_name:
        return "norm"
    return "other"


def mlp_out_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, module) of each layer's MLP output projection, in layer order."""
    fam = require_family(model)
    return [(f"{fam.layers}.{i}.{fam.mlp_out}", blk.get_submodule(fam.mlp_out))
            for i, blk in enumerate(decoder_layers(model))]


def mlp_residual_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, module) whose output is each layer's MLP contribution to the residual stream.

    That is the MLP output projection itself (Llama, GPT-NeoX, GPT-2: ``h += down_proj(·)``) unless the family
    names an ``mlp_resid`` module (Gemma-2/3, OLMo-2: ``h += post_feedforward_layernorm(down_proj(·))``).
    """
    fam = require_family(model)
    if fam.mlp_resid is None:
        return mlp_out_modules(model)
    return [(f"{fam.layers}.{i}.{fam.mlp_resid}", blk.get_submodule(fam.mlp_resid))
            for i, blk in enumerate(decoder_layers(model))]


def as_out_in(weight: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """View of a 2-D projection weight as (out_features, in_features) whatever the storage convention."""
    fam = family_of(model)
    return weight.t() if fam is not None and fam.transposed else weight


def chunked_head(model: nn.Module):
    """``(backbone, head_fn)`` so that ``head_fn(backbone(...).last_hidden_state)`` equals the model's logits.

    Returns ``None`` for architectures whose logits involve more than the output embedding, except Gemma-2's
    final soft-capping, which is reproduced here. Callers then fall back to ``model(...).logits``.
    """
    fam = family_of(model)
    head = model.get_output_embeddings()
    if fam is None or head is None or not fam.exact_head:
        return None
    return model.base_model, Head(head, getattr(model.config, "final_logit_softcapping", None))


class Head:
    """The output head as a function: final hidden states (…, D) → logits (…, V), soft-capped when ``cap``
    (Gemma-2: ``tanh(logits / cap) · cap``). ``out_features`` is V."""

    def __init__(self, linear: nn.Module, cap: float | None):
        self.linear, self.cap = linear, cap
        self.out_features = linear.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits
