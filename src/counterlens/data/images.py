"""Folders of images: :class:`ImageFolder` lists a folder's cases (class subfolders, a flat folder,
one file, DICOM series folders, a multi-label ``labels.csv``), matches their masks and reads them
in batches with :func:`~counterlens.data.image_files.load_case`.

How one file is read into data space (and :func:`load_image`, :func:`load_mask`, :func:`load_case`,
re-exported here): :mod:`counterlens.data.image_files`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataFileError, InputError
from ._formats import is_dicom_file, suffix_of
from .image_files import IMAGE_SUFFIXES, _check_args, _slice_mode, load_case
from .image_files import _resize, load_image, load_mask, window_of  # noqa: F401  (re-exported)
from .label_table import finding_mask_folders, has_label_table, read_label_table, unlisted_images


def _stem(path: Path) -> str:
    if path.is_dir() or not path.exists():          # a series folder, or one series of a mixed folder (a UID)
        return path.name
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _is_image(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = suffix_of(path)
    return suffix in IMAGE_SUFFIXES or (suffix not in (".txt", ".csv", ".json", ".md") and is_dicom_file(path))


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder`` sorted by relative path, skipping hidden files and folders."""
    found = [p for p in (folder.rglob("*") if recursive else folder.iterdir())
             if not any(part.startswith(".") for part in p.relative_to(folder).parts) and _is_image(p)]
    return sorted(found, key=lambda q: q.relative_to(folder).as_posix())


@dataclass
class ImageRecord:
    """One image of an :class:`ImageFolder`."""

    path: Path
    label: int | None  #: index into ``ImageFolder.classes``; None without class subfolders
    mask_path: Path | None
    findings: tuple[int, ...] | None = None          #: multi-label folders: 1, 0 or -1 (unknown) per class
    finding_masks: dict[str, Path] | None = None     #: multi-label folders: a mask per finding


