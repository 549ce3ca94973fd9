"""What an image file holds, read from its header without decoding the pixels, and what the loader
(:func:`counterlens.data.images.load_case`) will do to it.

:func:`file_info` gives the channels and spatial shape the reader will produce (``[C, *S]``, after
the same rules as :mod:`counterlens.data._readers`: palette and colour -> 3 channels, alpha dropped,
EXIF rotation applied, NIfTI reoriented, DICOM frames as a volume); :func:`read_steps` turns that
and the read options (channels, size, slice_index, window) into short phrases: the slice taken
from a volume, grey <-> RGB, the resize with its aspect change, the DICOM window. A dataset run
groups them into its console summary, ``run.yaml`` and the report (see
:mod:`counterlens.runs.diagnose`). Reading a header costs well under a millisecond for PNG, JPEG,
TIFF, ``.npy``, DICOM and NIfTI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _readers as R

__all__ = ["FileInfo", "file_info", "read_steps", "final_shape", "shape_text"]

_GREY_MODES = ("1", "L", "LA", "I", "F")


@dataclass(frozen=True)
class FileInfo:
    """A file as the reader will give it, before resizing or channel changes."""

    format: str                      #: "PNG", "JPEG", "TIFF", "DICOM", "NIfTI", "npy", ...
    channels: int                    #: 1 (grey) or 3 (RGB)
    shape: tuple[int, ...]           #: spatial: (H, W), or (D, H, W) for a volume / multi-frame file
    bits: int | None = None          #: 8 or 16 for integer pixels scaled to [0, 1]; None: values as stored
    window: bool = False             #: DICOM: the file has a VOI window or LUT
    units: str | None = None         #: DICOM: e.g. "HU" (CT modality values)


def shape_text(shape) -> str:
    """``(128, 96)`` -> ``"128x96"``."""
    return "x".join(str(int(v)) for v in shape)


def file_info(path) -> FileInfo | None:
    """The file's channels and shape from its header; None when that cannot be told without
    decoding (the reader then says what is wrong when the file is read)."""
    path = Path(path)
    if path.is_dir() or not path.exists():                # a series folder, or one series of a mixed folder
        return _series(path)
    if not path.is_file():
        return None
    suffix = R.suffix_of(path)
    try:
        if suffix in R.PIL_SUFFIXES:
            return _pil(path)
        if suffix in R.TIFF_SUFFIXES:
            return _tiff(path)
        if suffix == ".npy":
            return _npy(path)
        if suffix in R.NIFTI_SUFFIXES:
            return _nifti(path)
        if suffix in R.DICOM_SUFFIXES or R.is_dicom_file(path):
            return _dicom(path)
    except Exception:  # noqa: BLE001 - any reader error: the file is described as unknown
        return None
    return None


def _pil(path: Path) -> FileInfo:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):          # EXIF rotation by 90 degrees: sides swap
            w, h = h, w
        mode = im.mode
        grey = mode in _GREY_MODES or mode.startswith("I;16")
        bits = 16 if mode.startswith("I") else (None if mode == "F" else 8)
        return FileInfo(im.format or R.suffix_of(path)[1:].upper(), 1 if grey else 3, (h, w), bits)


def _tiff(path: Path) -> FileInfo | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series, page = tif.series[0], tif.pages[0]
        axes, shape = series.axes, tuple(series.shape)
        photometric, palette = int(page.photometric), page.colormap is not None
        dtype = np.dtype(series.dtype)
    if photometric == 3 and palette:
        channels = 3
    elif "S" in axes:
        channels = 3 if photometric in (2, 6) and shape[axes.index("S")] >= 3 else 1
    else:
        channels = 1
    spatial = tuple(n for a, n in zip(axes, shape) if a != "S" and (a in "YX" or n > 1))
    if len(spatial) not in (2, 3):
        return None
    return FileInfo("TIFF", channels, spatial, _bits(dtype))


def _npy(path: Path) -> FileInfo:
    arr = R.to_channels_first(np.load(path, allow_pickle=False, mmap_mode="r"), path)   # a view: nothing decoded
    return FileInfo("npy", 3 if arr.shape[0] == 3 else 1, tuple(int(v) for v in arr.shape[1:]), _bits(arr.dtype))


def _bits(dtype) -> int | None:
    return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(np.dtype(dtype))


def _nifti(path: Path) -> FileInfo | None:
    import nibabel as nib

    img = nib.load(str(path))
    shape = list(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    frames = shape.pop() if len(shape) == 4 else 1        # a 4-D file: read_nifti takes its volume 0
    if len(shape) == 2:
        shape.append(1)
    if len(shape) != 3:
        return None
    ornt = nib.orientations.io_orientation(img.affine)            # input axis i -> canonical axis ornt[i, 0]
    canonical = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt[:3]):
        canonical[int(axis)] = int(shape[i])
    return FileInfo("NIfTI" if frames == 1 else f"4-D NIfTI of {frames} volumes", 1,
                    (canonical[2], canonical[1], canonical[0]))   # (S, P, R) as read_nifti gives


def _dicom(path: Path) -> FileInfo | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not rows or not cols:
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    colour = photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel", 1) or 1) == 3
    window = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    units = "HU" if str(ds.get("Modality", "")).upper() == "CT" and "RescaleIntercept" in ds else None
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    return FileInfo("DICOM", 3 if colour else 1, shape, None, window and not colour, units)


def _series(folder: Path) -> FileInfo | None:
    """A DICOM series folder (one file per slice): its first file's header, one slice per file."""
    from .series import series_files
    try:
        files = series_files(folder)
        first = _dicom(files[0]) if files else None
    except Exception:  # noqa: BLE001
        return None
    if first is None or len(first.shape) != 2 or first.channels != 1:
        return None
    return FileInfo("DICOM series", 1, (len(files), *first.shape), None, first.window, first.units)


