"""Seeded synthetic medical-looking images with ground-truth masks.

Two kinds, both grey 2D images in data space (float32 in [0, 1], 0 black, 1 white):

``brain-mri``
    Axial T1/T2-like head slices (scalp, skull, CSF, folded cortex, white matter, butterfly
    ventricles, Rician noise). Classes ``glioma`` (lobulated intra-axial mass with necrotic
    core and oedema), ``meningioma`` (round bright mass on the inner skull), ``notumor`` and
    ``pituitary`` (small round midline mass below the ventricles). Masks: ``tumor`` (empty for
    ``notumor``), ``head`` and ``brain``.
``chest-xray``
    PA chest radiograph-like images (lungs, heart, mediastinum, spine, trachea, clavicles,
    ribs, diaphragm, vignetting, film noise). Classes ``normal`` and ``pneumonia`` (patchy
    consolidation inside one or both lungs). Masks: ``opacity`` (empty for ``normal``),
    ``lungs`` and ``marker`` (a bright lead-letter tag in a corner, the planted shortcut).

Output is bitwise identical for identical arguments. Images are drawn in chunks (their
length depends on the image size only), each with its own RNG derived from (seed, kind,
split, chunk index), and rendered on up to two threads (numpy releases the GIL).
"""
from __future__ import annotations

import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import _anatomy, chest_findings

KINDS = ("brain-mri", "chest-xray")
MULTILABEL_KIND = chest_findings.KIND     # several findings per film: see counterlens.data.chest_findings
CLASSES = {"brain-mri": list(_anatomy.BRAIN_CLASSES), "chest-xray": list(_anatomy.CHEST_CLASSES)}
MASKS = {"brain-mri": ("tumor", "head", "brain"), "chest-xray": ("opacity", "lungs", "marker")}
PIXELS_PER_CHUNK = 8 * 128 * 128    # images are drawn in chunks of about this many pixels
SPLIT_DIRS = {"train": "Training", "test": "Testing"}


@dataclass
class SyntheticSet:
    """N synthetic images of one kind and split.

    images: float32 [N, 1, H, W] in [0, 1]; labels: int64 [N] indexing ``classes``;
    masks: name -> bool [N, H, W]; names: N unique file stems like ``test_glioma_00012``.
    """

    kind: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    masks: dict[str, np.ndarray]
    names: list[str]
    split: str
    seed: int | None = None
    shortcut_rate: float | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> SyntheticSet:
        """A new set holding the items ``idx`` (int, slice, integer array or bool array [N])."""
        idx = np.arange(len(self))[idx].reshape(-1)
        return SyntheticSet(self.kind, self.images[idx], self.labels[idx], list(self.classes),
                            {k: m[idx] for k, m in self.masks.items()},
                            [self.names[i] for i in idx], self.split, self.seed, self.shortcut_rate)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_args(kind, n, size, seed, split, shortcut_rate):
    if kind not in KINDS:
        raise InputError(f"kind={kind!r} is not known; valid kinds: {', '.join(map(repr, KINDS))}")
    n, size, seed = _check_int("n", n, 1), _check_int("size", size, 32), _check_int("seed", seed, 0)
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9-]+", split):
        raise InputError(f"split={split!r} must be 'train' or 'test' (or another name of letters, "
                         "digits and '-')")
    if shortcut_rate is not None:
        if kind != "chest-xray":
            raise InputError(f"shortcut_rate is only available for kind='chest-xray'; "
                             f"use shortcut_rate=None for kind={kind!r}")
        if isinstance(shortcut_rate, bool) or not isinstance(shortcut_rate, (int, float, np.floating)) \
                or not 0.0 <= float(shortcut_rate) <= 1.0:
            raise InputError(f"shortcut_rate must be None or a number in [0, 1], got {shortcut_rate!r}")
    return n, size, seed


def _class_counts(n, n_classes, class_balance, classes):
    """Images per class: equal (round robin) or proportional to ``class_balance`` weights."""
    if class_balance is None:
        return np.bincount(np.arange(n) % n_classes, minlength=n_classes)
    if isinstance(class_balance, dict):
        unknown = set(class_balance) - set(classes)
        if unknown:
            raise InputError(f"class_balance names unknown classes {sorted(unknown)}; valid: {classes}")
        class_balance = [class_balance.get(c, 0.0) for c in classes]
    w = np.asarray(class_balance, dtype=float).reshape(-1)
    if len(w) != n_classes or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"class_balance must be None, {n_classes} non-negative weights (one per class "
                         f"of {classes}) or a dict class -> weight, got {class_balance!r}")
    exact = w / w.sum() * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def _marker_flags(rng, labels, split, shortcut_rate):
    """Which images get the corner marker: bool [N].

    train: exactly round(rate * n_c) images of each class c agree with the label
    (marker <=> pneumonia); other splits: exactly half of each class, so marker and label are
    independent.
    """
    flags = np.zeros(len(labels), bool)
    if shortcut_rate is None:
        return flags
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round((float(shortcut_rate) if split == "train" else 0.5) * len(idx))
        agree, disagree = idx[:k], idx[k:]
        if split == "train":
            flags[agree if c == 1 else disagree] = True
        else:
            flags[agree] = True
    return flags


