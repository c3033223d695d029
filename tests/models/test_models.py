import time

import numpy as np
import pytest
import torch

from esa.core.errors import EsaError
from esa.models import (Fingerprint, LoadedModel, ModelSpec, check_context, check_dtype, load_model, pad_id,
                        resolve_source)


def test_embedded_model_fingerprint(smol):
    fp = smol.fingerprint
    assert fp.model_id == "smollm2-135m" and fp.model_type == "llama"
    assert fp.revision.startswith("sha256:") and len(fp.revision) == 7 + 64
    assert fp.n_params == sum(p.numel() for p in smol.model.parameters())
    assert fp.max_positions == 8192 and fp.dtype == "fp32"
    assert not smol.model.training


def test_cached_conversion_is_reused(smol):
    start = time.perf_counter()
    kind, location, revision = resolve_source("smollm2-135m")
    assert kind == "dir" and location == smol.fingerprint.source and revision == smol.fingerprint.revision
    assert time.perf_counter() - start < 10  # hashing only; no second de-quantisation


@pytest.mark.model
def test_bf16_load_keeps_weights_dtype():
    lm = load_model(ModelSpec("smollm2-135m", dtype="bf16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.fingerprint.dtype == "bf16"


@pytest.mark.parametrize("name, fragment", [
    ("llama-3.1-8b", "hub is unreachable"),
    ("someorg/not-a-model", "hub is unreachable"),
    ("llama-3-8b", "not a suite alias"),
    ("./no/such/dir", "does not exist"),
    ("missing.gguf", "does not exist"),
])
def test_unknown_or_unreachable_models_fail_fast(name, fragment):
    start = time.perf_counter()
    with pytest.raises(EsaError, match=fragment):
        load_model(ModelSpec(name))
    assert time.perf_counter() - start < 10


def test_offline_hub_error_says_how_to_fix():
    with pytest.raises(EsaError) as exc:
        load_model(ModelSpec("llama-3.1-8b"))
    assert "--model /path/to/dir" in str(exc.value) and "\n" not in str(exc.value)


def test_fp16_refused_on_cpu():
    with pytest.raises(EsaError, match="fp16 is not supported on CPU"):
        check_dtype("fp16", torch.device("cpu"))
    with pytest.raises(EsaError, match="unknown --dtype"):
        check_dtype("int8", torch.device("cpu"))


def test_local_dir_fingerprint_follows_the_weights(tmp_path, tokenizer, monkeypatch):
    from esa.models import resolve_source
    from esa.models.tiny import tiny_model

    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "cache"))
    dirs = []
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):  # b: same config and file sizes, other weights
        tiny_model("llama", seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs.append(resolve_source(str(tmp_path / name))[2])
    assert dirs[0].startswith("content-sha256:")
    assert dirs[0] != dirs[1] and dirs[0] == dirs[2]
    assert resolve_source(str(tmp_path / "a"))[2] == dirs[0]  # second call served from the hash cache
    assert (tmp_path / "cache" / "file-hashes.json").exists()


def test_sampled_fingerprint_above_the_full_hash_limit(tmp_path, tokenizer, monkeypatch):
    import esa.models as models
    from esa.models.tiny import tiny_model

    monkeypatch.setattr(models, "FULL_HASH_LIMIT", 0)
    tiny_model("llama").save_pretrained(tmp_path / "m")
    assert models.resolve_source(str(tmp_path / "m"))[2].startswith("sampled-sha256:")


class _Tok:
    """A tokenizer-like object with only the attributes the pad rule reads."""

    def __init__(self, pad, eos, n=100):
        self.pad_token_id, self.eos_token_id, self.n = pad, eos, n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("pad, eos, expected", [
    (3, 7, 3),  # the tokenizer's own pad token
    (None, 7, 7),  # no pad token (Llama, Mistral, GPT-NeoX): EOS
    (None, None, 0),  # neither: row 0
    (100, 7, 7),  # a [PAD] beyond the vocabulary is skipped: it would index past the embedding
    (100, 100, 0),
    (-1, None, 0),
])
def test_pad_id_rule(pad, eos, expected):
    assert pad_id(_Tok(pad, eos)) == expected


def test_pad_id_checks_the_models_embedding_rows_not_the_tokenizers_length():
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(50, 4)
    assert pad_id(_Tok(60, 7, n=100)) == 60  # fits the tokenizer …
    assert pad_id(_Tok(60, 7, n=100), model) == 7  # … but not the model's 50 rows


def test_any_in_vocabulary_pad_id_gives_the_same_scores():
    """Why the rule may pick any valid id: padded positions change no number (independent: unbatched scores)."""
    from esa.data.windows import Window
    from esa.evals.perplexity import evaluate_windows
    from esa.models.tiny import VOCAB, tiny_model

    model = tiny_model("llama", seed=0)
    gen = torch.Generator().manual_seed(0)
    windows = tuple(Window(ids, torch.arange(len(ids)) > 0, 0, 0) for ids in
                    (torch.randint(VOCAB, (n,), generator=gen) for n in (40, 39, 38)))  # one batch, 0-2 pads each
    alone = np.concatenate([evaluate_windows(model, (w,), 0, 10_000).nll for w in windows])
    for pad in (0, 2, VOCAB - 1):
        scores = evaluate_windows(model, windows, pad, 10_000)
        assert scores.batch_sizes == [3]
        np.testing.assert_allclose(scores.nll, alone, rtol=1e-5)


def _lm(max_positions):
    fp = Fingerprint("smollm2-135m", "src", "rev", 1, "fp32", "llama", max_positions)
    return LoadedModel(torch.nn.Module(), None, fp, torch.device("cpu"))


def test_check_context_names_the_flag_and_the_fix():
    check_context(_lm(8192), 8192)  # the model's own maximum passes
    check_context(_lm(None), 10**6)  # a config without a limit passes
    with pytest.raises(EsaError) as exc:
        check_context(_lm(8192), 9000, "sensitivity.context_len")
    assert str(exc.value) == ("context length 9000 exceeds smollm2-135m's maximum of 8192 positions; "
                              "use sensitivity.context_len ≤ 8192")
    with pytest.raises(EsaError, match="use --context-lens ≤ 8192$"):  # esa baseline's flag by default
        check_context(_lm(8192), 9000)


@pytest.mark.parametrize("visible, sharded", [(2, True), (1, False)])
def test_a_process_that_sees_several_gpus_shards_the_model(tmp_path, tokenizer, monkeypatch, visible, sharded):
    """``--device auto`` with 2+ visible GPUs loads with ``device_map="auto"`` and leaves the placement to it; one
    GPU: no device map, moved to it. A Ray replica with ``--num-gpus 2`` sees 2 (tests/executors/
    test_replica_gpus_ray.py), so sharding inside a replica composes with data parallelism. CUDA is faked here;
    the model stays on the CPU."""
    import transformers

    from esa.models.tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(location, **kwargs):
        seen["kwargs"] = kwargs
        model = real(location, dtype=kwargs["dtype"])
        model.to = lambda device: seen.setdefault("moved_to", str(device)) and model
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    lm = load_model(ModelSpec(str(tmp_path / "m"), device="auto", dtype="fp32"))
    assert lm.device.type == "cuda"
    assert (seen["kwargs"].get("device_map") == "auto") is sharded
    assert seen.get("moved_to") == (None if sharded else "cuda")
