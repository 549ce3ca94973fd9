"""The ``counterlens`` command: parses arguments, calls the library, writes files.

:mod:`.parser` defines every subcommand; each subcommand's handler is its own module here
(:mod:`.explain`, :mod:`.counterfactual`, :mod:`.evaluate`, ...), imported only when that command
runs. Every subcommand has ``--help``. Every error a user can meet is one line on stderr
(``counterlens: error: ...``), never a traceback (``--debug`` shows it): exit status 2 for what
the user asked (arguments, files, models), 1 for a run that failed on the way (a worker died, the
disk is full or read-only), 130 when interrupted. Nothing here computes anything itself, and
nothing outside this package imports it.
"""
from __future__ import annotations

import sys
from importlib import import_module

import sqlite3

from ..errors import CounterlensError, RunFailedError
from .common import parse_params
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main", "parse_params"]

# subcommand -> (module of this package, handler function)
COMMANDS = {"data": ("data", "data_synth"), "train": ("train", "train"), "explain": ("explain", "explain"),
            "counterfactual": ("counterfactual", "counterfactual"), "fit-prior": ("fit_prior", "fit_prior_command"),
            "evaluate": ("evaluate", "evaluate_cmd"), "audit": ("audit", "audit_cmd"), "methods": ("methods", "methods"),
            "report": ("report", "report"), "demo": ("demo", "demo"),
            "run": ("run_spec", "run_spec")}


def say_error(text: str) -> None:
    """One line on stderr that any terminal can print (a file name that is not UTF-8 included)."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    line = f"counterlens: error: {text}".encode(encoding, "backslashreplace").decode(encoding, "replace")
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, name = COMMANDS[args.command]
    try:
        handler = getattr(import_module(f"{__name__}.{module}"), name)
        return handler(args) or 0
    except KeyboardInterrupt:
        print("counterlens: interrupted; results written so far are kept (re-run to resume)", file=sys.stderr)
        return 130
    except Exception as exc:                     # noqa: BLE001 - every error ends as one line (or --debug)
        if getattr(args, "debug", False):
            raise
        say_error(describe(exc))
        return 1 if isinstance(exc, (RunFailedError, OSError, sqlite3.Error, MemoryError)) else 2


def describe(exc: BaseException) -> str:
    """The one line for an error: ours as written; the system's with what to do about it."""
    if isinstance(exc, CounterlensError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        hint = {28: "free some space (results written so far are kept; re-run to resume)",
                30: "the folder is read-only; pass a writable --out",
                13: "permission denied; pass a folder you can write to"}.get(exc.errno or 0, "check the path")
        return f"{where}{exc.strerror or exc}; {hint}"
    if isinstance(exc, sqlite3.Error):
        return (f"the run's index cannot be written or read ({exc}); check the disk and the run directory, "
                "then re-run to resume")
    if isinstance(exc, MemoryError):
        return "out of memory; pass a smaller --batch-size or --images-per-batch, or fewer --workers"
    return (f"unexpected {type(exc).__name__}: {exc} (a bug in counterlens or in the model; re-run with --debug "
            "for the traceback and report it)")
