"""The report's slice viewer for 3D cases: axial, coronal and sagittal slices of a volume with
each method's map over them.

Every plane is one grey *sprite* PNG (all its slices tiled in a grid) and, per method, one
transparent map sprite on the colour scale of the whole 3-D map (the palette rule of
:func:`counterlens.viz.report_images.map_png`). The page shows one tile at a time through CSS
``background-position``; ``slice_viewer.js`` (shipped with the report's script, no inline code)
moves it when the slider, the mouse wheel or the plane buttons change. A plane opens at the slice
with the most positive attribution mass of the first method (``peaks``).

Orientation of a volume ``[C, D, H, W]`` as the readers give it (D inferior -> superior, H anterior
-> posterior, W left -> right for NIfTI): axial slice ``k`` is ``[H, W]``; coronal slice ``j`` is
``[D, W]`` and sagittal slice ``i`` is ``[D, H]``, both with superior at the top.
"""
from __future__ import annotations

import math

import numpy as np

from .plots import OverlayStyle
from .report_images import _encode, _indexed, _palette, data_uri, scale_labels

PLANES = ("axial", "coronal", "sagittal")
MAX_SIDE = 128          #: volumes larger than this a side are averaged down for the viewer
VIEWER_FILE_BYTES = 60_000_000   #: about the most slice-viewer data one report file holds


def volume_case_limit(input_size) -> int:
    """Cases of a volume run that fit one report file: its viewers carry every slice of three planes
    (grey and maps, about 6 bytes a voxel as base64 PNG), e.g. 381 cases at 32^3, 47 at 64^3."""
    side = [min(int(s), MAX_SIDE) for s in (input_size or (64, 64, 64))]
    return max(24, int(VIEWER_FILE_BYTES / (6 * math.prod(side))))


def plane_slices(vol: np.ndarray, plane: str) -> np.ndarray:
    """``[D, H, W]`` -> the stack of 2-D slices of ``plane``, ``[n, rows, cols]`` (superior at the top)."""
    if plane == "axial":
        return vol
    if plane == "coronal":
        return np.ascontiguousarray(vol[::-1].transpose(1, 0, 2))     # [H][D, W]
    if plane == "sagittal":
        return np.ascontiguousarray(vol[::-1].transpose(2, 0, 1))     # [W][D, H]
    raise ValueError(f"plane={plane!r}: use one of {PLANES}")


def peak_slice(amap: np.ndarray, plane: str) -> int:
    """Index of the slice of ``plane`` with the most positive attribution (|map| if none is positive)."""
    a = np.nan_to_num(amap.astype(np.float32))
    mass = np.clip(a, 0, None)
    if not mass.any():
        mass = np.abs(a)
    per = plane_slices(mass, plane).reshape(plane_slices(mass, plane).shape[0], -1).sum(axis=1)
    return int(np.argmax(per)) if per.any() else per.shape[0] // 2


