"""``perturbed`` — the only code in ESA that writes model weights, and it always puts them back.

::

    with perturbed(model, {"model.layers.2.mlp.down_proj.weight": torch.tensor([123 * 1536 + 456])},
                   make_op("zero")) as record:
        scores = evaluate_windows(model, windows, pad_id, budget)   # sees the perturbed weights
    # here every touched element is bit-for-bit its original value again (verified)

On entry every target is validated (names, ranges, contiguity) before anything is written. Then, per tensor,
the touched elements are gathered (a copy — no model copies), the op computes their new values, and they are
written in place under ``torch.no_grad``. The ``finally`` clause writes the saved values back in reverse
order, also when the body raises or is interrupted (KeyboardInterrupt); with ``verify=True`` it then compares
the restored elements with the saved ones on their *bit patterns* (so NaN and -0.0 compare exactly) and raises
:class:`PerturbationError` if any differ.

Index semantics: flat positions in ``param.view(-1)``; duplicates are merged (each element is touched once,
so restore cannot be confused by repeated writes) and tied aliases such as ``lm_head.weight`` resolve to the
canonical parameter. The :class:`PerturbRecord` keeps the old and new values of each touched tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esa.core.errors import EsaError
from esa.perturb.ops import Op
from esa.perturb.targets import param_table, resolve_param

log = logging.getLogger(__name__)


class PerturbationError(RuntimeError):
    """Restoring weights failed verification: the model is no longer the one that was loaded. Reload it."""


@dataclass
class Touched:
    """One touched tensor: where, what was there, what was written."""

    name: str  # canonical named_parameters() path
    index: torch.Tensor  # (N,) int64 unique sorted flat indices, on the parameter's device
    old: torch.Tensor  # (N,) original values (weight dtype)
    new: torch.Tensor  # (N,) values written (weight dtype)
    tensor_std: float | None  # std of the whole original tensor, when the op needed it

    @property
    def n_nonfinite_new(self) -> int:
        """Non-finite values the op wrote (Inf/NaN — applied as-is, they are results)."""
        return int((~torch.isfinite(self.new)).sum())

    @property
    def n_nonfinite_introduced(self) -> int:
        """Elements that were finite before and are not after."""
        return int((torch.isfinite(self.old) & ~torch.isfinite(self.new)).sum())

    @property
    def n_changed(self) -> int:
        """Elements whose bit pattern changed (a ``scale:factor=1`` perturbation changes none)."""
        return int((_bits(self.old) != _bits(self.new)).view(len(self.old), -1).any(dim=1).sum())


@dataclass
class PerturbRecord:
    """What a ``perturbed`` block did; filled on entry, ``restored``/``verified`` set on exit."""

    op: dict[str, Any]  # op description, e.g. {"op": "scale", "factor": 2.0}
    seed: int
    tensors: dict[str, Touched] = field(default_factory=dict)
    restored: bool = False
    verified: bool = False

    @property
    def n_elements(self) -> int:
        return sum(len(t.index) for t in self.tensors.values())

    @property
    def n_nonfinite(self) -> int:
        return sum(t.n_nonfinite_new for t in self.tensors.values())

    @property
    def n_nonfinite_introduced(self) -> int:
        return sum(t.n_nonfinite_introduced for t in self.tensors.values())

    def old_values(self, name: str) -> torch.Tensor:
        return self.tensors[name].old

    def new_values(self, name: str) -> torch.Tensor:
        return self.tensors[name].new

    def summary(self) -> dict[str, Any]:
        """JSON-safe counts for result rows."""
        return {"op": self.op, "seed": self.seed, "n_tensors": len(self.tensors),
                "n_elements": self.n_elements,
                "n_changed": sum(t.n_changed for t in self.tensors.values()),
                "n_nonfinite": self.n_nonfinite, "n_nonfinite_introduced": self.n_nonfinite_introduced}


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a 1-D tensor, for exact comparison (NaN payloads and -0.0 included)."""
    return values.contiguous().view(torch.uint8)


def _describe(op: Op) -> dict[str, Any]:
    describe = getattr(op, "describe", None)
    return describe() if callable(describe) else {"op": getattr(op, "name", type(op).__name__)}


def _resolve_seed(op: Op, seed: int | None) -> int:
    op_seed = getattr(op, "seed", None)
    if seed is not None and op_seed is not None and seed != op_seed:
        raise EsaError(f"perturbed(seed={seed}) disagrees with the op's seed={op_seed}; give only one.")
    return int(seed if seed is not None else op_seed if op_seed is not None else 0)


