"""Load medical and natural images into float32 arrays in *data space*.

Data space is what a viewer shows, so attributions and counterfactuals live in
values a user can read:

* 8-bit files -> ``value / 255`` in [0, 1]; 16-bit files -> ``value / 65535``;
  float TIFF / ``.npy`` as stored.
* DICOM -> modality LUT (RescaleSlope/Intercept, e.g. Hounsfield units); when the
  file has a VOI window (WindowCenter/WindowWidth or a VOI LUT Sequence) and
  ``window="auto"``, the window is applied and scaled to [0, 1]; without one the
  modality values (e.g. HU) are kept. MONOCHROME1 is inverted (higher = brighter).
* NIfTI -> reoriented to RAS+; volume ``[1, D, H, W]`` with D = inferior -> superior
  (axial slices), H = anterior -> posterior, W = patient left -> right.

Layout is channels first: ``[C, H, W]`` for 2-D, ``[C, D, H, W]`` for volumes.
Alpha channels are dropped (colour kept as stored, not composited).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataFileError, InputError
from . import _readers as R
from .label_table import finding_mask_folders, has_label_table, read_label_table, unlisted_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz", ".npy")

from .window import apply_window, window_of  # noqa: F401  (window_of re-exported)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2


def _check_args(channels, size, window):
    if channels not in (None, 1, 3):
        raise InputError(f"channels={channels!r}: use 1 (grey), 3 (RGB) or None (as stored)")
    window_of(window)
    if size is None:
        return
    try:
        sizes = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    except TypeError:
        sizes = ()
    if len(sizes) not in (1, 2, 3) or isinstance(size, (bool, str)) \
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise InputError(f"size={size!r}: give a positive int, (H, W) or (D, H, W)")


def _target_shape(path, spatial: tuple[int, ...], size) -> tuple[int, ...]:
    """Spatial output shape for ``size`` (int -> every spatial dim); mismatched dims -> DataFileError."""
    if size is None:
        return spatial
    if isinstance(size, (int, np.integer)):
        return (int(size),) * len(spatial)
    size = tuple(int(s) for s in size)
    if len(size) != len(spatial):
        kind = "a 2-D image" if len(spatial) == 2 else "a 3-D volume"
        hint = ("give a 2-D size or a 3-D file" if len(spatial) == 2
                else "give a 3-D size (D, H, W), or slice_index='middle' / an int for one slice")
        raise DataFileError(path, f"is {kind} of shape {spatial} but size={size} has {len(size)} dims; {hint}")
    return size


def _hint(size) -> tuple[int, int] | None:
    """The 2-D ``(height, width)`` an image will be resized to, when ``size`` says it."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    size = tuple(int(v) for v in size)
    return size if len(size) == 2 else None


def _slice_mode(slice_index, size):
    """``slice_index="auto"``: the whole volume when ``size`` has 3 values (a 3-D model), else the
    middle slice of a volume; any other value as given."""
    if not (isinstance(slice_index, str) and slice_index == "auto"):
        return slice_index
    three = size is not None and not isinstance(size, (int, np.integer, str)) and len(tuple(size)) == 3
    return None if three else "middle"


