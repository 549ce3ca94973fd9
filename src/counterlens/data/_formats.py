"""What the format readers (:mod:`counterlens.data._readers`) and header inspection
(:mod:`counterlens.data.headers`) share: the suffixes each reader takes, recognising a file (its
suffix, the DICOM ``DICM`` marker, the magic bytes of other image formats), the size limit checked
from a header before any decoding, and the data-space conventions of stored values (8-/16-bit
scaling, channels-first layout).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataFileError

#: Largest image or volume read (elements: pixels x channels x slices), checked from the header before
#: any decoding: 2**28 (1 GiB as float32), e.g. a 512 x 512 x 1,024 CT volume. A 20,000 x 20,000
#: TIFF (a 400 KB file can hold one) is refused instead of decoding 3 GB for minutes. Pillow applies
#: its own limit (``Image.MAX_IMAGE_PIXELS``) to PNG, JPEG and BMP.
MAX_ELEMENTS = 2 ** 28

#: Suffixes read by Pillow (everything else has its own reader).
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def suffix_of(path) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole (``"x.NII.GZ" -> ".nii.gz"``)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def is_dicom_file(path) -> bool:
    """True when the file carries the DICOM ``DICM`` magic at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def check_size(path, shape, what: str) -> None:
    """Refuse a file whose header declares more than :data:`MAX_ELEMENTS` elements."""
    n = int(np.prod([int(v) for v in shape], dtype=np.float64)) if len(shape) else 0
    if n > MAX_ELEMENTS:
        raise DataFileError(path, f"{what} of shape {tuple(int(v) for v in shape)} holds {n:,} values, more than "
                                  f"counterlens reads ({MAX_ELEMENTS:,}); downscale or crop it first (e.g. a tile "
                                  "or a lower-resolution level of a whole-slide image)")


_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"II*\x00": "a TIFF image",
          b"MM\x00*": "a TIFF image", b"BM": "a BMP image", b"\x93NUMPY": "a NumPy .npy array"}


def sniff(path) -> str | None:
    """What the first bytes of a file say it is (``"a PNG image"``), when it is a known image format."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    return next((what for magic, what in _MAGIC.items() if head.startswith(magic)), None)


def scale_stored(arr: np.ndarray) -> np.ndarray:
    """Stored values -> data space: uint8 /255, uint16 /65535, bool 0/1, others as stored."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float32)
    raise TypeError(f"unsupported pixel type {arr.dtype}")


def to_channels_first(arr: np.ndarray, path) -> np.ndarray:
    """Layout of a plain array (``.npy``) -> ``[C, *S]``.

    ``[H, W]`` -> ``[1, H, W]``; 3-D: ``[C, H, W]`` if the first dim is 1 or 3,
    ``[H, W, C]`` if the last is 1, 3 or 4 (alpha dropped), else a volume
    ``[D, H, W]`` -> ``[1, D, H, W]``; 4-D: ``[C, D, H, W]`` with C = 1 or 3.
    """
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3):
            return arr
        if arr.shape[-1] in (1, 3, 4):
            return np.moveaxis(arr[..., :3], -1, 0)
        return arr[None]
    if arr.ndim == 4 and arr.shape[0] in (1, 3):
        return arr
    raise DataFileError(path, f"array of shape {arr.shape} is not an image; expected [H, W], "
                              "[C, H, W], [H, W, C], [D, H, W] or [C, D, H, W] with C = 1 or 3")