def _plan(model: nn.Module,
          targets: Mapping[str, torch.Tensor]) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """Validate every target and merge aliases/duplicates: [(canonical name, parameter, unique indices)]."""
    table = param_table(model)
    merged: dict[str, tuple[nn.Parameter, list[torch.Tensor]]] = {}
    for name, idx in targets.items():
        canon, param = resolve_param(table, name)
        if not param.is_floating_point():  # int8/uint8 packed quantised weights, GPTQ qweight, …
            raise EsaError(f"{canon} stores {param.dtype} (integer or packed quantised values), which ESA's ops "
                           "cannot perturb meaningfully; load the model de-quantised (--dtype fp32, bf16 or fp16).")
        idx = torch.as_tensor(idx).reshape(-1)
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise EsaError(f"target indices of {name} must be integers (flat positions), got {idx.dtype}.")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= param.numel()):
            raise EsaError(f"target indices of {name} must lie in 0 … {param.numel() - 1} (flat positions of "
                           f"shape {list(param.shape)}); got {int(idx.min())} … {int(idx.max())}.")
        if not param.is_contiguous():
            raise EsaError(f"{canon} is not contiguous in memory, so flat indices cannot address it in "
                           "place; after loading, set param.data = param.data.contiguous().")
        merged.setdefault(canon, (param, []))[1].append(idx.to(torch.long))
    plan = [(n, p, torch.unique(torch.cat(parts)).to(p.device)) for n, (p, parts) in merged.items()]
    return [(n, p, idx) for n, p, idx in plan if idx.numel()]  # empty entries touch nothing


def _apply(name: str, param: nn.Parameter, index: torch.Tensor, op: Op,
           generator: torch.Generator) -> Touched:
    """Gather, compute and write one tensor's new values; returns the record *before* writing."""
    flat = param.detach().view(-1)  # (numel,) shares storage with the parameter
    old = flat[index]  # (N,) advanced indexing gathers a copy
    std = float(flat.float().std()) if getattr(op, "needs_tensor_std", False) else None
    new = op(old.clone(), generator, tensor_std=std)
    if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype:
        got = f"{getattr(new, 'dtype', type(new))} {tuple(getattr(new, 'shape', ()))}"
        raise EsaError(f"op {_describe(op)} returned {got} for {name}; it must return {old.dtype} "
                       f"{tuple(old.shape)} (same dtype and length as its input).")
    return Touched(name, index, old, new.to(old.device), std)


def _restore(model_params: dict[str, nn.Parameter], touched: list[Touched]) -> None:
    with torch.no_grad():
        for t in reversed(touched):
            model_params[t.name].detach().view(-1)[t.index] = t.old


def _verify(model_params: dict[str, nn.Parameter], touched: list[Touched]) -> None:
    for t in touched:
        now = model_params[t.name].detach().view(-1)[t.index]
        if not torch.equal(_bits(now), _bits(t.old)):
            n_bad = int((_bits(now) != _bits(t.old)).view(len(now), -1).any(dim=1).sum())
            raise PerturbationError(f"restore of {t.name} left {n_bad} of {len(now)} elements different from "
                                    "the originals; the model is corrupted — reload it.")


@contextmanager
def perturbed(model: nn.Module, targets: Mapping[str, torch.Tensor], op: Op, *, seed: int | None = None,
              verify: bool = True) -> Iterator[PerturbRecord]:
    """Apply ``op`` to ``targets`` of ``model`` in place for the duration of the ``with`` block.

    Args:
        model: any ``nn.Module``; it is modified in place (no copy) and restored on exit.
        targets: parameter name → flat indices, e.g. a :class:`~esa.perturb.targets.TargetSet`.
        op: a perturbation op (see :mod:`esa.perturb.ops`), called once per touched tensor in target order.
        seed: seeds the CPU ``torch.Generator`` handed to the op (default: the op's own ``seed`` or 0).
        verify: after restoring, check every touched element bit-exactly and raise
            :class:`PerturbationError` on any mismatch.

    Yields:
        A :class:`PerturbRecord` with each tensor's indices, old and new values and non-finite counts.
    """
    record = PerturbRecord(_describe(op), _resolve_seed(op, seed))
    plan = _plan(model, targets)  # all validation happens before the first write
    params = {name: param for name, param, _ in plan}
    generator = torch.Generator(device="cpu").manual_seed(record.seed)
    touched: list[Touched] = []
    try:
        with torch.no_grad():
            for name, param, index in plan:
                touched.append(_apply(name, param, index, op, generator))
                param.detach().view(-1)[index] = touched[-1].new
        record.tensors = {t.name: t for t in touched}
        if record.n_nonfinite_introduced:
            log.info("perturbation %s produced %d non-finite weights", record.op,
                     record.n_nonfinite_introduced)
        yield record
    finally:
        _restore(params, touched)
        record.restored = True
        if verify:
            _verify(params, touched)
            record.verified = True