def render_chunks(render, n: int, size: int, seed: int, key: tuple, mask_names) -> tuple[np.ndarray, dict]:
    """Draw ``n`` images in chunks, each with its own RNG from ``(seed, *key, 1 + chunk index)``, on up
    to two threads: ``render(start, stop, rng) -> (images [b, H, W], {mask: [b, H, W]})``.
    Returns ``(images [n, 1, size, size] float32, {mask: bool [n, size, size]})``."""
    # glibc gives freed heap pages back to the OS eagerly until a large block has been freed,
    # and faulting them in again for every chunk costs more than the maths. Freeing one 30 MiB
    # block raises its dynamic mmap/trim thresholds (as any program freeing such a buffer
    # does), and a chunk's temporaries (~40 MB at most) then stay in the heap.
    _warm = np.empty(30 << 20, np.uint8)
    del _warm
    chunk = max(1, PIXELS_PER_CHUNK // (size * size))
    images = np.empty((n, 1, size, size), np.float32)
    masks = {name: np.empty((n, size, size), bool) for name in mask_names}

    def one(start):
        stop = min(start + chunk, n)
        crng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, 1 + start // chunk)))
        img, m = render(start, stop, crng)
        images[start:stop, 0] = img
        for name, out in masks.items():
            out[start:stop] = m[name]

    starts = range(0, n, chunk)
    workers = min(2, os.cpu_count() or 1, len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, starts))
    else:
        for s in starts:
            one(s)
    return images, masks


def generate(kind: str, n: int, *, size: int = 128, seed: int = 0, split: str = "train",
             shortcut_rate: float | None = None, class_balance=None) -> SyntheticSet:
    """Generate ``n`` images of ``kind`` (``"brain-mri"``, ``"chest-xray"`` or ``"chest-multilabel"``,
    see :mod:`counterlens.data.chest_findings`), size x size.

    Classes are balanced (round robin, then shuffled with the seed) unless ``class_balance``
    gives per-class weights (sequence in class order, or dict class -> weight). The RNG is
    derived from (seed, kind, split), so train and test differ for the same seed.
    ``shortcut_rate`` (chest-xray only): in the train split the corner marker agrees with
    the label (present iff pneumonia) for this fraction of each class; in other splits half
    of each class has a marker; None draws no markers.
    """
    if kind == MULTILABEL_KIND:
        if shortcut_rate is not None or class_balance is not None:
            raise InputError(f"kind={kind!r} draws each finding independently; leave shortcut_rate and "
                             "class_balance out")
        return _generate_findings(n, size=size, seed=seed, split=split)
    n, size, seed = _check_args(kind, n, size, seed, split, shortcut_rate)
    classes = CLASSES[kind]
    kind_id, split_id = KINDS.index(kind), zlib.crc32(split.encode())
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(kind_id, split_id, 0)))
    counts = _class_counts(n, len(classes), class_balance, classes)
    labels = rng.permutation(np.repeat(np.arange(len(classes)), counts)).astype(np.int64)
    markers = _marker_flags(rng, labels, split, shortcut_rate)

    def render(start, stop, crng):
        if kind == "brain-mri":
            return _anatomy.render_brain(labels[start:stop], crng, size)
        return _anatomy.render_chest(labels[start:stop], markers[start:stop], crng, size)

    images, masks = render_chunks(render, n, size, seed, (kind_id, split_id), MASKS[kind])
    width = max(5, len(str(n - 1)))
    names = [f"{split}_{classes[c]}_{i:0{width}d}" for i, c in enumerate(labels)]
    return SyntheticSet(kind, images, labels, list(classes), masks, names, split, seed,
                        None if shortcut_rate is None else float(shortcut_rate))


