"""What the commands share: argparse types, ``--param`` parsing, loading the model, reading targets."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..errors import CounterlensError


def comma_list(text: str) -> list[str]:
    """argparse type: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_params(items: list[str] | None) -> dict[str, dict]:
    """``["integrated_gradients.steps=64"]`` -> ``{"integrated_gradients": {"steps": 64}}`` (values as YAML)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise CounterlensError(f"--param {item!r}: write METHOD.NAME=VALUE, e.g. integrated_gradients.steps=64")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise CounterlensError(f"--param {item!r}: the value {value!r} cannot be read ({str(exc).splitlines()[0]}); "
                                   "write a number, true/false, a word, or a list like [8, 8]") from None
        out.setdefault(method.strip().replace("-", "_"), {})[name.strip()] = parsed
    return out


def share(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def batch_size_arg(text: str):
    """argparse type: ``"auto"`` or a positive integer."""
    return text if text == "auto" else positive_int(text)


def target_arg(text: str):
    """``"3"`` -> ``3`` (a class index); anything else (a class name, ``predicted``, ``other``) as given."""
    return int(text) if text.lstrip("-").isdigit() else text


def has_class_folders(root: Path) -> bool:
    """Whether ``root`` is a folder with subfolders (the class-subfolder layout that gives labels)."""
    root = Path(root)
    return root.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir())


def load_classifier(args):
    """The model of ``--model`` (with ``--factory``, ``--trust-model-file``, ``--device``, ``--classes``)."""
    from ..loading import load_model
    clf = load_model(args.model, factory=args.factory, trust_model_file=args.trust_model_file,
                     device=args.device, classes=args.classes, output=getattr(args, "output_head", None))
    which = getattr(args, "logits_output", None)
    if which is not None:
        clf.logits_output = int(which) if str(which).lstrip("-").isdigit() else which
    return clf


def print_summary(verb: str, summary, out) -> None:
    """The console lines after a dataset run: counts, time, workers, and the failed files with their reasons."""
    print(f"{verb} {summary.done} images ({summary.skipped} already done, {summary.failed} failed) in "
          f"{summary.seconds:.1f} s with {summary.workers} worker(s) x {summary.threads} thread(s); "
          f"run directory: {out}")
    for case, reason in summary.failures[:10]:
        print(f"  failed: {case}: {reason}")
    if summary.failed > 10:
        print(f"  ... and {summary.failed - 10} more failed files (column error of counterlens.open_run(RUN).cases)")
