"""Compressed DICOM as hospitals send it (JPEG, JPEG-LS, JPEG 2000, RLE): every compressed file pydicom
ships is read by counterlens' reader with the decoders counterlens installs (pylibjpeg and its plugins),
and equals pydicom's own ``pixel_array`` after the same value mapping; lossless files equal their
uncompressed twins exactly, lossy ones within a tolerance. Files pydicom documents as broken give a
one-line error naming the file, the transfer syntax and the fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from counterlens.data._readers import read_dicom
from counterlens.data.images import load_image
from counterlens.errors import DataFileError

#: Compressed files pydicom ships that no decoder can read, as its test_files/README.txt documents:
#: JPEG-lossy.dcm ("GDCM prints ... Invalid SOS parameters for sequential JPEG"; JPGExtended.dcm is
#: its fixed version) and JPEG2000-embedded-sequence-delimiter.dcm ("almost certainly not a valid
#: JPEG anymore"); UN_sequence.dcm has a compressed transfer syntax but no pixel data.
BROKEN = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}
NO_PIXELS = {"UN_sequence.dcm"}

#: (compressed, uncompressed twin shipped with pydicom, largest difference in data space)
TWINS = [("MR_small_RLE.dcm", "MR_small.dcm", 0.0), ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),
         ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0), ("rtdose_rle.dcm", "rtdose.dcm", 0.0),
         ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm", 0.0),
         ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 4 / 255)]      # lossy JPEG baseline


def _compressed_files() -> list[str]:
    """The compressed files in pydicom's installed test_files folder (recursively): the files pydicom
    ships. ``get_testdata_files`` lists the same ones plus files it would download from pydicom-data
    (not shipped; offline it spends ~15 s failing to fetch them), so the folder is globbed directly."""
    root = Path(get_testdata_file("CT_small.dcm")).parent
    out = []
    for f in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if not f.is_file():
            continue
        try:
            ts = pydicom.dcmread(f, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - not DICOM (pydicom also ships other test data)
            continue
        if ts.is_compressed:
            out.append(str(f))
    return out


COMPRESSED = _compressed_files()


def _expected(ds) -> np.ndarray:
    """pydicom's pixel_array mapped as read_dicom(window="none") maps it: grey -> modality LUT (x
    DoseGridScaling for RT dose), colour -> / (2**BitsStored - 1), channels first."""
    raw = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return np.moveaxis(raw.astype(np.float32) / np.float32(2 ** int(ds.BitsStored) - 1), -1, 0)
    vals = apply_modality_lut(raw, ds)
    if "DoseGridScaling" in ds and "RescaleSlope" not in ds:
        vals = vals * float(ds.DoseGridScaling)
    return np.asarray(vals, dtype=np.float32)[None]


def test_pydicom_ships_the_compressed_syntaxes():
    names = {Path(f).name for f in COMPRESSED}
    assert BROKEN | NO_PIXELS <= names
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name)
                for f in COMPRESSED}
    for family in ("JPEG Baseline", "JPEG Extended", "JPEG Lossless", "JPEG-LS Lossless", "JPEG-LS Lossy",
                   "JPEG 2000 Image Compression", "RLE Lossless"):
        assert any(s.startswith(family) for s in syntaxes), family
    assert len(COMPRESSED) - len(BROKEN | NO_PIXELS) >= 30


@pytest.mark.parametrize("path", [f for f in COMPRESSED if Path(f).name not in BROKEN | NO_PIXELS],
                         ids=lambda f: Path(f).name)
def test_every_compressed_file_reads_as_pydicom_decodes_it(path):
    ds = pydicom.dcmread(path)
    got = read_dicom(path, window="none")
    want = _expected(ds)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    windowed = read_dicom(path)                    # the default: VOI window when the file has one
    if "WindowCenter" in ds and int(ds.get("SamplesPerPixel", 1)) == 1 and not ds.get("VOILUTSequence"):
        assert windowed.min() >= 0.0 and windowed.max() <= 1.0
    assert np.isfinite(windowed).all()


@pytest.mark.parametrize("compressed, plain, tol", TWINS, ids=[t[0] for t in TWINS])
def test_compressed_equals_its_uncompressed_twin(compressed, plain, tol):
    a, b = read_dicom(get_testdata_file(compressed)), read_dicom(get_testdata_file(plain))
    assert a.shape == b.shape
    if tol == 0.0:
        assert np.array_equal(a, b)
    else:
        assert 0 < np.abs(a - b).max() <= tol      # lossy: close, not equal


def test_lossy_jpeg_extended_fixed_twin_reads_in_the_loader():
    """JPGExtended.dcm (pydicom: "fixed version of JPEG-lossy.dcm", 12-bit JPEG Extended) loads through
    load_image, and matches the stored values of pydicom's decode."""
    path = get_testdata_file("JPGExtended.dcm")
    img = load_image(path, window="none")
    assert img.shape == (1, 1024, 256)
    np.testing.assert_array_equal(img, _expected(pydicom.dcmread(path)))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_undecodable_file_names_file_syntax_and_fix_in_one_line(name):
    path = get_testdata_file(name)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    with pytest.raises(DataFileError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert uid in msg and "JPEG" in msg
    assert "gdcmconv --raw" in msg and "pylibjpeg" in msg


def test_missing_decoder_says_what_to_install(monkeypatch):
    """Without the decoders (an install that skipped them) the message names the packages to install."""
    import importlib.util

    from counterlens.data import _readers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("libjpeg", "rle")
                        else real(name, *a))
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"), stop_before_pixels=True)
    msg = _readers.decode_failure(ds, RuntimeError("Unable to decode\n  pylibjpeg: no plugin"))
    assert "\n" not in msg and "RLE Lossless" in msg and str(ds.file_meta.TransferSyntaxUID) in msg
    assert "pip install pylibjpeg-libjpeg pylibjpeg-rle" in msg


def test_decoders_are_core_dependencies():
    """pyproject lists the decoders as core dependencies, and constraints.txt pins the tested versions."""
    root = Path(__file__).resolve().parents[1]
    deps = (root / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
    pins = (root / "constraints.txt").read_text()
    for pkg in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"):
        assert f'"{pkg}>=' in deps and f"\n{pkg}==" in pins, pkg
