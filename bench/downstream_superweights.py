"""The super-weight paper's downstream experiment on the embedded SmolLM2-135M, offline.

Zeroing the super weights (found on calibration windows) vs zeroing as many of the largest-|W| non-super
weights of the same tensors (largest_k) vs as many random weights (random_k), on the same evaluation windows
and the same zero-shot items: corpus-derived tasks from python-docs (≥ 500 items each — NOT the published
benchmarks) and the 20-odd-item samples shipped in tests/evals/fixtures. Prints, per arm and task, accuracy,
Δ accuracy with its paired item-bootstrap 95 % CI, the exact McNemar p (Holm-adjusted across the run), and the
perplexity on the windows. CPU: roughly 20 minutes on 2 cores.

    .venv/bin/python bench/downstream_superweights.py [--items 500] [--out bench/results/downstream_superweights.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from esa.models import ModelSpec, load_model
from esa.perturb.protocols import EvalConfig, PerturbConfig, perturb_experiment

FIX = Path(__file__).resolve().parents[1] / "tests" / "evals" / "fixtures"
CORPUS_TASKS = ("corpus_mc:python-docs:context=24:span=8", "corpus_cloze:python-docs:max_context=40")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=500, help="items per corpus-derived task")
    ap.add_argument("--out", type=Path, default=Path("bench/results/downstream_superweights.json"))
    args = ap.parse_args()
    lm = load_model(ModelSpec("smollm2-135m"))
    rows = []
    start = time.perf_counter()
    for tasks, limit in (([(t, None) for t in CORPUS_TASKS], args.items),
                         ([("piqa", str(FIX / "piqa.jsonl")), ("arc_easy", str(FIX / "arc_easy.jsonl"))], None)):
        data = EvalConfig("python-docs", 128, 2048, 0, 4096, n_boot=2000, tasks=tuple(tasks), task_limit=limit)
        doc, _ = perturb_experiment(lm, PerturbConfig("superweights", "zero", ("random_k", "largest_k"), None,
                                                      (0,), data))
        ppl = {c["name"].split(" vs ")[0]: c["ppl_perturbed"] for c in doc["comparisons"] if c["against"] == "baseline"}
        sizes = {a["name"]: a["n_elements"] for a in doc["arms"]}
        for c in doc["downstream"]["comparisons"]:
            a = c["acc"]
            rows.append({"arm": c["arm"], "n_weights": sizes[c["arm"]], "task": c["task"], "items": a["n_items"],
                         "acc_before": a["acc_baseline"], "acc_after": a["acc_perturbed"], "delta_acc": a["delta_acc"],
                         "ci": [a["ci_low"], a["ci_high"]], "p_mcnemar_holm": a.get("p_mcnemar_holm"),
                         "ppl_before": doc["baseline"]["perplexity"], "ppl_after": ppl[c["arm"]]})
    print(f"{'arm':10} {'n':>3} {'task':42} {'items':>5} {'acc before→after':>17} {'Δacc [95% CI]':>24} "
          f"{'McNemar p (Holm)':>16} {'PPL before→after':>18}")
    for r in rows:
        print(f"{r['arm']:10} {r['n_weights']:>3} {r['task']:42} {r['items']:>5} "
              f"{r['acc_before']:.3f} → {r['acc_after']:.3f}   {r['delta_acc']:+.3f} [{r['ci'][0]:+.3f}, "
              f"{r['ci'][1]:+.3f}] {r['p_mcnemar_holm']:>16.3g} {r['ppl_before']:8.2f} → {r['ppl_after']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}, indent=1))
    print(f"{time.perf_counter() - start:.0f} s → {args.out}")


if __name__ == "__main__":
    main()
