"""What the commands share: argparse types, ``--param`` parsing, loading the model, reading targets."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from ..errors import CounterlensError, InputError


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


def auto_or_positive_int(text: str):
    """argparse type: ``"auto"`` or a positive integer (``--batch-size``, ``train --epochs``)."""
    return text if text == "auto" else positive_int(text)


batch_size_arg = auto_or_positive_int


def learning_rate_arg(text: str):
    """argparse type: ``"auto"`` or a positive number (``train --lr``)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a number such as 1e-3, or auto") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a positive number, or auto")
    return value


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
    overrides = model_overrides(args)
    clf = load_model(args.model, factory=args.factory, trust_model_file=args.trust_model_file,
                     device=args.device, classes=args.classes, output=getattr(args, "output_head", None), **overrides)
    clf.overrides = overrides              # recorded in run.yaml (model.overrides) and said before the run
    which = getattr(args, "logits_output", None)
    if which is not None:
        clf.logits_output = int(which) if str(which).lstrip("-").isdigit() else which
    if getattr(args, "precision", None) is not None:
        from ..model import check_precision
        clf.precision = check_precision(args.precision)
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


# -- describing a model on the command line: --size, --channels, --value-range, --preprocess ---------------
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PREPROCESS_SYNTAX = ("normalize:MEAN,STD (per channel: normalize:M1/M2/M3,S1/S2/S3), imagenet, none, or the JSON list "
                     "of a model card, e.g. '[{\"normalize\": {\"mean\": [0.5], \"std\": [0.5]}}]'")


def window_arg(text: str):
    """``--window``: "auto", "none" or "C,W" -> [center, width] (argparse type)."""
    from ..data.window import window_of
    try:
        w = window_of(text.strip())
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("window=", "--window ")) from None
    return list(w) if isinstance(w, tuple) else w


def preprocess_arg(text: str) -> list[dict]:
    """argparse type of ``--preprocess``: the JSON form of :func:`counterlens.model.preprocess_from_spec`.

    ``normalize:MEAN,STD`` (``(x - MEAN) / STD``; per channel ``normalize:0.485/0.456/0.406,0.229/0.224/0.225``),
    ``imagenet`` (that per-channel normalisation), ``none`` (no preprocessing, not even the card's), or a JSON list as
    in ``model.json``.
    """
    import json
    text = text.strip()
    if text.lower() == "none":
        return []
    if text.lower() == "imagenet":
        return [{"normalize": dict(_IMAGENET)}]
    if text.startswith("["):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc}); write {PREPROCESS_SYNTAX}") from None
        from ..model import preprocess_from_spec
        try:
            preprocess_from_spec(spec)
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        return spec
    name, colon, rest = text.partition(":")
    parts = rest.split(",")
    if name.lower() != "normalize" or not colon or len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: write {PREPROCESS_SYNTAX}")
    try:
        mean, std = ([float(v) for v in p.split("/")] for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: MEAN and STD must be numbers (several separated by /)") from None
    if len(mean) != len(std) or not all(v > 0 and v < float("inf") for v in std) \
            or not all(abs(v) < float("inf") for v in mean):
        raise argparse.ArgumentTypeError(f"{text!r}: give as many MEANs as STDs, finite, each STD above 0")
    return [{"normalize": {"mean": mean, "std": std}}]


def model_overrides(args) -> dict:
    """The model description given by ``--channels``, ``--size``, ``--value-range``, ``--preprocess``
    (only those given), as :func:`counterlens.loading.load_model` takes it; each replaces the card's."""
    out = {}
    channels = getattr(args, "channels", None)
    if channels is not None:
        out["in_channels"] = int(channels)
    size = getattr(args, "size", None)
    if size is not None:
        if len(size) not in (2, 3):
            raise InputError(f"--size {' '.join(map(str, size))}: give the model's input size as H W (images) or "
                             "D H W (volumes)")
        out["input_size"] = [int(v) for v in size]
    value_range = getattr(args, "value_range", None)
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise InputError(f"--value-range {low:g} {high:g}: LOW must be below HIGH (the data values the model takes)")
        out["value_range"] = [low, high]
    preprocess = getattr(args, "preprocess", None)
    if preprocess is not None:
        out["preprocess"] = preprocess
    return out


def image_dataset(clf, data, *, masks=None, limit=None, one_size: bool = False, window="auto"):
    """The ImageFolder of ``data`` read as the model needs it, checked against the model before the
    first image (:func:`counterlens.runs.diagnose.diagnose`); prints what the model expects and what
    the loader does to the images. Returns ``(dataset, diagnosis)``."""
    from ..data.images import ImageFolder
    from ..data.label_table import has_label_table
    from ..runs.diagnose import diagnose
    labelled = has_class_folders(data) or has_label_table(data)       # class folders, or labels.csv (multi-label)
    dataset = ImageFolder(data, size=clf.input_size, classes=clf.classes if labelled else None,
                          masks=masks, limit=limit, window=window)
    found = diagnose(clf, dataset, one_size=one_size)
    dataset.channels = found.channels
    for line in found.lines:
        print(line)
    return dataset, found


def reusable_card(model_dir: Path, arch: str, epochs: int) -> dict | None:
    """The model card in ``model_dir`` when a demo can reuse its model (the architecture and epochs it
    would train); None when it must train one."""
    path = model_dir / "model.json"
    card = json.loads(path.read_text()) if path.exists() else None
    if card is None or card.get("training", {}).get("epochs") != epochs or card.get("architecture") != arch:
        return None
    return card


def display_arg(check: str, number: bool):
    """An argparse type that checks a report display option with :mod:`counterlens.viz.plots`'s own
    check (imported when the option is given, so building the parser still imports no library code).
    ``auto`` passes as it is (the colour map's default)."""
    def convert(text: str):
        from ..viz import plots
        value = text
        if not number and text == "auto":
            return text
        if number:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            return getattr(plots, check)(value, None)
        except ValueError as exc:                 # InputError: one line that says what to pass
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = check.replace("check_", "") + "_arg"
    return convert
