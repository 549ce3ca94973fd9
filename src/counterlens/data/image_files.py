"""One image file (or DICOM series folder) and its mask, loaded into float32 arrays in *data space*.

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

Here: the format dispatch, checks and slice choice (``_read``), channel conversion and resizing, and
:func:`load_image`, :func:`load_mask`, :func:`load_case`. Folders of images:
:class:`counterlens.data.images.ImageFolder` (which re-exports these).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataFileError, InputError
from . import _readers as R
from .window import apply_window, window_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz", ".npy")

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
