"""The model checked against the data before the first image, and what the loader does to each image.

:func:`diagnose` (the command line runs it before ``explain``, ``counterfactual`` and ``audit``)
decides how an :class:`~counterlens.data.images.ImageFolder` is read for a classifier and refuses,
in one line that says what the model expects, what the data has and which flag fixes it, what
would otherwise end in a traceback or in explanations of inputs the model never saw:

* **channels**: the model's (``--channels`` or the card's ``in_channels``; else the input of an
  exported program, its first convolution, or what a probe forward pass says) against the files'
  (grey or RGB, from their headers);
* **size**: ``--size`` or the card's ``input_size``; else the exported program's input, or probe
  passes at the data's sizes: a model with a fixed input (Flatten + Linear) that fails at them is
  tried at other sizes to name the one it takes (from the Linear's in_features, then common sizes);
* **values**: the data's sampled range against the model's ``value_range``, with the
  ``--preprocess`` that maps one onto the other.

:func:`describe_loading` groups what the loader does to every file (slice of a volume, grey <-> RGB,
resize and aspect change, DICOM window) into the lines of the console summary, ``run.yaml``
(``data_info.loading``) and the report.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.headers import file_info, final_shape, read_steps, shape_text
from ..errors import CounterlensError, InputError
from .probe import channels_in, declared_input, find_size, first_conv, said, try_shape
from .records import text_of

__all__ = ["Diagnosis", "diagnose", "describe_loading", "flag_text", "MAX_HEADERS"]

MAX_HEADERS = 20_000          #: files whose headers are read for the summary (a sample of larger folders)
SHOWN_GROUPS = 8              #: loader groups listed one by one in the console and report; the rest are counted
KEPT_GROUPS = 100             #: loader groups recorded in run.yaml (the largest)
_FLAG = {"in_channels": "--channels", "input_size": "--size", "value_range": "--value-range",
         "preprocess": "--preprocess"}


@dataclass
class Diagnosis:
    """How the data is read for the model, and what the console says about it before the run."""

    channels: int | None                     #: read option: 1, 3 or None (as stored)
    size: tuple[int, ...] | None             #: read option: the spatial size images are resized to, or None
    lines: list[str] = field(default_factory=list)       #: the console summary, one line each
    warnings: list[str] = field(default_factory=list)    #: also in ``lines``, prefixed "warning: "
    loading: dict = field(default_factory=dict)          #: for ``run.yaml`` ``data_info.loading``


# -- what the loader does --------------------------------------------------------------------------
def describe_loading(dataset, *, channels="dataset", size="dataset", infos=None) -> dict:
    """What the loader does to each file of ``dataset`` with its read options (or ``channels`` /
    ``size`` given here), grouped: ``{"summary": "412 images: resized from ... | ...", "lines": [...], "groups":
    [{"images", "what", "examples"}], "files": n, "described": n}``."""
    read = dict(dataset.read_options)
    if channels != "dataset":
        read["channels"] = channels
    if size != "dataset":
        read["size"] = size
    records = dataset.records[:MAX_HEADERS]
    infos = infos if infos is not None else [file_info(r.path) for r in records]
    groups: dict[tuple, list] = {}
    for rec, info in zip(records, infos):
        if info is None:
            key = ("volume" if rec.path.is_dir() else "image", ("not described here (header not read)",))
        else:
            key = ("volume" if len(info.shape) == 3 else "image",
                   read_steps(info, channels=read["channels"], size=read["size"], slice_index=read["slice_index"],
                              window=read["window"]) or (f"read as stored ({shape_text(info.shape)}, "
                                                         f"{'grey' if info.channels == 1 else 'RGB'})",))
        groups.setdefault(key, []).append(text_of(_relative(rec.path, dataset.root)))
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    rows = [{"images": len(names), "what": f"{len(names)} {noun}{'s' if len(names) != 1 else ''}: {'; '.join(steps)}",
             "examples": names[:3]} for (noun, steps), names in ordered]
    shown = [r["what"] for r in rows[:SHOWN_GROUPS]]
    rest = rows[SHOWN_GROUPS:]
    if rest:
        shown.append(f"{sum(r['images'] for r in rest)} more files in {len(rest)} other groups (run.yaml lists "
                     f"{'them' if len(rows) <= KEPT_GROUPS else f'the largest {KEPT_GROUPS}'})")
    if len(dataset.records) > len(records):
        shown.append(f"(from the headers of the first {len(records):,} of {len(dataset.records):,} files)")
    return {"summary": " | ".join(shown), "lines": shown, "groups": rows[:KEPT_GROUPS], "files": len(dataset.records),
            "described": sum(i is not None for i in infos)}


def flag_text(key: str, value, bare: bool = False) -> str:
    """How a flag of the model's input reads on the command line: ``("input_size", [32, 32])`` ->
    ``"--size 32 32"``, a preprocessing list -> ``"--preprocess normalize:0.5,0.5"``."""
    if key == "preprocess":
        steps = []
        for step in value or []:
            (name, arg), = step.items() if isinstance(step, dict) and len(step) == 1 else (("?", step),)
            if name == "normalize" and isinstance(arg, dict):
                steps.append("normalize:" + ",".join("/".join(f"{float(v):g}" for v in arg.get(k, []))
                                                     for k in ("mean", "std")))
            else:
                steps.append(f"{name}:{arg}")
        text = " + ".join(steps) or "none"
    elif isinstance(value, (list, tuple)):
        text = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    else:
        text = str(value)
    return text if bare else f"{_FLAG.get(key, key)} {text}"


def _relative(path, root) -> str:
    try:
        return path.relative_to(root if root.is_dir() else root.parent).as_posix()
    except ValueError:
        return path.name


# -- the check ---------------------------------------------------------------------------------------
def _data_channels(infos) -> str:
    counts = Counter(i.channels for i in infos if i is not None)
    if len(counts) > 1:
        return f"mixed ({counts[1]} grey, {counts[3]} RGB files)"
    return "RGB (3 channels)" if 3 in counts else "grey (1 channel)"


def _channel_fix(expected: int) -> str:
    return {1: "--channels 1 (converts RGB to grey by luminance)",
            3: "--channels 3 (repeats the grey channel)"}.get(expected, f"--channels {expected}")


def _sizes_text(shapes: Counter) -> str:
    if len(shapes) == 1:
        return f"are {shape_text(next(iter(shapes)))}"
    top = ", ".join(f"{n} of {shape_text(s)}" for s, n in shapes.most_common(4))
    return f"have {len(shapes)} sizes ({top}{', ...' if len(shapes) > 4 else ''})"


def _who(clf, key: str) -> str:
    return _FLAG[key] if key in (getattr(clf, "overrides", None) or {}) else f"its model card's {key}"


def diagnose(clf, dataset, *, one_size: bool = False, sample: int = 4) -> Diagnosis:
    """Check ``clf`` against the files of ``dataset`` (an ImageFolder) and choose how they are read.

    The read channels and size come from the classifier's ``in_channels`` / ``input_size`` (a
    card or the flags), else from the model itself when the data already fits it; a mismatch
    raises :class:`InputError` naming the flag that fixes it. ``one_size``: the command stacks
    every image into one batch (``audit``), so images of several sizes need ``--size``. Returns
    the :class:`Diagnosis`; ``dataset`` is not changed (set ``channels`` / ``size`` from it).
    """
    root = dataset.root
    probe = functools.lru_cache(maxsize=None)(lambda c, shape: try_shape(clf, c, tuple(shape)))   # each shape tried once
    infos = [file_info(r.path) for r in dataset.records[:MAX_HEADERS]]
    known = [i for i in infos if i is not None]
    shapes = Counter(final_shape(i, slice_index=dataset.slice_index) for i in known)
    lines, notes = [], []
    for key, value in (getattr(clf, "overrides", None) or {}).items():
        card = (getattr(clf, "card", None) or {}).get(key)
        notes.append(flag_text(key, value) + (" describes the model" if card is None else " (as the model card's)"
                                              if card == value else f" overrides the model card's {key} "
                                                                    f"{flag_text(key, card, bare=True)}"))
    probe_shape = tuple(clf.input_size) if clf.input_size else (shapes.most_common(1)[0][0] if shapes else None)
    declared_channels, declared_size = declared_input(clf.module)
    first_channels, dims = first_conv(clf.module)
    volumes = [i.shape for i in known if len(i.shape) == 3]
    if not clf.input_size and (dims == 3 or len(declared_size or ()) == 3) and volumes and dataset.slice_index is not None:
        hint = declared_size or volumes[0]
        error = None if declared_size else probe(first_channels or 1, hint)
        hint = " ".join(map(str, (find_size(clf, first_channels or 1, hint, error) or hint) if error else hint))
        raise InputError(f"the model takes 3-D volumes (its first layer is 3-D); the data in {root} hold volumes "
                         f"({shape_text(volumes[0])}) that are read as 2-D slices without a 3-D size: add --size {hint} "
                         "(reads whole volumes, resized to it) or give a model card with input_size")

    # channels
    stated = clf.in_channels
    if stated is not None:
        if stated not in (1, 3):
            raise InputError(f"the model expects {stated}-channel images ({_who(clf, 'in_channels')}); counterlens reads "
                             "images as grey (1 channel) or RGB (3): wrap the model in counterlens.Classifier with a "
                             "preprocess that makes its channels")
        channels = stated
        error = probe(channels, probe_shape) if probe_shape else None
        wanted = channels_in(error or "")
        if wanted is not None and wanted != stated:
            raise InputError(f"the model expects {wanted}-channel images but {_who(clf, 'in_channels')} says {stated}: "
                             f"pass {_channel_fix(wanted)} or correct in_channels in the model card")
    else:
        found = declared_channels or first_channels
        stored = {i.channels for i in known}
        if len(stored) == 1 and probe_shape and found not in stored and probe(next(iter(stored)), probe_shape) is None:
            found = None                     # the model takes the files' channels as they are (it converts them itself)
        guess = (found or Counter(i.channels for i in known).most_common(1)[0][0]) if known else found
        error = probe(guess, probe_shape) if guess and probe_shape else None
        channels = channels_in(error or "") or guess
        how = "its input signature" if declared_channels and found else ("its first layer" if found else "a probe pass")
        if channels is not None and any(i.channels != channels for i in known):
            if channels not in (1, 3):
                raise InputError(f"the model expects {channels}-channel images (from {how}); counterlens reads images "
                                 "as grey (1 channel) or RGB (3): wrap the model in counterlens.Classifier with a "
                                 "preprocess that makes its channels")
            raise InputError(f"the model expects {'grey (1-channel)' if channels == 1 else f'{channels}-channel'} "
                             f"images; the data in {root} are {_data_channels(known)}: add {_channel_fix(channels)} "
                             "or give a model card with in_channels")
        if channels is not None:
            notes.append(f"{channels} channel{'s' if channels != 1 else ''}, from {how} (no card or --channels says)")

    # size
    size = tuple(clf.input_size) if clf.input_size else None
    if size is not None and shapes and all(len(s) != len(size) for s in shapes):
        kind = {2: "2-D images", 3: "3-D volumes"}
        raise InputError(f"the model takes {kind.get(len(size), f'{len(size)}-D inputs')} of {shape_text(size)} (the size "
                         f"from {_who(clf, 'input_size')}); the data in {root} are "
                         f"{kind.get(len(next(iter(shapes))), 'other')} that {_sizes_text(shapes)}: "
                         f"give --size with {len(next(iter(shapes)))} values for these files, or files of the model's kind")
    if size is not None and channels is not None:
        error = probe(channels, size)
        if error is not None and channels_in(error) is None:
            found = declared_size or find_size(clf, channels, size, error)
            fix = f"pass --size {' '.join(map(str, found))}" if found else "pass --size H W with the size it was trained on"
            raise InputError(f"the model does not take {shape_text(size)} images (the size from {_who(clf, 'input_size')}; "
                             f"it said: {said(RuntimeError(error))})"
                             + (f"; it expects {shape_text(found)}" if found else "") + f": {fix}")
    elif shapes and channels is not None:
        failing = {}
        if declared_size is not None:
            failing = {s: None for s in shapes if tuple(s) != declared_size}
        else:
            for s, _ in shapes.most_common(4):
                error = probe(channels, s)
                if error is not None:
                    failing[s] = error
        if failing:
            first, error = next(iter(failing.items()))
            found = declared_size or find_size(clf, channels, first, error)
            if found is None:
                raise InputError(f"the model cannot take the images in {root} at {shape_text(first)} (it said: "
                                 f"{said(RuntimeError(error))}) and no size it takes was found: add --size H W with "
                                 "the size it was trained on, or give a model card with input_size")
            raise InputError(f"the model expects {shape_text(found)} images; the images in {root} {_sizes_text(shapes)}: "
                             f"add --size {' '.join(map(str, found))} (resizes them) or give a model card with input_size")
        if len(shapes) > 1:
            common = shapes.most_common(1)[0][0]
            if one_size:
                raise InputError(f"the images in {root} {_sizes_text(shapes)} and this command takes them as one batch: "
                                 f"add --size {' '.join(map(str, common))} (resizes them to the most common size)")
            notes.append(f"the images {_sizes_text(shapes)}; each is explained at its own size (the model takes them): "
                         f"add --size {' '.join(map(str, common))} to resize them to one")

    images = _sample(dataset, channels, size, sample)
    if images:
        error = _try_image(clf, images[0])
        if error is not None:
            raise InputError(f"the model cannot run on the images in {root} (read as shape {tuple(images[0].shape)}; it "
                             f"said: {error}): describe its input with --channels N, --size H W or --preprocess, or give "
                             "a model card")
    raw_dicom = any(i.format.startswith("DICOM") and i.channels == 1 and not i.window for i in known)
    warnings = [w for w in [_value_range_advice(clf, images, root, any(i.bits == 16 for i in known), raw_dicom)] if w]
    if images and not clf.value_range:
        lo, hi = float(min(np.min(x) for x in images)), float(max(np.max(x) for x in images))
        notes.append(f"values {lo:.4g}..{hi:.4g} in the {len(images)} images sampled; the range the model takes is not "
                     "stated (no card): --value-range LOW HIGH states it, --preprocess maps the data onto it")
    loading = describe_loading(dataset, channels=channels, size=size, infos=infos)
    if notes:
        loading["model_input"] = notes
    lines += [f"model input: {n}" for n in notes]
    lines.append(f"loading {loading['files']} file(s) of {root}:")
    lines += [f"  {line}" for line in loading["lines"]]
    lines += [f"warning: {w}" for w in warnings]
    if warnings:
        loading["warnings"] = warnings
    return Diagnosis(channels=channels, size=size, lines=lines, warnings=warnings, loading=loading)


def _sample(dataset, channels, size, n: int) -> list[np.ndarray]:
    """Up to ``n`` images read as the run will read them (files that fail are the run's to record)."""
    from ..data.images import load_case
    read = {**dataset.read_options, "channels": channels, "size": size}
    out = []
    for rec in dataset.records:
        if len(out) >= n:
            break
        try:
            out.append(load_case(rec.path, None, **read)[0])
        except CounterlensError:
            continue
    return out


def _try_image(clf, image: np.ndarray) -> str | None:
    try:
        with torch.no_grad():
            clf.logits(torch.from_numpy(image[None]))
    except CounterlensError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, said in one line
        return said(exc)
    return None


def _value_range_advice(clf, images, root, sixteen_bit: bool = False, raw_dicom: bool = False) -> str | None:
    """When the sampled values lie outside the model's value_range, or 16-bit files fill only a small
    part of it (10- or 12-bit data): what maps one onto the other. ``raw_dicom``: some files are DICOM
    without a window of their own (the loader windows only those that carry one; --window sets one)."""
    if not clf.value_range or not images:
        return None
    a, b = clf.value_range
    lo, hi = float(min(np.min(x) for x in images)), float(max(np.max(x) for x in images))
    slack = 0.1 * (b - a)
    std = (hi - lo) / (b - a) if hi > lo else 1.0
    if sixteen_bit and lo >= a - slack and hi - lo < (b - a) / 8:
        return (f"the 16-bit images in {root} use only {lo:.4g}..{hi:.4g} of the range the model takes ({a:g}..{b:g}, "
                f"{_who(clf, 'value_range')}) in the {len(images)} sampled: 10- or 12-bit data stored in 16 bits looks "
                f"almost black to it. If it was trained on stretched images, add --preprocess "
                f"{_normalize_flag(clf, lo - a * std, std)} (maps {lo:.4g}..{hi:.4g} onto {a:g}..{b:g} inside the model)")
    if lo >= a - slack and hi <= b + slack:
        return None
    hu = " (Hounsfield units?)" if lo < -500 else ""
    return (f"the images in {root} have values {lo:.4g}..{hi:.4g}{hu} in the {len(images)} sampled, outside the range "
            f"the model takes ({a:g}..{b:g}, {_who(clf, 'value_range')}): the explanations would be of inputs it never "
            f"saw. Add --preprocess {_normalize_flag(clf, lo - a * std, std)} --value-range {lo:.4g} {hi:.4g} (maps the "
            f"data onto {a:g}..{b:g} inside the model), "
            + ("or window it with --window CENTER,WIDTH (e.g. --window 40,400 maps -160..240 onto 0..1; these DICOM "
               "files carry no window of their own)" if raw_dicom else
               "or window it with --window CENTER,WIDTH (e.g. --window 40,400 maps -160..240 onto 0..1)")
            + ", or pass --value-range alone if the card's range is wrong")


def _normalize_flag(clf, mean: float, std: float) -> str:
    """``normalize:MEAN,STD`` that maps the data onto the model's range and then does what the
    model's own normalisation did (composed into one step, per channel where it has several)."""
    spec = (getattr(clf, "overrides", None) or {}).get("preprocess", (getattr(clf, "card", None) or {}).get("preprocess"))
    steps = [s for s in (spec or []) if isinstance(s, dict) and "repeat_channels" not in s]
    if len(steps) == 1 and isinstance(steps[0].get("normalize"), dict):
        m0, s0 = steps[0]["normalize"].get("mean", [0.0]), steps[0]["normalize"].get("std", [1.0])
        means = [mean + float(m) * std for m in m0]
        stds = [std * float(s) for s in s0]
    else:
        means, stds = [mean], [std]
    return "normalize:" + "/".join(f"{v:.4g}" for v in means) + "," + "/".join(f"{v:.4g}" for v in stds)
