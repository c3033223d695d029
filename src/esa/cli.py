"""The ``esa`` command line: parse arguments, call one library function, print the outcome.

Each subcommand lives in ``esa/commands/<name>.py`` and exposes ``register(subparsers)``; modules there are
discovered automatically. Printing happens only in command modules; an :class:`EsaError` becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

import esa.commands
from esa import __version__
from esa.core import progress
from esa.core.errors import EsaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esa", description="Extreme Sensitivity Analysis of causal LMs.")
    parser.add_argument("--version", action="version", version=f"esa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(esa.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"esa.commands.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    progress.enable(not args.no_progress and sys.stderr.isatty())
    try:
        return int(args.func(args) or 0)
    except EsaError as exc:
        print(f"esa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
