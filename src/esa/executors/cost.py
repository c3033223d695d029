"""What a run cost, stored as ``provenance.cost`` of every run record and read back by ``esa plan --db``.

``cost`` (all numbers of the whole run, as :func:`esa.executors.core.execute_run` timed it)::

    wall_seconds       the kind's execute call, model loading excluded
    device             "cuda:NVIDIA H200", "cpu", "mps" — where this process computed
    device_count       accelerators this process used: 0 on CPU, 1 on one GPU, the distinct GPUs of a
                       ``device_map`` split (the model's ``hf_device_map``)
    replicas           data-parallel model replicas sharing the run (:mod:`esa.core.parallel`), else 1
    device_hours       wall_seconds × max(device_count, 1) × replicas / 3600 — GPU-hours on GPUs, CPU-process
                       hours on CPU (named so one is never read as the other)
    tokens             the run's scored tokens: ``metrics.scored_tokens`` when the kind reports it
                       (``tokens_basis: "scored_tokens"``), else the kind's token budget
                       (``RunKind.cost(run)[0]``, an upper bound: ``"budget"``); None when neither is known or the
                       run failed
    passes             forward-equivalent passes over those tokens (``RunKind.cost(run)[1]``; backward ≈ 2);
                       None for a failed run
    tokens_per_second  tokens / wall_seconds (scored tokens, not × passes)
    mfu                2·N·tokens·passes / wall / (peak FLOP/s × devices × replicas) where the GPU's peak is known
                       (:func:`esa.evals.resources.mfu`); None on CPU and unknown GPUs

Example: a baseline of 4,096 scored tokens in 2.0 s on one CPU process → tokens_per_second 2,048, device_hours
2.0 / 3600, mfu None. The same run split over 2 replicas on 2 H200s in 1.1 s → tokens_per_second 3,724 (the
run's rate), device_hours 2 × 1.1 / 3600.

Data parallelism: every replica executes the run inside :func:`esa.core.parallel.share`, so ``replicas`` is read
here, while the run executes; nothing needs scaling afterwards. The wall time is the committed replica's (the
replicas finish together). Provenance is not part of a run id (:func:`esa.executors.core.run_id`).
"""

from __future__ import annotations

import torch

from esa import kinds
from esa.core import parallel
from esa.evals.resources import mfu


def device_label(device: torch.device) -> str:
    """``"cuda:<GPU name>"`` on CUDA, else the device type (``"cpu"``, ``"mps"``)."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def device_count(lm) -> int:
    """Accelerators the loaded model computes on: 0 on CPU, the distinct GPUs of its ``hf_device_map``, else 1."""
    if lm.device.type == "cpu":
        return 0
    placed = (getattr(lm.model, "hf_device_map", None) or {}).values()
    gpus = {d if isinstance(d, int) else str(d) for d in placed if str(d) not in ("cpu", "disk")}
    return max(len(gpus), 1)


def _work(run, metrics: dict | None) -> tuple[int | None, str | None, float | None]:
    """(scored tokens, where that number comes from, forward-equivalent passes) of a run; all None for a failed
    run (``metrics`` None), whose processed tokens are unknown. The run's own count beats the kind's budget."""
    if metrics is None:
        return None, None, None
    budget, passes = kinds.get(run.kind).cost(run)
    scored = metrics.get("scored_tokens")
    if isinstance(scored, (int, float)) and not isinstance(scored, bool):
        return int(scored), "scored_tokens", float(passes)
    return (None, None, float(passes)) if budget is None else (int(budget), "budget", float(passes))


def run_cost(lm, run, metrics: dict | None, wall_seconds: float) -> dict:
    """The ``provenance.cost`` of ``run`` executed on ``lm`` in ``wall_seconds`` (``metrics`` None: it failed)."""
    share = parallel.active()
    replicas = share.count if share is not None else 1
    count = device_count(lm)
    tokens, basis, passes = _work(run, metrics)
    rate = tokens / wall_seconds if tokens is not None and wall_seconds > 0 else None
    per_device = None if rate is None else rate * passes / (max(count, 1) * replicas)
    return {"wall_seconds": wall_seconds, "device": device_label(lm.device), "device_count": count,
            "replicas": replicas, "device_hours": wall_seconds * max(count, 1) * replicas / 3600,
            "tokens": tokens, "tokens_basis": basis, "passes": passes, "tokens_per_second": rate,
            "mfu": None if per_device is None else mfu(lm.fingerprint.n_params, per_device, lm.device)}


def forward_rate(cost: dict, split: bool = True) -> float | None:
    """Forward-equivalent tokens/s of one process — the rate ``esa plan`` divides a planned run's
    ``tokens × passes`` by; None when the cost has no rate.

    That is ``tokens_per_second × passes / replicas`` for a kind whose work the replicas split (``split``,
    :attr:`esa.kinds.base.RunKind.split_by_replicas`); a kind every replica repeats went at one process's rate
    whatever the replicas, so its rate is not divided."""
    rate = (cost or {}).get("tokens_per_second")
    if not isinstance(rate, (int, float)) or rate <= 0:
        return None
    return rate * float(cost.get("passes") or 1.0) / (int(cost.get("replicas") or 1) if split else 1)
