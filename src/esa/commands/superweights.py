"""``esa superweights``: find super-weight candidates and massive activations (Yu et al. 2024; Sun et al. 2024)."""

from __future__ import annotations

from pathlib import Path

from esa.models import ModelSpec
from esa.sensitivity.superweights import Thresholds


def register(subparsers) -> None:
    d = Thresholds()
    p = subparsers.add_parser(
        "superweights", help="locate super weights in the MLP output projections (one forward pass)",
        description="Hooks every layer's MLP output projection (Llama down_proj, GPT-NeoX dense_4h_to_h, GPT-2 "
                    "c_proj; Gemma-2/3: the post-feed-forward norm's output) on a few windows, flags output channels "
                    "that spike far above their layer's median channel maximum and names the single weight "
                    "(row = out, col = in) that writes the spike. Writes "
                    "superweights.json and superweights.png.")
    p.add_argument("--model", default="smollm2-135m", help="suite alias, hub id, local dir or .gguf file")
    p.add_argument("--dataset", default="python-docs", help="corpus name or .txt/.jsonl path")
    p.add_argument("--context-len", type=int, default=128, help="tokens per window (chunks method)")
    p.add_argument("--max-samples", type=int, default=4, help="windows in the forward pass")
    p.add_argument("--seed", type=int, default=0, help="picks which windows")
    p.add_argument("--iterate", type=int, default=0, metavar="N",
                   help="after the first search, zero what was found and search again up to N more times "
                        "(weights are restored afterwards)")
    p.add_argument("--spike-ratio", type=float, default=d.spike_ratio,
                   help="spike = a channel's max |activation| > this × its layer's median channel max")
    p.add_argument("--spike-floor", type=float, default=d.spike_floor, help="… and > this absolute value")
    p.add_argument("--min-share", type=float, default=d.min_share,
                   help="the weight's product must carry at least this fraction of the spiking output")
    p.add_argument("--require-input-spike", action="store_true",
                   help="paper-strict: the weight's input channel must spike as well")
    p.add_argument("--massive-ratio", type=float, default=d.massive_ratio,
                   help="residual |h| is massive when > this × its layer's median |h|")
    p.add_argument("--massive-floor", type=float, default=d.massive_floor, help="… and > this absolute value")
    p.add_argument("--dtype", default="fp32", help="weights dtype: fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/superweights"), help="output directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out-dir")
    p.set_defaults(func=run)


def _config(args):
    from esa.errors import EsaError
    from esa.sensitivity.superweight_run import SuperWeightRun

    if args.iterate < 0:
        raise EsaError(f"--iterate {args.iterate} must be ≥ 0 (extra search rounds)")
    thr = Thresholds(args.spike_ratio, args.spike_floor, args.min_share, args.require_input_spike,
                     args.massive_ratio, args.massive_floor)
    return SuperWeightRun(args.dataset, args.context_len, args.max_samples, args.seed, 1 + args.iterate, thr)


def _print(report, json_path, png_path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"super-weight candidates ({len(report.candidates)}): W(row = out, col = in)",
                  caption="|x|, |y|: input and output activation at the spike token t; y/typ: |y| over the "
                          "layer's median channel max; share: fraction of y that vanishes without W·x")
    for col in ("round", "layer", "row", "col", "weight", "|x|", "|y|", "y/typ", "share", "x spike", "t"):
        table.add_column(col, justify="right")
    for w in report.candidates:
        table.add_row(str(w.iteration), str(w.layer), str(w.row), str(w.col), f"{w.weight:.4g}",
                      f"{w.input_activation:.4g}", f"{w.output_activation:.4g}", f"{w.output_ratio:.0f}×",
                      f"{w.share:.2f}", "yes" if w.input_spike else "no", str(w.position))
    console = Console()
    console.print(table)
    layers = sorted({m.layer for m in report.massive_activations})
    channels = sorted({m.channel for m in report.massive_activations})
    console.print(f"massive residual activations: {len(report.massive_activations)} (layer, channel) pairs"
                  + (f" in layers {layers[0]}–{layers[-1]}, channels {channels}" if layers else ""))
    console.print(f"results: {json_path}\nplot: {png_path}")


def run(args) -> int:
    from esa.sensitivity.superweight_run import run_superweights

    spec = ModelSpec(args.model, args.dtype, args.device, args.revision)
    report, _, json_path, png_path = run_superweights(spec, _config(args), args.out_dir, args.overwrite)
    _print(report, json_path, png_path)
    return 0
