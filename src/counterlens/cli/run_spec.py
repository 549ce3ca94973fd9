"""``counterlens run SPEC.yaml``: a run described in one file (:mod:`counterlens.runs.spec_file`).

The spec's keys are the options of ``explain``, ``counterfactual``, ``audit``, ``evaluate`` and
``report``, read here from this command line's own parser (so a new flag is a new key); each
section becomes that command's argument list and runs through the command itself, exactly as if
typed. A run directory's ``run.yaml`` is a spec: ``counterlens run RUN/run.yaml --out NEW`` makes
the same run again.
"""
from __future__ import annotations

import argparse
from importlib import import_module
from pathlib import Path

# command -> (module of this package, handler), as in counterlens.cli.COMMANDS (not imported: no cycle)
HANDLERS = {"explain": ("explain", "explain"), "counterfactual": ("counterfactual", "counterfactual"),
            "audit": ("audit", "audit_cmd"), "evaluate": ("evaluate", "evaluate_cmd"), "report": ("report", "report")}


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``subparsers`` (imports no library code)."""
    p = subparsers.add_parser(
        "run", help="run what a YAML spec file describes (explain, counterfactual, audit, evaluate, report)",
        description="Run the commands a YAML spec describes, in the order explain, counterfactual, audit, evaluate, "
                    "report (each one whose section is in the file). Every key of a section is that command's "
                    "option (--batch-size: batch_size); model: and data: hold the options the commands share "
                    "(model.path is --model, data.path is --data). A run directory's run.yaml is a spec: "
                    "`counterlens run RUN/run.yaml --out NEW` makes the same run again. Relative paths are "
                    "relative to the current directory. Example: examples/brain_tumour_notebook.yaml.")
    p.add_argument("spec", type=Path, help="the YAML spec file, or a run directory (its run.yaml)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: the spec's out)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the spec and print the commands it stands for, without running them")
    p.set_defaults(subcommands=subparsers.choices)      # the commands' own parsers: the spec's schema
    return p


def command_options(parsers) -> dict:
    """``{command: [Option, ...]}`` for the commands a spec can run, from their parsers' actions.
    ``parsers``: ``{command: ArgumentParser}`` (a subparsers action's choices) or the main parser."""
    from ..runs.spec_file import COMMANDS, Option
    if isinstance(parsers, argparse.ArgumentParser):
        parsers = next(a for a in parsers._actions if isinstance(a, argparse._SubParsersAction)).choices
    out = {}
    for command in COMMANDS:
        rows = []
        for action in parsers[command]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            kind = ("switch" if isinstance(action, argparse._StoreTrueAction)
                    else "toggle" if isinstance(action, argparse.BooleanOptionalAction)
                    else "append" if isinstance(action, argparse._AppendAction) else "value")
            flag = next((s for s in action.option_strings if s.startswith("--")), "")
            rows.append(Option(action.dest, flag, kind, action.nargs,
                               tuple(action.choices) if action.choices is not None else None, action.type,
                               bool(action.required) and bool(flag)))
        out[command] = rows
    return out


def run_spec(args) -> int:
    """Check the whole spec, then run its commands in order; stop at the first that fails."""
    from ..runs.spec_file import plan, read_spec_file, record_spec
    parsers = args.subcommands
    spec = read_spec_file(args.spec)
    steps = plan(spec, command_options(parsers), out=args.out)      # every key checked before anything runs
    for step in steps:
        print(step.line(), flush=True)
    if args.dry_run:
        return 0
    for step in steps:
        parsed = parsers[step.command].parse_args(step.argv)
        parsed.command, parsed.debug = step.command, getattr(args, "debug", False)
        module, name = HANDLERS[step.command]
        code = getattr(import_module(f"{__package__}.{module}"), name)(parsed) or 0
        if code:
            return code
        record_spec(args.out if args.out is not None else spec["out"], spec)   # RUN/run.yaml: run_spec
    return 0
