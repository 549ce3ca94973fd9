"""A window given by the user: values as read (e.g. Hounsfield units) mapped onto 0..1.

``window="auto"`` (apply a DICOM file's own VOI window), ``"none"`` (modality values as read) or
``(center, width)`` / ``"C,W"``: ``center - width/2 .. center + width/2`` onto 0..1, for any format.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def window_of(window):
    """``"auto"``, ``"none"`` or a checked ``(center, width)`` of a window given by the user (a pair of
    numbers, or the text ``"C,W"``)."""
    if isinstance(window, str) and window in ("auto", "none"):
        return window
    try:
        center, width = (float(v) for v in (window.split(",") if isinstance(window, str) else window))
    except (TypeError, ValueError):
        raise InputError(f"window={window!r}: use 'auto' (apply the DICOM file's own window), 'none' (modality "
                         "values, e.g. HU) or CENTER,WIDTH (e.g. 40,400: values 40 - 200 .. 40 + 200 onto 0..1)") from None
    if not (np.isfinite(center) and np.isfinite(width) and width > 0):
        raise InputError(f"window={window!r}: the width must be a positive number and both must be finite")
    return (center, width)


def apply_window(arr: np.ndarray, window) -> np.ndarray:
    """A user's window ``(center, width)`` on values as read (e.g. HU): ``center - width/2 .. center +
    width/2`` mapped linearly onto 0..1 and clipped (DICOM's linear VOI function, without its half-unit
    offsets)."""
    center, width = window
    return np.clip((arr - (center - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)