def final_shape(info: FileInfo, *, size=None, slice_index="middle") -> tuple[int, ...]:
    """The spatial shape the loader gives ``info``'s file with these read options."""
    shape = info.shape[1:] if len(info.shape) == 3 and slice_index is not None else info.shape
    if size is None:
        return tuple(shape)
    if isinstance(size, (int, np.integer)):
        return (int(size),) * len(shape)
    size = tuple(int(v) for v in size)
    return size if len(size) == len(shape) else tuple(shape)


def read_steps(info: FileInfo, *, channels=None, size=None, slice_index="middle", window="auto") -> tuple[str, ...]:
    """What the loader does to the file, as short phrases in the order it does them, e.g.
    ``("middle slice of 40", "grey -> RGB", "resized from 256x256 to 128x128")``; empty when
    the file is read as stored."""
    steps = []
    shape = info.shape
    if info.format.startswith("4-D NIfTI"):
        steps.append(f"volume 0 of a {info.format}")
    if len(shape) == 3 and slice_index is not None:
        depth = shape[0]
        if slice_index == "middle":
            steps.append(f"middle slice of {depth}")
        elif isinstance(slice_index, (int, np.integer)) and -depth <= slice_index < depth:
            steps.append(f"slice {int(slice_index) % depth} of {depth}")
        shape = shape[1:]
    if not isinstance(window, str):            # the user's window, any format
        center, width = window
        steps.append(f"window {center:g},{width:g} (values {center - width / 2:g}..{center + width / 2:g} -> 0..1)")
    elif info.format.startswith("DICOM") and info.channels == 1:
        if window == "auto" and info.window:
            steps.append("DICOM window applied (values 0..1)")
        elif info.units:
            steps.append(f"values in {info.units} (no window)")
    if info.bits == 16:
        steps.append("16-bit values / 65535")
    if channels == 1 and info.channels == 3:
        steps.append("RGB -> grey (luminance)")
    elif channels == 3 and info.channels == 1:
        steps.append("grey -> RGB (channel repeated)")
    target = final_shape(FileInfo(info.format, info.channels, tuple(shape)), size=size, slice_index=None)
    if tuple(target) != tuple(shape):
        text = f"resized from {shape_text(shape)} to {shape_text(target)}"
        if len(shape) == 2:
            before, after = shape[1] / shape[0], target[1] / target[0]
            if abs(before - after) > 0.01 * after:
                text += f" (aspect changed {before:.2f} -> {after:.2f})"
        steps.append(text)
    return tuple(steps)
