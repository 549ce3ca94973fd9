"""Format readers behind :func:`counterlens.data.images.load_image`.

Every reader takes a path and returns a float32 array ``[C, *S]`` in *data space*
(what a viewer shows), with ``S = (H, W)`` for 2-D images and ``S = (D, H, W)``
for volumes. Readers raise :class:`~counterlens.errors.DataFileError` only.

Data space, by format:

* 8-bit (PNG/JPEG/BMP/TIFF/.npy ``uint8``): ``value / 255``; 16-bit: ``value / 65535``;
  ``bool``: 0/1; float: as stored; other integer types (e.g. signed ``int16``): as stored.
* DICOM: modality LUT (RescaleSlope/Intercept, e.g. Hounsfield units), then the
  VOI LUT / window scaled to [0, 1] when the file has one (and ``window="auto"``).
  MONOCHROME1 is inverted so that higher always means brighter.
* NIfTI: reoriented to RAS+ and ``get_fdata`` (scl_slope/scl_inter applied).

What the readers share (suffixes, recognising a file, the size limit, stored values -> data space)
is in :mod:`counterlens.data._formats`, re-exported here.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataFileError
# re-exported: the suffixes, file recognition, size check and stored-value conventions every reader shares
from ._formats import (DICOM_SUFFIXES, MAX_ELEMENTS, NIFTI_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES,  # noqa: F401
                       check_size, is_dicom_file, scale_stored, sniff, suffix_of, to_channels_first)


# --------------------------------------------------------------------------- Pillow
def read_pil(path, hint: tuple[int, int] | None = None) -> np.ndarray:
    """PNG / JPEG / BMP via Pillow -> ``[C, H, W]`` (C = 1 or 3).

    Modes: 1/L/LA -> grey; I;16* -> /65535; I (16-bit PNG in some Pillow versions) -> /65535;
    F -> as stored; P/PA/RGBA/CMYK/YCbCr/... -> RGB. Alpha is dropped (colour kept as stored,
    not composited). EXIF orientation is applied (as a viewer would).
    Note: Pillow reduces 48-bit RGB PNGs to 8 bits per channel (values still /255).

    ``hint``: the ``(height, width)`` the image will be resized to. An image at least 8x larger on
    both sides is first reduced cheaply to about four times that (JPEG: decoded at a lower DCT scale;
    others: Pillow's box ``reduce``), so a 6000 x 6000 photo for a 64 x 64 model is not decoded
    and resized at full resolution; the anti-aliased resize to the final size follows.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            factor = 1
            if hint is not None:
                factor = min(im.size[0] // max(1, hint[1]), im.size[1] // max(1, hint[0])) // 4
                if factor >= 2 and im.format == "JPEG":
                    im.draft(im.mode, (im.size[0] // factor, im.size[1] // factor))
                    factor = 1
            im = ImageOps.exif_transpose(im)
            im.load()
            if factor >= 2:
                try:
                    im = im.reduce(factor)
                except (ValueError, NotImplementedError):   # a mode reduce does not take: full resolution
                    pass
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types
        raise DataFileError(path, f"cannot read the image ({exc}); the file may be corrupt, truncated "
                                  "or not really the format its suffix says. Re-export it or remove it.") from exc
    mode = im.mode
    if mode == "1":
        arr = np.asarray(im, dtype=np.float32)
    elif mode in ("L", "LA"):
        arr = np.asarray(im.getchannel(0), dtype=np.uint8)
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataFileError(path, "32-bit integer image with values outside 0..65535 is not supported; "
                                      "save it as 16-bit, or as float TIFF / .npy")
        arr = arr.astype(np.uint16)
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
    else:  # RGB, RGBA, P, PA, CMYK, YCbCr, LAB, HSV, ...
        if mode in ("P", "PA"):
            im = im.convert("RGBA")
        arr = np.asarray(im.convert("RGB") if im.mode != "RGBA" else im)[..., :3]
        return np.ascontiguousarray(np.moveaxis(scale_stored(arr), -1, 0))
    return scale_stored(arr)[None]


# --------------------------------------------------------------------------- TIFF
def read_tiff(path) -> np.ndarray:
    """TIFF via tifffile -> ``[C, H, W]`` or ``[1, D, H, W]`` for a page stack.

    Samples (S) become channels (RGB keeps 3, grey keeps 1: alpha/extra samples dropped),
    a palette image is mapped through its colour map, MINISWHITE is inverted.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_size(path, series.shape, "TIFF image")
            axes, arr = series.axes, series.asarray()
            page = tif.pages[0]
            photometric, colormap = int(page.photometric), page.colormap
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFileError(path, f"cannot read the TIFF file ({exc}); it may be corrupt or use an "
                                  "unsupported compression. Re-export it.") from exc
    if photometric == 3 and colormap is not None:  # PALETTE
        arr = np.moveaxis(colormap[:, arr], 0, -1)
        axes, photometric = axes + "S", 2
    if "S" in axes:
        arr = np.moveaxis(arr, axes.index("S"), 0)
        axes = "S" + axes.replace("S", "")
        arr = arr[:3] if photometric in (2, 6) and arr.shape[0] >= 3 else arr[:1]
    else:
        arr, axes = arr[None], "S" + axes
    keep = [i for i, a in enumerate(axes) if a in "SYX" or arr.shape[i] > 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    if arr.ndim not in (3, 4):
        raise DataFileError(path, f"TIFF with axes {series.axes} and shape {series.shape} has more than one "
                                  "non-spatial axis; save a single 2-D image or one 3-D stack per file")
    out = scale_stored(arr)
    if photometric == 0:  # MINISWHITE: make higher = brighter
        out = (1.0 - out) if arr.dtype in (np.uint8, np.uint16) else (out.min() + out.max()) - out
    return out.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- NumPy
def read_npy(path) -> np.ndarray:
    """``.npy`` (no pickles) -> ``[C, *S]``, see :func:`to_channels_first`."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
        check_size(path, arr.shape, ".npy array")
        arr = np.array(arr)
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFileError(path, f"cannot read the .npy file ({exc}); save it with numpy.save from a "
                                  "numeric array (object arrays are not loaded)") from exc
    try:
        out = scale_stored(np.asarray(arr))
    except TypeError as exc:
        raise DataFileError(path, f"{exc}; store a numeric array") from exc
    return to_channels_first(out, path)


# --------------------------------------------------------------------------- DICOM
def _window_unit(arr: np.ndarray, ds) -> np.ndarray:
    """Apply the dataset's window (WindowCenter/Width, VOILUTFunction) mapped onto [0, 1].

    Uses pydicom's ``apply_windowing`` on a minimal dataset whose output range is 0..1
    (BitsStored=1, unsigned, no rescale), so the DICOM formulas are pydicom's own.
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    mini = Dataset()
    mini.PhotometricInterpretation = "MONOCHROME2"
    mini.BitsStored, mini.PixelRepresentation = 1, 0
    for key in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if key in ds:
            mini[key] = ds[key]
    return apply_windowing(arr, mini)


def _voi_lut_unit(arr: np.ndarray, ds) -> np.ndarray:
    """Apply the first VOI LUT Sequence item, scaled to [0, 1] by its bits per entry.

    Done here rather than with ``pydicom.pixels.apply_voi``: pydicom 3.0 computes the LUT
    index in the *output* dtype, so with an 8-bit LUT any index above 255 wraps around.
    """
    item = ds.VOILUTSequence[0]
    n, first, depth = (int(v) for v in item.LUTDescriptor)
    n = n or 2 ** 16
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
        data = np.frombuffer(data, dtype="<u2" if ds.original_encoding[1] is not False else ">u2")
    lut = np.asarray(data, dtype=np.float64).ravel()[:n]
    idx = np.clip(np.round(arr) - first, 0, len(lut) - 1).astype(np.int64)
    return lut[idx] / (2 ** depth - 1)


#: The decoders counterlens installs for compressed DICOM (core dependencies, see pyproject.toml).
DICOM_DECODERS = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"


def decode_failure(ds, exc: Exception) -> str:
    """One line: why the pixel data did not decode; for a compressed transfer syntax its name and UID,
    and the decoders to install (when one is missing) or, when all are there and failed, that the data
    is damaged or a variant they do not read (pydicom's ``JPEG-lossy.dcm``) and how to convert it."""
    import importlib.util

    reason = " ".join(str(exc).split())                 # pydicom lists one line per plugin: keep one line
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not getattr(ts, "is_compressed", False):
        return f"cannot read DICOM pixel data ({reason}); the file may be corrupt or truncated: re-export it"
    head = f"cannot decode its {ts.name} ({ts}) pixel data ({reason})"
    missing = [pkg for pkg, mod in zip(DICOM_DECODERS.split(), ("pylibjpeg", "libjpeg", "openjpeg", "rle"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        return (f"{head}; install the decoders counterlens depends on: pip install {' '.join(missing)} "
                "(or convert the file to uncompressed DICOM: gdcmconv --raw, dcmdjpeg)")
    return (f"{head}; the installed decoders ({DICOM_DECODERS}) cannot read it, so the compressed data is damaged or "
            "a variant they do not support: convert it to uncompressed DICOM with another tool (gdcmconv --raw, "
            "dcmdjpeg) or re-export it")


def read_dicom(path, window: str = "auto") -> np.ndarray:
    """DICOM via pydicom -> ``[C, H, W]``, or ``[1, D, H, W]`` for multi-frame files.

    Grey: modality LUT (e.g. HU); with ``window="auto"`` and a VOI LUT Sequence or
    WindowCenter/WindowWidth (first of several), the VOI result scaled to [0, 1].
    MONOCHROME1: ``1 - v`` after windowing, ``(min + max) - v`` without.
    Colour (RGB/YBR, decoded to RGB by pydicom): divided by ``2**BitsStored - 1``;
    PALETTE COLOR: mapped through the colour LUT (8- or 16-bit entries). RT dose: DoseGridScaling (Gy).
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = None
    other = None if is_dicom_file(path) else sniff(path)
    if other is not None:
        raise DataFileError(path, f"is {other}, not a DICOM file (it has a DICOM suffix); rename it to its real "
                                  "suffix")
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            if not is_dicom_file(path):
                raise DataFileError(path, "is not a DICOM file (no DICM marker at byte 128 and no pixel data); "
                                          "check that it is an image, and its suffix")
            raise DataFileError(path, "DICOM file has no pixel data (is it a DICOMDIR, report or "
                                      "segmentation object?); give the image files instead")
        check_size(path, [ds.get("Rows", 0), ds.get("Columns", 0), ds.get("NumberOfFrames", 1) or 1,
                          ds.get("SamplesPerPixel", 1) or 1], "DICOM image")
        raw = ds.pixel_array
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFileError(path, decode_failure(ds, exc)) from exc
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":  # LUT entries are 8 or 16 bit
        raw = apply_color_lut(raw, ds)
        bits = 8 if raw.dtype == np.uint8 else 16
    else:
        bits = int(ds.get("BitsStored", 8))
    if raw.ndim >= 3 and raw.shape[-1] == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # colour (decoded to RGB by pydicom): [(F,) H, W, 3] -> [3, (F,) H, W]
        out = raw.astype(np.float32) / np.float32(2 ** bits - 1)
        return np.ascontiguousarray(np.moveaxis(out, -1, 0))
    vals = apply_modality_lut(raw, ds)
    if "DoseGridScaling" in ds and "RescaleSlope" not in ds:  # RT dose -> Gy
        vals = vals * float(ds.DoseGridScaling)
    mono1 = photometric == "MONOCHROME1"
    windowed = False
    if window == "auto":
        if ds.get("VOILUTSequence"):
            vals = _voi_lut_unit(vals, ds)
            windowed = True
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            try:
                vals = _window_unit(vals, ds)
            except ValueError as exc:
                raise DataFileError(path, f"invalid DICOM window ({exc}); use window='none'") from exc
            windowed = True
    vals = np.asarray(vals, dtype=np.float32)
    if mono1:
        vals = (1.0 - vals) if windowed else (vals.min() + vals.max()) - vals
    return vals[None].astype(np.float32, copy=False)


# --------------------------------------------------------------------------- NIfTI
def read_nifti(path, frame: int = 0) -> np.ndarray:
    """NIfTI (``.nii``, ``.nii.gz``) via nibabel -> ``[1, D, H, W]`` in RAS+ (``as_closest_canonical``).

    Axis order: D = inferior -> superior (axial slices), H = anterior -> posterior
    (the nose points up in an ``imshow``), W = patient left -> right (neurological
    convention: the patient's left is on the image left).
    A 4-D file (a time series, e.g. fMRI or DWI) gives its volume number ``frame`` (default 0, the
    first; :func:`nifti_description` says so); only that frame is read from disk.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        check_size(path, img.shape, "NIfTI volume")
        if len(img.shape) == 4 and img.shape[3] > 1:
            if not -img.shape[3] <= frame < img.shape[3]:
                raise DataFileError(path, f"frame={frame} does not fit this 4-D file of {img.shape[3]} volumes; "
                                          f"use 0..{img.shape[3] - 1}")
            img = img.slicer[..., frame]
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFileError(path, f"cannot read the NIfTI file ({exc}); it may be corrupt or truncated") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataFileError(path, f"NIfTI data has shape {data.shape}; only 3-D volumes (or 4-D with one "
                                  "volume) are supported. Extract one volume, e.g. with nibabel.four_to_three")
    vol = data.transpose(2, 1, 0)[:, ::-1, :]  # (R, A, S) -> (S, P, R)
    return np.ascontiguousarray(vol)[None]


def nifti_spacing(path) -> tuple[float, float, float]:
    """Voxel size (D, H, W) in mm of a NIfTI file as :func:`read_nifti` orients it (header only)."""
    import nibabel as nib

    img = nib.load(str(path))
    ras = nib.orientations.io_orientation(img.affine)          # per voxel axis: (RAS axis, flip)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    by_ras = {int(ax): zooms[i] for i, (ax, _) in enumerate(ras[:3])}
    return by_ras.get(2, 1.0), by_ras.get(1, 1.0), by_ras.get(0, 1.0)


def nifti_description(path, frame: int = 0) -> str:
    """One line: what :func:`read_nifti` reads from this file, e.g. ``NIfTI 4-D, 12 volumes: volume 0
    taken; 30 x 64 x 64 voxels of 4 x 3 x 3 mm``."""
    import nibabel as nib

    img = nib.load(str(path))
    head = f"NIfTI {len(img.shape)}-D"
    if len(img.shape) == 4 and img.shape[3] > 1:
        head += f", {img.shape[3]} volumes: volume {frame} taken"
    d, h, w = nifti_spacing(path)
    ras = nib.orientations.io_orientation(img.affine)
    n = {int(ax): int(img.shape[i]) for i, (ax, _) in enumerate(ras[:3])}
    return f"{head}; {n.get(2, 1)} x {n.get(1, 1)} x {n.get(0, 1)} voxels of {d:.3g} x {h:.3g} x {w:.3g} mm"
