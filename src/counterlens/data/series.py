"""DICOM series: a folder of one file per slice, read as one volume ``[1, D, H, W]``.

Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (the cross product
of the two ``ImageOrientationPatient`` directions), so oblique series and files named in any order
come out right; D runs along the normal (inferior -> superior for an ordinary axial series), H and
W are the stored rows and columns (as a DICOM viewer shows each slice). Without positions the
``InstanceNumber`` orders them and the slice spacing comes from ``SpacingBetweenSlices`` or
``SliceThickness`` (said in :attr:`Series.notes`).

Values: each slice's modality LUT (its own RescaleSlope/Intercept, e.g. Hounsfield units); with
``window="auto"`` the VOI window of the middle slice (VOI LUT Sequence, or WindowCenter/Width) is
applied to the whole volume, scaled to [0, 1], as :func:`~counterlens.data._readers.read_dicom` does
for one file. MONOCHROME1 is inverted.

Several series in one folder (a study exported flat) are separated by ``SeriesInstanceUID``: a volume
dataset makes each a case ``folder/<name>`` (:func:`~counterlens.data.dicom_folders.series_names`: the
SeriesDescription, or the UID when that is empty or repeated); ``read_series(folder, series=UID or
name)`` reads one. Missing slices (gaps of whole slice steps, at most :data:`MAX_MISSING_FRACTION` of
them) are filled by linear interpolation between their neighbours and reported (a warning naming the
folder and how many, :attr:`Series.missing`), so the volume keeps the even spacing a model and the
slice viewer assume. Which files and series a folder holds: :mod:`counterlens.data.dicom_folders`.

Refused, with a :class:`~counterlens.errors.DataFileError` naming the folder and the fix: several
series read as one volume (no ``series=``), slices of different size or orientation in a series,
two different slices at one position, uneven spacing that is not a gap of whole slices, more missing
slices than :data:`MAX_MISSING_FRACTION`, slices with neither position nor instance number. The
same file stored twice (same SOPInstanceUID) is read once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataFileError
from . import _readers as R
from .dicom_folders import (  # noqa: F401  (group_series, series_cases, series_of_case re-exported)
    dicom_files,
    group_series,
    series_cases,
    series_files,
    series_names,
    series_of_case,
)

#: Slice spacing may vary by this fraction of the median before the series counts as having a gap.
GAP_TOLERANCE = 0.1
#: At most this fraction of a series' slices may be missing (and filled by interpolation); more is refused.
MAX_MISSING_FRACTION = 0.25


@dataclass
class Series:
    """One DICOM series read as a volume."""

    volume: np.ndarray                      #: float32 ``[1, D, H, W]`` in data space
    spacing: tuple[float, float, float]     #: voxel size (D, H, W) in mm
    files: list[Path]                       #: the slice files, in volume order
    origin: tuple[float, ...] | None = None  #: ImagePositionPatient of the first slice (mm)
    normal: tuple[float, ...] | None = None  #: unit slice normal (patient coordinates, LPS)
    series_uid: str | None = None
    description: str = ""
    sorted_by: str = "position"             #: "position" or "instance number"
    notes: list[str] = field(default_factory=list)
    orientation: tuple[float, ...] | None = None  #: ImageOrientationPatient: row then column direction (LPS)
    missing: list[int] = field(default_factory=list)  #: slice indices filled by interpolation (gaps)


def _floats(value, n: int):
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _headers(folder: Path, files: list[Path]):
    import pydicom

    heads = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types
            raise DataFileError(f, f"cannot read the DICOM header ({exc}); remove the file from series folder "
                                   f"{folder} or replace it") from exc
        heads.append(ds)
    return heads


def _pick_series(folder: Path, files, heads, series):
    uids = [str(h.get("SeriesInstanceUID", "")) for h in heads]
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(uids):
        groups.setdefault(u, []).append(i)
    if series is not None:
        names = series_names(folder) if len(groups) > 1 else {}
        uid = names.get(str(series), str(series))
        if uid not in groups:
            raise DataFileError(folder, f"holds no series {series!r}; its series: "
                                        f"{', '.join(map(repr, names or groups))}")
        keep = groups[uid]
    elif len(groups) > 1:
        names = series_names(folder)
        parts = [f"{n!r}: {len(groups.get(u, []))} files" for n, u in names.items()]
        raise DataFileError(folder, f"holds {len(groups)} DICOM series ({'; '.join(parts)}); a folder is read as "
                                    "one volume: read one with series=NAME (a dataset makes each its own case "
                                    f"{folder.name}/NAME), or move each series into its own folder")
    else:
        keep = list(range(len(files)))
    return [files[i] for i in keep], [heads[i] for i in keep]


def _order(folder: Path, files, heads):
    """(order, positions along the normal or None, normal or None, sorted_by, notes, orientation or None)."""
    orient = [_floats(h.get("ImageOrientationPatient"), 6) for h in heads]
    pos = [_floats(h.get("ImagePositionPatient"), 3) for h in heads]
    if all(o is not None for o in orient) and all(p is not None for p in pos):
        o = np.asarray(orient)
        if np.abs(o - o[0]).max() > 1e-3:
            bad = files[int(np.argmax(np.abs(o - o[0]).max(axis=1)))]
            raise DataFileError(folder, f"slices have different orientations ({bad.name} differs from "
                                        f"{files[0].name}); a volume needs one orientation: split the folder")
        row, col = o[0, :3], o[0, 3:]
        normal = np.cross(row, col)
        if np.linalg.norm(normal) < 1e-6:
            raise DataFileError(folder, "ImageOrientationPatient has parallel row and column directions; "
                                        "the files are damaged")
        normal /= np.linalg.norm(normal)
        z = np.asarray(pos) @ normal
        order = np.argsort(z, kind="stable")
        return order, z[order], tuple(float(v) for v in normal), "position", [], tuple(float(v) for v in o[0])
    numbers = [h.get("InstanceNumber") for h in heads]
    if all(n is not None and str(n).strip() != "" for n in numbers):
        nums = np.asarray([int(n) for n in numbers])
        order = np.argsort(nums, kind="stable")
        if len(set(nums.tolist())) != len(nums):
            raise DataFileError(folder, "slices have no ImagePositionPatient and repeat InstanceNumbers; "
                                        "cannot order them: export the series with positions")
        return order, None, None, "instance number", [
            "no ImagePositionPatient in some slices: ordered by InstanceNumber, slice spacing from the header"], None
    raise DataFileError(folder, "slices have neither ImagePositionPatient nor InstanceNumber, so their order is "
                                "unknown; export the series with positions, or stack it into one NIfTI file")


def _dedupe(folder, files, heads, z):
    """Drop repeated copies of one instance; refuse two different slices at one position."""
    keep = [0]
    for i in range(1, len(files)):
        j = keep[-1]
        same_pos = z is not None and abs(z[i] - z[j]) < 1e-3
        if not same_pos:
            keep.append(i)
            continue
        if str(heads[i].get("SOPInstanceUID", "a")) == str(heads[j].get("SOPInstanceUID", "b")):
            continue                                        # the same file twice
        raise DataFileError(folder, f"{files[j].name} and {files[i].name} are two different slices at one position "
                                    f"({z[i]:.3f} mm along the normal): duplicates, or several acquisitions/echoes "
                                    "in one folder; remove the duplicates or split the folder")
    return keep


def _spacing_along(folder, files, heads, z, notes) -> tuple[float, np.ndarray]:
    """(slice step in mm, the index of each slice on the even grid of that step: 0..D-1 with the
    missing slices' indices absent)."""
    grid = np.arange(len(files))
    if z is None or len(z) < 2:
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            v = _floats([heads[0].get(key)], 1) if heads[0].get(key) is not None else None
            if v is not None and v[0] > 0:
                return v[0], grid
        notes.append("slice spacing unknown: 1 mm assumed")
        return 1.0, grid
    d = np.diff(z)
    step = float(np.median(d))
    steps = np.round(d / step)
    off = np.abs(d - np.maximum(steps, 1) * step) > max(GAP_TOLERANCE * step, 1e-3)
    if off.any():
        k = int(np.argmax(off))
        raise DataFileError(folder, f"slices are not evenly spaced: {d[k]:.3g} mm between {files[k].name} and "
                                    f"{files[k + 1].name} where the others are {step:.3g} mm apart (not a gap of "
                                    "whole slices); resample the series into one NIfTI file")
    grid = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    missing = int(grid[-1]) + 1 - len(files)
    if missing > MAX_MISSING_FRACTION * (grid[-1] + 1):
        raise DataFileError(folder, f"{missing} of {grid[-1] + 1} slices are missing (gaps in the positions every "
                                    f"{step:.3g} mm), more than {MAX_MISSING_FRACTION:.0%} can be filled in; complete "
                                    "the series (or resample it into one NIfTI file)")
    return step, grid


def _fill_gaps(vol: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``vol [n, H, W]`` of the slices at ``grid`` -> ``[grid[-1] + 1, H, W]``, the missing slices
    linearly interpolated between their neighbours."""
    full = np.empty((int(grid[-1]) + 1, *vol.shape[1:]), np.float32)
    full[grid] = vol
    for a, b in zip(grid[:-1], grid[1:]):
        for k in range(a + 1, b):
            t = (k - a) / (b - a)
            full[k] = (1 - t) * full[a] + t * full[b]
    return full


def _pixels(folder, files, heads, window, grid) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    rows, cols = int(heads[0].get("Rows", 0)), int(heads[0].get("Columns", 0))
    for f, h in zip(files, heads):
        if (int(h.get("Rows", 0)), int(h.get("Columns", 0))) != (rows, cols):
            raise DataFileError(folder, f"{f.name} is {h.get('Rows')}x{h.get('Columns')} but {files[0].name} is "
                                        f"{rows}x{cols}; a volume needs one slice size: split the folder")
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            raise DataFileError(folder, f"{f.name} is a multi-frame file (a volume itself); give it as a file, "
                                        "not in a folder with other slices")
        if int(h.get("SamplesPerPixel", 1) or 1) != 1:
            raise DataFileError(folder, f"{f.name} is a colour image; series folders are read as grey volumes")
    R.check_size(folder, (int(grid[-1]) + 1, rows, cols), "DICOM series")
    vol = np.empty((len(files), rows, cols), np.float32)
    ref = None
    for k, f in enumerate(files):
        ds = None
        try:
            ds = pydicom.dcmread(f, force=True)
            vol[k] = apply_modality_lut(ds.pixel_array, ds)
        except Exception as exc:  # noqa: BLE001
            reason = R.decode_failure(ds, exc) if ds is not None else f"cannot read the file ({exc})"
            raise DataFileError(f, f"{reason}; this is a slice of series {folder}: replace or remove it") from exc
        if k == len(files) // 2:
            ref = ds
    if len(files) < grid[-1] + 1:
        vol = _fill_gaps(vol, grid)
    mono1 = str(ref.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    windowed = False
    if window == "auto":
        if ref.get("VOILUTSequence"):
            vol, windowed = R._voi_lut_unit(vol, ref).astype(np.float32), True
        elif "WindowCenter" in ref and "WindowWidth" in ref:
            vol, windowed = np.asarray(R._window_unit(vol, ref), dtype=np.float32), True
    if mono1:
        vol = (1.0 - vol) if windowed else (vol.min() + vol.max()) - vol
    return vol


def read_series(folder, *, window: str = "auto", series: str | None = None) -> Series:
    """Read the DICOM files directly in ``folder`` as one volume (see the module docstring).

    ``window``: "auto" (apply the middle slice's VOI window, scaled to [0, 1]) or "none" (modality
    values, e.g. HU). ``series``: the SeriesInstanceUID, or the case name (:func:`series_names`), of
    the series to read when the folder holds several.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFileError(folder, "is not a folder; a DICOM series is a folder of one file per slice")
    files = dicom_files(folder)
    if not files:
        raise DataFileError(folder, "holds no DICOM files (.dcm, .dicom, or files with the DICM marker)")
    heads = _headers(folder, files)
    files, heads = _pick_series(folder, files, heads, series)
    order, z, normal, sorted_by, notes, orientation = _order(folder, files, heads)
    files, heads = [files[i] for i in order], [heads[i] for i in order]
    keep = _dedupe(folder, files, heads, z)
    if len(keep) < len(files):
        notes.append(f"{len(files) - len(keep)} repeated file(s) of the same instance read once")
    files, heads = [files[i] for i in keep], [heads[i] for i in keep]
    z = z[keep] if z is not None else None
    step, grid = _spacing_along(folder, files, heads, z, notes)
    pixel = _floats(heads[0].get("PixelSpacing"), 2)
    if pixel is None:
        notes.append("no PixelSpacing: 1 mm pixels assumed")
        pixel = (1.0, 1.0)
    vol = _pixels(folder, files, heads, window, grid)
    missing = sorted(set(range(int(grid[-1]) + 1)) - set(grid.tolist()))
    if missing:
        where = f"series {series!r} of " if series is not None else ""
        text = (f"{len(missing)} slice(s) missing (gaps in the positions, every {step:.3g} mm), filled by linear "
                f"interpolation between their neighbours: volume slice(s) {', '.join(map(str, missing[:8]))}"
                + (", ..." if len(missing) > 8 else ""))
        notes.append(text)
        warnings.warn(f"{where}{folder}: {text}; complete the series if they matter", stacklevel=2)
    origin = _floats(heads[0].get("ImagePositionPatient"), 3)
    return Series(volume=vol[None], spacing=(float(step), float(pixel[0]), float(pixel[1])), files=files,
                  origin=origin, normal=normal, series_uid=str(heads[0].get("SeriesInstanceUID", "")) or None,
                  description=str(heads[0].get("SeriesDescription", "")).strip(), sorted_by=sorted_by, notes=notes,
                  orientation=orientation, missing=missing)


def header_spacing(folder) -> tuple[tuple[float, float, float], tuple[int, int, int]] | None:
    """``(spacing (D, H, W) mm, shape (D, H, W))`` of a series folder (or series case) from its first file's header
    alone (slice spacing: SpacingBetweenSlices, else SliceThickness), for display; None when unknown."""
    import pydicom

    files = series_files(folder)
    if not files:
        return None
    ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    pixel = _floats(ds.get("PixelSpacing"), 2)
    step = next((v[0] for v in (_floats([ds.get(k)], 1) for k in ("SpacingBetweenSlices", "SliceThickness")
                                if ds.get(k) is not None) if v is not None and v[0] > 0), None)
    if pixel is None or step is None:
        return None
    return (float(step), pixel[0], pixel[1]), (len(files), int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))


def describe_series(s: Series) -> str:
    """One line: what was read, e.g. ``DICOM series of 40 slices 256x256 (sorted by position), spacing
    4 x 0.9 x 0.9 mm``."""
    d, h, w = s.volume.shape[1:]
    text = (f"DICOM series of {d} slice(s) {h}x{w} (sorted by {s.sorted_by}), spacing "
            + " x ".join(f"{v:.3g}" for v in s.spacing) + " mm")
    return text + ("; " + "; ".join(s.notes) if s.notes else "")