class ImageFolder:
    """A folder of images.

    Layouts: (a) class subfolders ``root/<class>/**/*.png`` (labels from folder names,
    classes sorted alphabetically unless ``classes`` is given; subfolders without images
    are ignored, loose files next to class folders are skipped with a warning);
    (b) a flat folder of images (labels None); (c) a single image file; (d) multi-label: a folder
    with ``labels.csv`` (``path,<finding>,...``, 1/0 per finding; see :mod:`.label_table`), whose
    records carry ``findings`` and ``multilabel`` is True.
    Hidden files and non-image files are skipped; record order is sorted by relative path.

    ``masks``: folder of masks matched by file stem (searched recursively; the stem of
    ``x.nii.gz`` is ``x``; ``x_mask.png`` also matches ``x``; a mask in the same relative
    subfolder wins over others with that stem). Images without a mask get ``mask_path`` None.
    Masks are resized (nearest) to the image's final shape.
    ``classes``: e.g. the model's class names; folder names are matched case-insensitively,
    a folder that matches none raises InputError.
    ``limit``: keep at most this many records, taken round-robin over classes.
    """

    def __init__(self, root, *, channels=None, size=None, classes=None, masks=None,
                 slice_index="auto", window="auto", limit=None):
        _check_args(channels, size, window)
        self.root = Path(root)
        window = window_of(window)
        self.channels, self.size = channels, size
        self.window = list(window) if isinstance(window, tuple) else window   # [center, width]: as run.yaml holds it
        self.slice_index = _slice_mode(slice_index, size)          # None: volumes (series folders are cases)
        if not self.root.exists():
            raise DataFileError(self.root, "does not exist; give an image file or a folder of images")
        mask_dir = Path(masks) if masks is not None else None
        if mask_dir is not None and not mask_dir.is_dir():
            raise DataFileError(mask_dir, "mask folder does not exist or is not a folder")
        self.multilabel = has_label_table(self.root)
        if self.multilabel:                      # labels.csv: one 0/1 column per finding (see label_table)
            self.classes, self.records = self._multilabel(classes, mask_dir)
            self._limit(limit)
            return
        found: list[tuple[Path, str | None]] = []  # (image, class folder name)
        rel_base = self.root
        if self.root.is_file():
            if not _is_image(self.root):
                raise DataFileError(self.root, f"is not an image file ({', '.join(IMAGE_SUFFIXES)} or DICOM)")
            found = [(self.root, None)]
            rel_base = self.root.parent
        else:
            skip = mask_dir.resolve() if mask_dir is not None else None
            subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
                             and (skip is None or d.resolve() != skip))
            per_class = {d.name: _images_under(d, True) for d in subdirs}
            per_class = {k: v for k, v in per_class.items() if v}
            loose = _images_under(self.root, False)
            if per_class:
                if loose:
                    warnings.warn(f"{self.root}: {len(loose)} image file(s) next to class folders are skipped "
                                  f"(e.g. {loose[0].name})", stacklevel=2)
                found = [(p, name) for name in sorted(per_class) for p in per_class[name]]
            else:
                found = [(p, None) for p in loose]
        if self.slice_index is None and not self.root.is_file():
            from .dicom_folders import series_cases
            found = series_cases(found, self.root)
            rel_base = self.root.parent if any(p == self.root for p, _ in found) else rel_base
        if not found:
            raise DataFileError(self.root, f"contains no images ({', '.join(IMAGE_SUFFIXES)}, DICOM); "
                                           "check the path, or put images in it or in class subfolders")
        folder_names = sorted({name for _, name in found if name is not None})
        if classes is not None:
            self.classes = [str(c) for c in classes]
            lookup = {c.lower(): i for i, c in enumerate(self.classes)}
            label_of = {}
            for name in folder_names:
                if name.lower() not in lookup:
                    raise InputError(f"class folder {str(self.root / name)!r} matches none of the classes "
                                     f"{self.classes}; rename the folder or pass the right classes")
                label_of[name] = lookup[name.lower()]
        else:
            self.classes = folder_names
            label_of = {name: i for i, name in enumerate(folder_names)}
        mask_of = self._match_masks(mask_dir, [p for p, _ in found], rel_base) if mask_dir else {}
        self.records: list[ImageRecord] = [
            ImageRecord(p, label_of[name] if name is not None else None, mask_of.get(p)) for p, name in found]
        self._limit(limit)

    def _limit(self, limit) -> None:
        if limit is not None:
            if not isinstance(limit, (int, np.integer)) or limit < 1:
                raise InputError(f"limit={limit!r}: give a positive int or None")
            self.records = self._balanced(self.records, int(limit))

    def _multilabel(self, classes, mask_dir) -> tuple[list[str], list[ImageRecord]]:
        """The classes (findings) and records of a folder with a labels table."""
        findings, rows = read_label_table(self.root, classes)
        images = [p for p, _ in rows]
        unlisted_images(self.root, images, _images_under(self.root, True))
        per_finding = finding_mask_folders(mask_dir, findings)
        masks = {f: self._match_masks(d, images, self.root) for f, d in (per_finding or {}).items()}
        single = self._match_masks(mask_dir, images, self.root) if mask_dir is not None and not per_finding else {}
        return findings, [ImageRecord(p, None, single.get(p), labels,
                                      {f: m[p] for f, m in masks.items() if p in m} if per_finding else None)
                          for p, labels in rows]

    @staticmethod
    def _match_masks(mask_dir: Path, images: list[Path], base: Path) -> dict[Path, Path]:
        by_stem: dict[str, list[Path]] = {}
        for m in _images_under(mask_dir, True):
            by_stem.setdefault(_stem(m), []).append(m)
        out = {}
        for img in images:
            stem = _stem(img)
            cands = by_stem.get(stem) or by_stem.get(stem + "_mask") or []
            if len(cands) > 1:  # prefer the mask in the same relative subfolder
                rel = img.parent.relative_to(base) if img.is_relative_to(base) else Path()
                same = [m for m in cands if m.parent.relative_to(mask_dir) == rel]
                if len(same) != 1:
                    raise InputError(f"image {str(img)!r} matches several masks {[str(m) for m in cands]}; "
                                     "give masks unique names or mirror the image subfolders")
                cands = same
            if cands:
                out[img] = cands[0]
        return out

    @staticmethod
    def _balanced(records: list[ImageRecord], limit: int) -> list[ImageRecord]:
        groups: dict = {}
        for i, r in enumerate(records):
            groups.setdefault(r.label, []).append(i)
        queues = [groups[k] for k in sorted(groups, key=lambda k: (k is None, k if k is not None else 0))]
        chosen: list[int] = []
        while len(chosen) < min(limit, len(records)):
            for q in queues:
                if q and len(chosen) < limit:
                    chosen.append(q.pop(0))
        return [records[i] for i in sorted(chosen)]

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, classes={self.classes})"

    def load(self, i: int) -> tuple[np.ndarray, int | None, np.ndarray | None]:
        """``(image [C, *S] float32, label, mask bool [*S] or None)``; errors name the file. A
        multi-label folder's label is the record's ``findings`` (1, 0 or -1 per class)."""
        rec = self.records[i]
        img, mask = load_case(rec.path, rec.mask_path, channels=self.channels, size=self.size,
                              slice_index=self.slice_index, window=self.window)
        return img, rec.findings if self.multilabel else rec.label, mask

    @property
    def read_options(self) -> dict:
        """The keyword arguments of :func:`load_case` this folder reads with."""
        return {"channels": self.channels, "size": self.size, "slice_index": self.slice_index, "window": self.window}

    def iter_batches(self, batch_size: int):
        """Yield ``(indices, images [b, C, *S], labels, masks, failures)`` per batch.

        ``indices``/``labels``/``masks`` are for the ``b`` images that loaded; ``failures`` lists
        ``(index, DataFileError)`` for the others (unreadable file, or a shape that differs from
        the first image loaded: pass ``size``/``channels`` to make them equal). A batch in which
        every file failed has ``images`` of shape ``[0, C, *S]`` (``[0]`` if no shape is known yet).
        """
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: give a positive int")
        shape = None
        for start in range(0, len(self), batch_size):
            idx, imgs, labels, masks, failures = [], [], [], [], []
            for i in range(start, min(start + batch_size, len(self))):
                try:
                    img, label, mask = self.load(i)
                    if shape is None:
                        shape = img.shape
                    elif img.shape != shape:
                        raise DataFileError(self.records[i].path, f"shape {img.shape} differs from the other "
                                                                  f"images' {shape}; pass size= and channels=")
                except DataFileError as exc:
                    failures.append((i, exc))
                    continue
                idx.append(i), imgs.append(img), labels.append(label), masks.append(mask)
            images = np.stack(imgs) if imgs else np.zeros((0, *(shape or ())), dtype=np.float32)
            yield idx, images, labels, masks, failures
