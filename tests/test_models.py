import time

import pytest
import torch

from esa.errors import EsaError
from esa.models import ModelSpec, check_dtype, load_model, resolve_source


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
    from esa.tiny import tiny_model

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
    from esa.tiny import tiny_model

    monkeypatch.setattr(models, "FULL_HASH_LIMIT", 0)
    tiny_model("llama").save_pretrained(tmp_path / "m")
    assert models.resolve_source(str(tmp_path / "m"))[2].startswith("sampled-sha256:")