def _reduce(vol: np.ndarray, max_side: int) -> np.ndarray:
    """Area-average ``[D, H, W]`` by an integer factor per axis so no side exceeds ``max_side``."""
    factors = [max(1, math.ceil(n / max_side)) for n in vol.shape]
    if factors == [1, 1, 1]:
        return vol
    shape = [n // f * f for n, f in zip(vol.shape, factors)]
    v = vol[: shape[0], : shape[1], : shape[2]]
    return v.reshape(shape[0] // factors[0], factors[0], shape[1] // factors[1], factors[1],
                     shape[2] // factors[2], factors[2]).mean(axis=(1, 3, 5))


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    return cols, math.ceil(n / cols)


def _tile(stack: np.ndarray, fill) -> np.ndarray:
    """``[n, h, w]`` -> one ``[rows * h, cols * w]`` sprite, slice ``k`` at (k // cols, k % cols)."""
    n, h, w = stack.shape
    cols, rows = _grid(n)
    out = np.full((rows * h, cols * w), fill, dtype=stack.dtype)
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = stack[k]
    return out


def _position(k: int, n: int) -> str:
    """CSS ``background-position`` of tile ``k`` of a sprite of ``n`` tiles."""
    cols, rows = _grid(n)
    r, c = divmod(int(k), cols)
    x = 100.0 * c / (cols - 1) if cols > 1 else 0.0
    y = 100.0 * r / (rows - 1) if rows > 1 else 0.0
    return f"{x:.4f}% {y:.4f}%"


def _map_levels(amap: np.ndarray, vmax: float, signed: bool) -> np.ndarray:
    unit = (np.clip(amap, -vmax, vmax) / vmax + 1) / 2 if signed else np.clip(amap, 0, vmax) / vmax
    return np.round(unit * 255).astype(np.uint8)


def shown_spacing(file, shape) -> tuple[float, float, float] | None:
    """Voxel size (D, H, W) in mm of a case stored at ``shape`` when read from ``file`` (a NIfTI file or
    a DICOM series folder, headers only): the file's spacing times its shape over ``shape``, since
    the loader resizes the whole field of view. None when the file is gone or has no spacing."""
    from pathlib import Path

    from ..data import _readers as R
    from ..data.series import header_spacing
    try:
        path = Path(str(file))
        if path.is_dir():
            found = header_spacing(path)
        elif R.suffix_of(path) in R.NIFTI_SUFFIXES:
            import nibabel as nib
            ornt = nib.orientations.io_orientation(nib.load(str(path)).affine)
            native = {int(ax): int(nib.load(str(path)).shape[i]) for i, (ax, _) in enumerate(ornt[:3])}
            found = R.nifti_spacing(path), (native[2], native[1], native[0])
        else:
            found = None
    except Exception:  # noqa: BLE001 - a moved or unreadable file: show cubic voxels
        return None
    if found is None or len(shape) != 3:
        return None
    spacing, native = found
    return tuple(float(s) * n / m for s, n, m in zip(spacing, native, shape))


def volume_view(image: np.ndarray, maps: dict[str, np.ndarray], value_range=None, clip_percentile: float = 0.5,
                spacing=None, max_side: int = MAX_SIDE, *, cmap: str | None = None, absolute: bool = False) -> dict:
    """What the slice viewer of one 3-D case shows.

    ``image``: ``[C, D, H, W]`` (the first channel is shown); ``maps``: ``{method: [D, H, W]}``;
    ``spacing``: voxel size (D, H, W) for the planes' aspect ratios (default: cubic voxels).
    ``cmap``, ``absolute``, ``clip_percentile``: see :class:`counterlens.viz.plots.OverlayStyle`.
    Returns ``{"planes": [{"name", "n", "cols", "rows", "aspect", "image_uri", "start", "position",
    "maps": [{"method", "uri"}]}], "methods": [{"name", "peaks", "labels", "signed"}], "shape"}``.
    """
    vol = np.asarray(image, dtype=np.float32)[0]
    full_shape = vol.shape
    lo, hi = value_range if value_range is not None else (float(vol.min()), float(vol.max()))
    grey = np.clip((vol - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    grey = _reduce(grey, max_side)
    factor = np.divide(full_shape, grey.shape)
    sd, sh, sw = (float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))
    sd, sh, sw = sd * factor[0], sh * factor[1], sw * factor[2]
    aspects = {"axial": (grey.shape[2] * sw) / (grey.shape[1] * sh),
               "coronal": (grey.shape[2] * sw) / (grey.shape[0] * sd),
               "sagittal": (grey.shape[1] * sh) / (grey.shape[0] * sd)}
    methods, sprites = [], {}
    style = OverlayStyle(cmap, absolute=absolute, clip_percentile=clip_percentile)
    for name, amap in maps.items():
        a = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        a, vmin, vmax, signed, colours = style.scale(a)
        small = _reduce(a, max_side)
        methods.append({"name": name, "signed": signed, "labels": scale_labels(vmin, vmax, signed),
                        "peaks": {p: peak_slice(small, p) for p in PLANES}})
        sprites[name] = (small, vmax, signed, colours)
    planes = []
    for p in PLANES:
        stack = plane_slices(grey, p)
        n = stack.shape[0]
        cols, rows = _grid(n)
        start = methods[0]["peaks"][p] if methods else n // 2
        sprite = np.round(_tile(stack, 0.0) * 255).astype(np.uint8)
        from PIL import Image
        layers = []
        for name, (small, vmax, signed, colours) in sprites.items():
            levels = _tile(_map_levels(plane_slices(small, p), vmax, signed), 127 if signed else 0)
            palette, alpha = _palette(colours, signed)
            img = _indexed(levels)
            img.putpalette(palette)
            layers.append({"method": name, "uri": data_uri(_encode(img, transparency=alpha))})
        planes.append({"name": p, "n": n, "cols": cols, "rows": rows, "aspect": f"{aspects[p]:.4f}",
                       "image_uri": data_uri(_encode(Image.fromarray(sprite))), "start": start,
                       "position": _position(start, n), "size": f"{cols * 100}% {rows * 100}%", "maps": layers})
    return {"planes": planes, "methods": methods, "shape": list(full_shape),
            "spacing": None if spacing is None else " x ".join(f"{float(v):.3g}" for v in spacing)}
