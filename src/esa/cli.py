"""The ``esa`` command line: parse arguments, call one library function, print the outcome.

Each subcommand lives in ``esa/commands/<name>.py`` and exposes ``register(subparsers)``; modules there are
discovered automatically. Printing happens only in command modules; an :class:`EsaError` becomes one line on
stderr and exit status 2.

One vocabulary for every command, applied here once (:func:`unify`): every list flag takes its items comma- or
space-separated (``--tasks piqa,arc_easy`` = ``--tasks piqa arc_easy``; ``--task-data`` excepted, whose paths may
hold commas), and the global flags (``-v``, ``--no-progress``) are accepted after the subcommand too.
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
    for sub in subparsers.choices.values():
        unify(sub)
    return parser


NOT_SPLIT = {"--task-data"}  # TASK=PATH entries: a path may contain a comma


class _CommaList(argparse.Action):
    """A list flag whose items may also be comma-separated; each item converted by the flag's own type."""

    def __init__(self, *args, item_type=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.item_type = item_type

    def __call__(self, parser, namespace, values, option_string=None):
        items = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
        try:
            converted = [self.item_type(x) for x in items] if self.item_type else items
        except ValueError:
            raise EsaError(f"{option_string} takes {getattr(self.item_type, '__name__', 'value')} items, "
                           f"got {' '.join(map(str, values))!r}") from None
        setattr(namespace, self.dest, converted)


def unify(sub: argparse.ArgumentParser) -> None:
    """Comma-or-space lists on every list flag of ``sub``, and the global flags after the subcommand."""
    for action in list(sub._actions):
        if action.nargs in ("+", "*") and action.option_strings and not NOT_SPLIT & set(action.option_strings):
            i = sub._actions.index(action)
            new = _CommaList(action.option_strings, action.dest, nargs=action.nargs, default=action.default,
                             item_type=action.type, required=action.required, help=action.help,
                             metavar=action.metavar)
            sub._actions[i] = new
            for flag in action.option_strings:
                sub._option_string_actions[flag] = new
            for group in sub._action_groups:
                group._group_actions[:] = [new if a is action else a for a in group._group_actions]
    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    sub.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="hide progress bars")


def quiet_libraries(verbose: bool, no_progress: bool) -> None:
    """Transformers' warnings and its own bars off unless ``-v``; hub download bars stay visible (issue #14)
    unless ``--no-progress`` or the user's ``HF_HUB_DISABLE_PROGRESS_BARS`` (which huggingface_hub honours)."""
    from huggingface_hub import constants
    from huggingface_hub import utils as hub_utils

    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # turns huggingface_hub's bars off too: they are turned back on below
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not None:  # the environment variable has priority
        return
    if no_progress:
        hub_utils.disable_progress_bars()
    else:
        hub_utils.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except EsaError as exc:  # a list item of the wrong type (_CommaList)
        print(f"esa: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    quiet_libraries(args.verbose, args.no_progress)
    progress.enable(not args.no_progress and sys.stderr.isatty())
    progress.set_command(list(sys.argv[1:] if argv is None else argv))
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
