"""The ``counterlens`` command: parses arguments, calls the library, writes files.

:mod:`.parser` defines every subcommand; each subcommand's handler is its own module here
(:mod:`.explain`, :mod:`.counterfactual`, :mod:`.evaluate`, ...), imported only when that command
runs. Every subcommand has ``--help``. Errors the user can fix are printed as one line
(``counterlens: error: ...``) with exit status 2; nothing here computes anything itself.
Nothing outside this package imports it.
"""
from __future__ import annotations

import sys
from importlib import import_module

from ..errors import CounterlensError
from .common import parse_params
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main", "parse_params"]

# subcommand -> (module of this package, handler function)
COMMANDS = {"data": ("data", "data_synth"), "train": ("train", "train"), "explain": ("explain", "explain"),
            "counterfactual": ("counterfactual", "counterfactual"), "fit-prior": ("fit_prior", "fit_prior_command"),
            "evaluate": ("evaluate", "evaluate_cmd"), "audit": ("audit", "audit_cmd"), "methods": ("methods", "methods"),
            "report": ("report", "report"), "demo": ("demo", "demo")}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, name = COMMANDS[args.command]
    handler = getattr(import_module(f"{__name__}.{module}"), name)
    try:
        return handler(args) or 0
    except CounterlensError as exc:
        print(f"counterlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("counterlens: interrupted; results written so far are kept (re-run to resume)", file=sys.stderr)
        return 130
