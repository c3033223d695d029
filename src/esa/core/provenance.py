"""Provenance stored with every result: package version and git sha, library versions, device, host facts.

Environment variables are never stored wholesale (they leak tokens); only the HF offline switches are noted.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

import esa

LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "numpy", "scipy", "gguf",
             "safetensors")


def git_sha() -> str | None:
    """Commit of the ESA checkout this package runs from (``+dirty`` when it has uncommitted changes)."""
    root = Path(esa.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: torch.device) -> dict:
    """The device and threads; ``cuda_visible_devices`` says which GPUs the process was given (a Ray replica:
    the ones Ray assigned it; None when unset)."""
    info = {"device": str(device), "torch_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def provenance(device: torch.device, model: torch.nn.Module | None = None) -> dict:
    """What ran a result; with ``model``, also ``attention``: the kernel it ran (transformers' resolved
    ``attn_implementation``, e.g. ``sdpa`` when ``auto`` was asked)."""
    from esa.models import attention_of

    return {
        "esa_version": esa.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        **device_info(device),
        "hf_offline": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")},
        **({"attention": attention_of(model)} if model is not None else {}),
    }
