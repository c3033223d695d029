"""Wall time, peak memory and model FLOPs utilisation — measured, never estimated silently."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of GPUs whose peak is known; MFU is reported only for these.
GPU_PEAK_FLOPS = {
    "H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H200": 989e12, "A100-SXM4-80GB": 312e12, "A100-SXM4-40GB": 312e12, "A100 80GB PCIe": 312e12,
    "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12,
}


OOM_MESSAGES = ("out of memory", "can't allocate memory")  # CUDA/MPS/HIP; the CPU allocator (DefaultCPUAllocator)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory, so a smaller micro-batch may succeed.

    ``torch.OutOfMemoryError`` covers CUDA; other backends raise a plain ``RuntimeError`` whose text says so
    (``"MPS backend out of memory"``, ``"DefaultCPUAllocator: can't allocate memory: you tried to allocate …"``).
    An :class:`esa.core.errors.EsaError` is never an allocator failure, even when its message mentions memory.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: list[float]):
    """Append the wall time of the block (CUDA-synchronised on both ends) to ``into``."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - start)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak memory since the last reset: CUDA max allocated/reserved, or this process's peak RSS on CPU.

    On CPU the number is the whole process's high-water mark since it started (the OS keeps no resettable
    counter), so it includes model loading; the key name says so.
    """
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"process_peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def mfu(n_params: int, tokens_per_s: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation of a forward pass (2·N FLOPs per token, Kaplan et al. 2020), if peak known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else 2.0 * n_params * tokens_per_s / peak
