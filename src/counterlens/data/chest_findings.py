"""The multi-label synthetic chest films: ``chest-multilabel``.

The chest X-rays of :mod:`counterlens.data.synthetic` with three findings drawn independently of
each other, so any of them can co-occur (as in CheXNet-style sets, one sigmoid per finding):

``opacity``       patchy consolidation inside one or both lungs;
``effusion``      pleural fluid at the base of one or both lungs (a meniscus, a blunted angle);
``cardiomegaly``  an enlarged heart (30-45% wider and taller).

Each finding has its own ground-truth mask (empty where the finding is absent), plus the
``lungs`` mask. ``labels`` is ``[N, 3]`` int64 (0/1, columns in :data:`FINDINGS` order). Output is
bitwise identical for identical arguments; exactly ``round(prevalence * N)`` images carry each
finding (drawn per finding, independently), so about ``(1 - prevalence)**3`` have none.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import InputError
from . import _anatomy

KIND = "chest-multilabel"
FINDINGS = list(_anatomy.CHEST_FINDINGS)
MASKS = (*FINDINGS, "lungs")
LABELS_FILE = "labels.csv"


def finding_flags(rng: np.random.Generator, n: int, prevalence: float) -> np.ndarray:
    """bool ``[n, len(FINDINGS)]``: each finding on exactly ``round(prevalence * n)`` images."""
    flags = np.zeros((n, len(FINDINGS)), bool)
    k = round(prevalence * n)
    for j in range(len(FINDINGS)):
        flags[rng.permutation(n)[:k], j] = True
    return flags


def generate_findings(n: int, *, size: int = 128, seed: int = 0, split: str = "train", prevalence: float = 0.4):
    """``n`` multi-finding chest films of ``size`` x ``size`` (a :class:`~counterlens.data.synthetic.SyntheticSet`
    of kind ``chest-multilabel``: ``labels [n, 3]``, ``classes`` the finding names). Drawn in the
    chunks and threads of :func:`counterlens.data.synthetic.generate`."""
    from .synthetic import SyntheticSet, _check_args, render_chunks
    if isinstance(prevalence, bool) or not isinstance(prevalence, (int, float)) or not 0 < prevalence < 1:
        raise InputError(f"prevalence={prevalence!r}: give the share of images with each finding, in (0, 1)")
    n, size, seed = _check_args("chest-xray", n, size, seed, split, None)
    key = (len(FINDINGS) + 100, zlib.crc32(split.encode()))       # a stream of its own, not chest-xray's
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, 0)))
    flags = finding_flags(rng, n, float(prevalence))
    no_marker = np.zeros(n, bool)

    def render(start, stop, crng):
        return _anatomy.render_chest(flags[start:stop, 0].astype(np.int64), no_marker[start:stop], crng, size,
                                     findings=flags[start:stop])

    images, masks = render_chunks(render, n, size, seed, key, MASKS)
    width = max(5, len(str(n - 1)))
    names = [f"{split}_{i:0{width}d}" for i in range(n)]
    return SyntheticSet(KIND, images, flags.astype(np.int64), list(FINDINGS), masks, names, split, seed)


def labels_csv(names: list[str], labels: np.ndarray, classes: list[str]) -> str:
    """The labels table of a multi-label folder: ``path,<finding>,...`` and one 0/1 row per image
    (``path`` relative to the folder the table is in)."""
    rows = [",".join(["path", *classes])]
    rows += [",".join([f"{stem}.png", *(str(int(v)) for v in row)]) for stem, row in zip(names, labels)]
    return "\n".join(rows) + "\n"