def _read(path, slice_index="middle", window="auto", hint=None) -> np.ndarray:
    """Read any supported file into ``[C, *S]`` float32 data space (no resize, no channel change)."""
    window = window_of(window)
    if isinstance(window, tuple):           # the user's window replaces the file's own, on the values as read
        return apply_window(_read(path, slice_index, "none", hint), window)
    path = Path(path)
    from .dicom_folders import dicom_files, series_of_case
    from .series import read_series
    case = series_of_case(path)                            # "folder/<series>": one series of a mixed folder
    if not path.exists() and case is None:
        raise DataFileError(path, "file does not exist; check the path")
    if path.is_dir() and not dicom_files(path):
        raise DataFileError(path, "is a folder, not an image file (nor a DICOM series folder); use ImageFolder for "
                                  "folders")
    suffix = R.suffix_of(path)
    try:
        if case is not None:
            arr = read_series(case[0], window=window, series=case[1]).volume
        elif path.is_dir():                                # a DICOM series: one file per slice, one volume
            arr = read_series(path, window=window).volume
        elif suffix in R.PIL_SUFFIXES:
            arr = R.read_pil(path, hint)
        elif suffix in R.TIFF_SUFFIXES:
            arr = R.read_tiff(path)
        elif suffix == ".npy":
            arr = R.read_npy(path)
        elif suffix in R.NIFTI_SUFFIXES:
            arr = R.read_nifti(path)
        elif suffix in R.DICOM_SUFFIXES or R.is_dicom_file(path):
            arr = R.read_dicom(path, window)
        else:
            raise DataFileError(path, f"unsupported file type {suffix or '(no suffix)'!r}; supported: "
                                      f"{', '.join(IMAGE_SUFFIXES)} and DICOM files without suffix")
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reader met something it did not expect
        raise DataFileError(path, f"cannot read the file ({type(exc).__name__}: {exc}); it may be corrupt "
                                  "or use a variant of the format that is not supported. Re-export it.") from exc
    if arr.ndim not in (3, 4) or min(arr.shape) == 0:
        raise DataFileError(path, f"decoded to shape {arr.shape}, which is not a 2-D image or 3-D volume")
    if not np.isfinite(arr).all():
        raise DataFileError(path, f"contains {int((~np.isfinite(arr)).sum())} NaN/inf values; "
                                  "clean the file (e.g. numpy.nan_to_num) before explaining it")
    if arr.ndim == 4 and slice_index is not None:
        depth = arr.shape[1]
        k = depth // 2 if slice_index == "middle" else slice_index
        if isinstance(k, str) or not isinstance(k, (int, np.integer)) or not -depth <= k < depth:
            raise DataFileError(path, f"slice_index={slice_index!r} does not fit a volume of {depth} slices; "
                                      f"use 'middle', None (whole volume) or an int in 0..{depth - 1}")
        arr = arr[:, int(k)]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _resize(arr: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resize the spatial dims of ``[C, *S]`` (channels untouched); linear + anti-aliasing or nearest."""
    if tuple(arr.shape[1:]) == tuple(shape):
        return arr
    from skimage.transform import resize

    out = resize(arr, (arr.shape[0], *shape), order=order, preserve_range=True,
                 anti_aliasing=order > 0, mode="edge")
    return out.astype(arr.dtype, copy=False)


def _finish(arr: np.ndarray, path, channels, size) -> np.ndarray:
    if channels == 1 and arr.shape[0] == 3:
        arr = np.tensordot(_LUMA, arr, axes=(0, 0))[None].astype(np.float32)
    elif channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return _resize(arr, _target_shape(path, arr.shape[1:], size), order=1)


def load_image(path, *, channels: int | None = None, size: tuple[int, ...] | int | None = None,
               slice_index: int | str | None = "auto", window: str = "auto") -> np.ndarray:
    """Load an image or volume as float32 ``[C, *S]`` in data space (see the module docstring).

    ``S`` is ``(H, W)`` or, for volumes with ``slice_index=None``, ``(D, H, W)``.
    ``channels``: 1 (RGB -> luminance 0.299 R + 0.587 G + 0.114 B), 3 (grey repeated) or None.
    ``size``: int or tuple matching the spatial dims; anti-aliased linear resize keeping values.
    ``slice_index``: for volumes (NIfTI, DICOM series folders, multi-frame DICOM, TIFF/.npy stacks):
    "middle", an int (axial slice), None (whole volume) or "auto" (default: None when ``size`` has
    3 values, as for a 3-D model, else "middle"); ignored by 2-D files.
    ``window``: "auto" applies the DICOM VOI window when present, "none" keeps modality values,
    ``(center, width)`` (or "C,W") maps ``center -/+ width/2`` onto 0..1 for any format (e.g. HU).
    Raises DataFileError for any unusable file and InputError for bad arguments.
    """
    _check_args(channels, size, window)
    return _finish(_read(path, _slice_mode(slice_index, size), window, _hint(size)), path, channels, size)


def _mask_from(arr: np.ndarray) -> np.ndarray:
    return np.any(arr != 0, axis=0)


def _resize_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return _resize(mask[None].astype(np.uint8), shape, order=0)[0] > 0


def load_mask(path, *, size: tuple[int, ...] | int | None = None, slice_index: int | str | None = "auto") -> np.ndarray:
    """Load a mask as bool ``[*S]``: any nonzero value (in any channel) is inside.

    Resized with nearest neighbour (no anti-aliasing) so it stays a clean mask.
    DICOM masks are read without windowing.
    """
    _check_args(None, size, "none")
    mask = _mask_from(_read(path, _slice_mode(slice_index, size), "none"))
    return _resize_mask(mask, _target_shape(path, mask.shape, size))


def _stem(path: Path) -> str:
    if path.is_dir() or not path.exists():          # a series folder, or one series of a mixed folder (a UID)
        return path.name
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _is_image(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = R.suffix_of(path)
    return suffix in IMAGE_SUFFIXES or (suffix not in (".txt", ".csv", ".json", ".md") and R.is_dicom_file(path))


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder`` sorted by relative path, skipping hidden files and folders."""
    found = [p for p in (folder.rglob("*") if recursive else folder.iterdir())
             if not any(part.startswith(".") for part in p.relative_to(folder).parts) and _is_image(p)]
    return sorted(found, key=lambda q: q.relative_to(folder).as_posix())


def load_case(path, mask_path=None, *, channels=None, size=None, slice_index="auto",
              window="auto") -> tuple[np.ndarray, np.ndarray | None]:
    """One image and its mask as a dataset run reads them: ``(image [C, *S] float32, mask bool
    [*S] or None)``. The mask must cover the image's field of view and is resized (nearest) to
    the image's final shape. Errors are :class:`DataFileError` naming the file."""
    slice_index = _slice_mode(slice_index, size)
    img = _read(path, slice_index, window, _hint(size))
    native = img.shape[1:]
    img = _finish(img, path, channels, size)
    mask = None
    if mask_path is not None:
        mask = _mask_from(_read(mask_path, slice_index, "none"))
        if mask.ndim != len(native) or not np.allclose(np.divide(mask.shape, native), mask.shape[0] / native[0],
                                                       rtol=0.02):
            raise DataFileError(mask_path, f"mask shape {mask.shape} does not fit image {path} of "
                                           f"shape {native}; masks must cover the same field of view")
        mask = _resize_mask(mask, img.shape[1:])
    return img, mask


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
