"""``esa report``: a Markdown report with plots, computed only from stored results."""

from __future__ import annotations

from pathlib import Path

from esa.report.baseline_report import write_baseline_report


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write baseline_report.md (+ PNG) from run directories")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or parents holding several)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="report directory")
    p.set_defaults(func=run)


def run(args) -> int:
    path = write_baseline_report(args.runs, args.out)
    print(f"report: {path}")
    return 0
