"""The ``esa superweights`` run: seeded windows → one super-weight search → superweights.json + PNG.

The detector itself is :func:`esa.sensitivity.superweights.find_super_weights`; this module picks the windows
(``chunks`` of ``context_len`` tokens, the seed choosing which), loads the model, and writes the document
(schema ``esa.superweights/1``) with provenance and the activation-profile plot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from esa.errors import EsaError
from esa.runs import check_out_dir
from esa.sensitivity.superweights import Thresholds, find_super_weights


@dataclass(frozen=True)
class SuperWeightRun:
    """What ``esa superweights`` does; stored in its JSON."""

    dataset: str = "python-docs"  # corpus name or .txt/.jsonl path
    context_len: int = 128  # tokens per window (method "chunks", the super-weight paper's convention)
    max_samples: int = 4  # windows in the single forward pass (B)
    seed: int = 0  # picks which windows
    iterations: int = 1  # search rounds in all; > 1 zeroes what was found and searches again
    thresholds: Thresholds = Thresholds()


def window_batch(loaded, run: SuperWeightRun):
    """(ids (B, T), selection) of ``max_samples`` seeded chunks windows."""
    from esa.data.corpora import load_corpus
    from esa.data.windows import make_windows, select_windows
    from esa.models import check_context

    if run.max_samples < 1 or run.iterations < 1:
        raise EsaError("--max-samples and the number of search rounds must be ≥ 1")
    check_context(loaded, run.context_len, "--context-len")
    corpus = load_corpus(run.dataset)
    ws = make_windows(loaded.tokenizer, corpus.documents, "chunks", run.context_len)
    sel = select_windows(ws, run.max_samples * (run.context_len - 1), run.seed)
    windows = sel.windows.windows[: run.max_samples]
    return torch.stack([w.input_ids for w in windows]), sel, corpus


def run_superweights(spec, run: SuperWeightRun, out_dir: Path, overwrite: bool = False):
    """Load ``spec`` (an ``esa.models.ModelSpec``), search, write ``superweights.json`` and ``superweights.png``.

    Returns ``(report, document, json_path, png_path)``; the document is what the JSON holds.
    """
    import json
    import time

    from esa.models import load_model
    from esa.provenance import provenance
    from esa.sensitivity.superweight_plots import plot_activation_profile

    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, ("superweights.json",), "esa superweights")
    start = time.perf_counter()
    loaded = load_model(spec)
    ids, sel, corpus = window_batch(loaded, run)
    report = find_super_weights(loaded.model, ids, thresholds=run.thresholds, iterate=run.iterations > 1,
                                max_iterations=run.iterations)
    decode = loaded.tokenizer.decode
    doc = {
        "schema": "esa.superweights/1",
        "provenance": provenance(loaded.device),
        "model": loaded.fingerprint.to_dict(),
        "run": asdict(run),
        "data": {"dataset": corpus.name, "source": corpus.source, "method": sel.windows.method,
                 "bos": sel.windows.bos, "context_len": run.context_len, "seed": run.seed,
                 "seed_invariant": bool(sel.seed_invariant), "window_indices": sel.indices[: len(ids)].tolist(),
                 "n_sequences": report.n_sequences, "n_tokens": report.n_tokens},
        **report.to_dict(),
        "tokens": {str(t): decode([t]) for t in sorted({w.token_id for w in report.candidates} | {
            t for m in report.massive_activations for t in m.token_ids})},  # token id → text, for reading
        "wall_seconds": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_activation_profile(report, out_dir / "superweights.png",
                                  title=f"{spec.name}: MLP output projection activations ({corpus.name})")
    path = out_dir / "superweights.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=True))
    tmp.replace(path)
    return report, doc, path, png