def _generate_findings(n: int, *, size: int = 128, seed: int = 0, split: str = "train", prevalence: float = 0.4):
    """``n`` multi-finding chest films of ``size`` x ``size`` (a :class:`~counterlens.data.synthetic.SyntheticSet`
    of kind ``chest-multilabel``: ``labels [n, 3]``, ``classes`` the finding names). Drawn in the
    chunks and threads of :func:`counterlens.data.synthetic.generate`."""
    if isinstance(prevalence, bool) or not isinstance(prevalence, (int, float)) or not 0 < prevalence < 1:
        raise InputError(f"prevalence={prevalence!r}: give the share of images with each finding, in (0, 1)")
    n, size, seed = _check_args("chest-xray", n, size, seed, split, None)
    key = (103, zlib.crc32(split.encode()))       # a random stream of its own, not chest-xray's
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, 0)))
    flags = chest_findings.finding_flags(rng, n, float(prevalence))
    no_marker = np.zeros(n, bool)

    def render(start, stop, crng):
        return _anatomy.render_chest(flags[start:stop, 0].astype(np.int64), no_marker[start:stop], crng, size,
                                     findings=flags[start:stop])

    images, masks = render_chunks(render, n, size, seed, key, chest_findings.MASKS)
    width = max(5, len(str(n - 1)))
    names = [f"{split}_{i:0{width}d}" for i in range(n)]
    return SyntheticSet(MULTILABEL_KIND, images, flags.astype(np.int64), list(chest_findings.FINDINGS), masks, names,
                        split, seed)


def make_dataset(kind: str, *, n_train: int, n_test: int, size: int = 128, seed: int = 0,
                 shortcut_rate: float | None = None) -> dict[str, SyntheticSet]:
    """``{"train": generate(kind, n_train, split="train"), "test": generate(..., split="test")}``."""
    _check_int("n_train", n_train, 1)
    _check_int("n_test", n_test, 1)
    return {split: generate(kind, n_split, size=size, seed=seed, split=split, shortcut_rate=shortcut_rate)
            for split, n_split in (("train", n_train), ("test", n_test))}


def _to_png(array, path):
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)   # 2D uint8 -> mode "L"


def write_dataset(sets: dict[str, SyntheticSet], out_dir) -> Path:
    """Write sets as an ImageFolder-style tree of 8-bit grey PNGs and return ``out_dir``.

    Layout: ``Training/<class>/<stem>.png`` (split "train"), ``Testing/<class>/<stem>.png``
    (split "test"; other splits: the split name capitalised), ``masks/<mask>/<stem>.png``
    (0/255) and ``dataset.json`` describing kind, classes, size, seed, counts and masks.
    ``chest-multilabel``: ``Training/<stem>.png`` in one flat folder per split with
    ``Training/labels.csv`` (``path,opacity,effusion,cardiomegaly``, 0/1 per finding), which
    :class:`~counterlens.data.images.ImageFolder` reads; one mask folder per finding.
    """
    if not isinstance(sets, dict) or not sets or not all(isinstance(s, SyntheticSet) for s in sets.values()):
        raise InputError("sets must be a non-empty dict split -> SyntheticSet (as make_dataset returns)")
    first = next(iter(sets.values()))
    if any(s.kind != first.kind for s in sets.values()):
        raise InputError("sets must all have the same kind")
    stems = [n for s in sets.values() for n in s.names]
    if len(set(stems)) != len(stems):
        raise InputError("sets hold duplicate file stems; give each split a different name")
    out = Path(out_dir)
    multilabel = first.kind == MULTILABEL_KIND
    for split, s in sets.items():
        top = out / SPLIT_DIRS.get(split, split.capitalize())
        if multilabel:                          # one flat folder per split and its labels table
            top.mkdir(parents=True, exist_ok=True)
            (top / chest_findings.LABELS_FILE).write_text(chest_findings.labels_csv(s.names, s.labels, s.classes),
                                                        encoding="utf-8")
        for c in ([] if multilabel else s.classes):
            (top / c).mkdir(parents=True, exist_ok=True)
        pixels = np.round(np.clip(s.images[:, 0], 0, 1) * 255).astype(np.uint8)
        for i, stem in enumerate(s.names):
            _to_png(pixels[i], top / f"{stem}.png" if multilabel else top / s.classes[s.labels[i]] / f"{stem}.png")
        for name, m in s.masks.items():
            (out / "masks" / name).mkdir(parents=True, exist_ok=True)
            for i, stem in enumerate(s.names):
                _to_png(m[i].astype(np.uint8) * 255, out / "masks" / name / f"{stem}.png")
    meta = {"kind": first.kind, "classes": list(first.classes), "size": int(first.images.shape[-1]),
            "seed": first.seed, "shortcut_rate": first.shortcut_rate,
            "counts": {split: {c: int((s.labels[:, k] if multilabel else s.labels == k).sum())
                               for k, c in enumerate(s.classes)} for split, s in sets.items()},
            "masks": list(first.masks), "generator": "counterlens.data.synthetic"}
    if multilabel:       # counts are positives per finding; a film may have several or none
        meta.update(multilabel=True, images={split: len(s) for split, s in sets.items()},
                    labels_file=chest_findings.LABELS_FILE)
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out
