"""Tests for counterlens.data.images on files shipped with pydicom/nibabel or generated here."""
from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file

from counterlens.data.images import IMAGE_SUFFIXES, ImageFolder, ImageRecord, load_image, load_mask
from counterlens.errors import DataFileError, InputError

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
ANAT = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")


def _png(path, arr, mode=None):
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def _ramp(h=16, w=20):
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM
def test_ct_modality_lut_gives_hu():
    ds = pydicom.dcmread(CT)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = load_image(CT, window="none")
    assert out.shape == (1, 128, 128) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], hu.astype(np.float32))
    assert out[0, 64, 64] == np.float32(ds.pixel_array[64, 64] * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    auto = load_image(CT)
    if "WindowCenter" in ds:
        assert auto.min() >= 0 and auto.max() <= 1
    else:  # CT_small.dcm has no window: HU are kept
        np.testing.assert_array_equal(auto, out)


def test_ct_with_window_is_scaled_to_unit(tmp_path):
    ds = pydicom.dcmread(CT)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    path = tmp_path / "ct_win.dcm"
    ds.save_as(path)
    out = load_image(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1), computed independently
    expected = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    np.testing.assert_array_equal(load_image(path, window="none")[0], hu.astype(np.float32))


def test_mr_small_loads_windowed_and_raw():
    ds = pydicom.dcmread(MR)
    out = load_image(MR)
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1 and out.max() > out.min()
    np.testing.assert_array_equal(load_image(MR, window="none")[0], ds.pixel_array.astype(np.float32))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inv = tmp_path / "mono1.dcm"
    ds.save_as(inv)
    np.testing.assert_array_equal(load_image(inv), 1.0 - load_image(MR))
    raw = load_image(MR, window="none")
    np.testing.assert_array_equal(load_image(inv, window="none"), (raw.min() + raw.max()) - raw)


def test_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    ds = pydicom.dcmread(MR)
    for key in ("WindowCenter", "WindowWidth"):
        if key in ds:
            del ds[key]
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 1000, 8])  # LUTDescriptor: entries, first mapped, bits
    item.add_new(0x00283006, "US", list(range(256)))  # LUTData
    ds.VOILUTSequence = [item]
    path = tmp_path / "voilut.dcm"
    ds.save_as(path)
    expected = np.clip(ds.pixel_array.astype(np.int64) - 1000, 0, 255) / 255
    np.testing.assert_allclose(load_image(path)[0], expected, atol=1e-6)


def test_dicom_without_suffix_detected_by_magic(tmp_path):
    for name in ("scan", "1.2.840.113619.2"):
        shutil.copy(CT, tmp_path / name)
        np.testing.assert_array_equal(load_image(tmp_path / name), load_image(CT))


def test_truncated_dicom_raises():
    with pytest.raises(DataFileError, match="MR_truncated"):
        load_image(get_testdata_file("MR_truncated.dcm"))


# ----------------------------------------------------------------------------- NIfTI
def test_nifti_volume_and_middle_slice():
    canon = nib.as_closest_canonical(nib.load(ANAT))
    x, y, z = canon.shape[:3]
    vol = load_image(ANAT, slice_index=None)
    assert vol.shape == (1, z, y, x) and vol.dtype == np.float32
    mid = load_image(ANAT)
    assert mid.shape == (1, y, x)
    np.testing.assert_array_equal(mid, vol[:, z // 2])
    np.testing.assert_array_equal(load_image(ANAT, slice_index=3), vol[:, 3])
    with pytest.raises(DataFileError, match="slice_index"):
        load_image(ANAT, slice_index=z)


def test_nifti_canonical_orientation(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((4, 5, 6)).astype(np.float32)  # (R, A, S) voxel grid
    data[0, 4, 5] = 7.0  # most left, most anterior, most superior
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ras.nii")
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [3, 4, 0]
    nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps_affine), tmp_path / "lps.nii.gz")
    ras = load_image(tmp_path / "ras.nii", slice_index=None)
    lps = load_image(tmp_path / "lps.nii.gz", slice_index=None)
    assert ras.shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(ras, lps)
    # D = inferior->superior, H = anterior->posterior, W = left->right
    assert ras[0, 5, 0, 0] == 7.0


def test_nifti_scl_slope_applied(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "s.nii")
    vol = load_image(tmp_path / "s.nii", slice_index=None)
    assert vol.min() == 1.0 and vol.max() == 2.0 * 23 + 1.0


# ----------------------------------------------------------------------------- 2-D formats
def test_16bit_png_and_tiff(tmp_path):
    a = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    expected = a.astype(np.float32) / np.float32(65535)
    _png(tmp_path / "a.png", a)
    tifffile.imwrite(tmp_path / "a.tif", a)
    for name in ("a.png", "a.tif"):
        out = load_image(tmp_path / name)
        assert out.shape == (1, 12, 10) and out.dtype == np.float32
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-7)


def test_float_tiff_and_npy_kept(tmp_path):
    f = np.linspace(-1000, 3000, 30, dtype=np.float32).reshape(5, 6)
    tifffile.imwrite(tmp_path / "f.tiff", f)
    np.save(tmp_path / "f.npy", f)
    np.save(tmp_path / "u8.npy", _ramp())
    np.testing.assert_array_equal(load_image(tmp_path / "f.tiff")[0], f)
    np.testing.assert_array_equal(load_image(tmp_path / "f.npy")[0], f)
    np.testing.assert_allclose(load_image(tmp_path / "u8.npy")[0], _ramp() / 255, atol=1e-7)


def test_rgb_tiff_and_tiff_stack(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.tif"), rgb.transpose(2, 0, 1) / 255, atol=1e-7)
    stack = np.random.default_rng(2).random((5, 6, 7)).astype(np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    np.testing.assert_array_equal(load_image(tmp_path / "stack.tif", slice_index=None), stack[None])
    np.testing.assert_array_equal(load_image(tmp_path / "stack.tif"), stack[None, 2])


def test_8bit_grey_rgb_rgba_palette_la(tmp_path):
    g = _ramp()
    rgb = np.stack([g, 255 - g, g // 2], -1)
    rgba = np.dstack([rgb, np.full_like(g, 7)])
    np.testing.assert_allclose(load_image(_png(tmp_path / "g.png", g))[0], g / 255, atol=1e-7)
    out = load_image(_png(tmp_path / "rgb.png", rgb))
    assert out.shape == (3, 16, 20)
    np.testing.assert_allclose(out, rgb.transpose(2, 0, 1) / 255, atol=1e-7)
    np.testing.assert_allclose(load_image(_png(tmp_path / "rgba.png", rgba)), rgb.transpose(2, 0, 1) / 255,
                               atol=1e-7)  # alpha dropped, colour as stored
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    expected = np.asarray(pal.convert("RGB")).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(load_image(tmp_path / "p.png"), expected, atol=1e-7)
    Image.fromarray(np.dstack([g, g]), "LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(load_image(tmp_path / "la.png")[0], g / 255, atol=1e-7)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.bmp"), rgb.transpose(2, 0, 1) / 255, atol=1e-7)


def test_jpeg_approx(tmp_path):
    g = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    Image.fromarray(g).save(tmp_path / "g.jpeg", quality=95)
    out = load_image(tmp_path / "g.jpeg")
    assert out.shape == (1, 32, 32)
    assert np.abs(out[0] - g / 255).max() < 0.05


def test_channels_conversion(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    _png(tmp_path / "rgb.png", rgb)
    grey = load_image(tmp_path / "rgb.png", channels=1)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    assert grey.shape == (1, 8, 9)
    np.testing.assert_allclose(grey[0], expected, atol=1e-6)
    g3 = load_image(_png(tmp_path / "g.png", _ramp()), channels=3)
    assert g3.shape == (3, 16, 20)
    np.testing.assert_array_equal(g3[0], g3[2])
    with pytest.raises(InputError):
        load_image(tmp_path / "g.png", channels=2)


def test_resize(tmp_path):
    _png(tmp_path / "c.png", np.full((40, 30), 128, np.uint8))
    out = load_image(tmp_path / "c.png", size=(20, 10))
    assert out.shape == (1, 20, 10)
    np.testing.assert_allclose(out, 128 / 255, atol=1e-6)  # data-space values kept
    _png(tmp_path / "r.png", _ramp(40, 40))
    small = load_image(tmp_path / "r.png", size=10)
    assert small.shape == (1, 10, 10) and 0 <= small.min() and small.max() <= 1
    cube = load_image(ANAT, slice_index=None, size=8)
    assert cube.shape == (1, 8, 8, 8)
    with pytest.raises(DataFileError, match="3 dims"):
        load_image(tmp_path / "c.png", size=(4, 4, 4))
    rgb = np.zeros((30, 30, 3), np.uint8)
    rgb[..., 0] = 255
    red = load_image(_png(tmp_path / "red.png", rgb), size=7)
    np.testing.assert_allclose(red, np.stack([np.ones((7, 7)), np.zeros((7, 7)), np.zeros((7, 7))]), atol=1e-6)
    for bad in ((0, 4), (1, 2, 3, 4), "big", 2.5, True):
        with pytest.raises(InputError):
            load_image(tmp_path / "c.png", size=bad)


def test_load_mask_nearest_stays_boolean(tmp_path):
    m = np.zeros((40, 40), np.uint8)
    m[:20, :20] = 255
    m[30, 30] = 3
    _png(tmp_path / "m.png", m)
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.shape == (40, 40) and mask.sum() == 401
    small = load_mask(tmp_path / "m.png", size=(10, 10))
    assert small.dtype == bool and small.shape == (10, 10)
    assert small[:5, :5].all() and not small[5:, :5].any() and not small[:5, 5:].any()


def test_bad_files_raise_data_file_error(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "x.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(DataFileError, match="x.png"):
        load_image(tmp_path / "x.png")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataFileError, match="unsupported"):
        load_image(tmp_path / "x.gif")
    nan = np.ones((4, 4), np.float32)
    nan[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataFileError, match="NaN"):
        load_image(tmp_path / "nan.npy")
    np.save(tmp_path / "line.npy", np.ones(5, np.float32))
    with pytest.raises(DataFileError, match="shape"):
        load_image(tmp_path / "line.npy")
    with pytest.raises(DataFileError, match="folder"):
        load_image(tmp_path)
    assert ".nii.gz" in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------- ImageFolder
def _class_tree(root, names=("glioma", "notumor")):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(3):
            _png(root / name / f"{name}_{j}.png", np.full((8 + k, 8), 40 * j + k, np.uint8))
    (root / names[0] / ".hidden.png").write_bytes(b"junk")
    (root / names[0] / "notes.txt").write_text("not an image")
    return root


def test_class_subfolder_layout(tmp_path):
    ds = ImageFolder(_class_tree(tmp_path / "Testing"), size=8)
    assert ds.classes == ["glioma", "notumor"] and len(ds) == 6
    assert [r.label for r in ds.records] == [0, 0, 0, 1, 1, 1]
    assert [r.path.name for r in ds.records] == [f"{c}_{j}.png" for c in ("glioma", "notumor") for j in range(3)]
    assert all(isinstance(r, ImageRecord) and r.mask_path is None for r in ds.records)
    img, label, mask = ds.load(4)
    assert img.shape == (1, 8, 8) and label == 1 and mask is None
    again = ImageFolder(tmp_path / "Testing", size=8)
    assert [r.path for r in again.records] == [r.path for r in ds.records]
    assert [r.label for r in ImageFolder(tmp_path / "Testing", limit=2).records] == [0, 1]


def test_class_name_mapping(tmp_path):
    root = _class_tree(tmp_path / "test", names=("NORMAL", "PNEUMONIA"))
    ds = ImageFolder(root, classes=["pneumonia", "normal"])
    assert ds.classes == ["pneumonia", "normal"]
    assert [r.label for r in ds.records] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(InputError, match="NORMAL"):
        ImageFolder(root, classes=["covid", "pneumonia"])


def test_flat_folder_and_single_file(tmp_path):
    for j in range(3):
        _png(tmp_path / f"img{j}.png", _ramp())
    (tmp_path / "notes.txt").write_text("x")
    assert len(ImageFolder(tmp_path)) == 3
    shutil.copy(CT, tmp_path / "zz_scan")  # DICOM without suffix is found by its magic
    assert ImageFolder(tmp_path).records[-1].path.name == "zz_scan"
    (tmp_path / "zz_scan").unlink()
    ds = ImageFolder(tmp_path, channels=3)
    assert len(ds) == 3 and ds.classes == [] and all(r.label is None for r in ds.records)
    assert ds.load(0)[0].shape == (3, 16, 20)
    one = ImageFolder(tmp_path / "img1.png")
    assert len(one) == 1 and one.records[0].label is None
    np.testing.assert_array_equal(one.load(0)[0], load_image(tmp_path / "img1.png"))
    with pytest.raises(DataFileError, match="notes.txt"):
        ImageFolder(tmp_path / "notes.txt")


def test_masks_by_stem(tmp_path):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir(), (masks / "sub").mkdir(parents=True)
    for name in ("a", "b", "c"):
        _png(imgs / f"{name}.png", _ramp(16, 16))
    m = np.zeros((32, 32), np.uint8)
    m[:16] = 1
    _png(masks / "a.png", m)
    nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.uint8), np.eye(4)), masks / "sub" / "b.nii.gz")
    ds = ImageFolder(imgs, masks=masks, size=8)
    by_name = {r.path.name: r.mask_path for r in ds.records}
    assert by_name == {"a.png": masks / "a.png", "b.png": masks / "sub" / "b.nii.gz", "c.png": None}
    img, _, mask = ds.load(0)
    assert mask.dtype == bool and mask.shape == img.shape[1:] == (8, 8)
    assert mask[:4].all() and not mask[4:].any()
    assert ds.load(1)[2].all() and ds.load(2)[2] is None


def test_corrupt_file_in_folder(tmp_path):
    for j in range(3):
        _png(tmp_path / f"ok{j}.png", _ramp())
    (tmp_path / "x.png").write_bytes(os.urandom(200))
    ds = ImageFolder(tmp_path)
    bad = [r.path.name for r in ds.records].index("x.png")
    with pytest.raises(DataFileError, match="x.png") as info:
        ds.load(bad)
    assert info.value.path.endswith("x.png")
    batches = list(ds.iter_batches(batch_size=4))
    assert len(batches) == 1
    indices, images, labels, masks, failures = batches[0]
    assert images.shape == (3, 1, 16, 20) and images.dtype == np.float32
    assert indices == [i for i in range(4) if i != bad] and labels == [None] * 3 and masks == [None] * 3
    assert [i for i, _ in failures] == [bad] and isinstance(failures[0][1], DataFileError)
    assert [len(b[0]) for b in ds.iter_batches(2)] == [len([i for i in (0, 1) if i != bad]),
                                                       len([i for i in (2, 3) if i != bad])]


def test_mixed_shapes_go_to_failures(tmp_path):
    _png(tmp_path / "a.png", _ramp(16, 20))
    _png(tmp_path / "b.png", _ramp(10, 10))
    (_, images, _, _, failures), = ImageFolder(tmp_path).iter_batches(8)
    assert images.shape == (1, 1, 16, 20) and failures[0][0] == 1 and "size=" in str(failures[0][1])
    (_, images, _, _, failures), = ImageFolder(tmp_path, size=12).iter_batches(8)
    assert images.shape == (2, 1, 12, 12) and not failures


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DataFileError, match="nope"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataFileError, match="no images"):
        ImageFolder(tmp_path / "empty")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_large_images_are_reduced_before_decoding_and_match_the_full_resize(tmp_path, suffix):
    """An image 8x or more larger than the size asked is reduced cheaply first (JPEG DCT scaling,
    Pillow's box reduce); the result stays within about 1% of a full-resolution anti-aliased resize."""
    from counterlens.data import _readers as R
    from counterlens.data.images import _resize
    yy, xx = np.mgrid[0:1024, 0:1024]
    img = ((np.sin(xx / 40.0) + np.cos(yy / 57.0)) * 60 + 128).astype(np.uint8)
    path = tmp_path / f"big{suffix}"
    Image.fromarray(img).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    small = load_image(path, size=32)
    full = _resize(R.read_pil(path), (32, 32), order=1)
    assert small.shape == (1, 32, 32)
    assert np.abs(small - full).max() < 0.03 and np.abs(small - full).mean() < 0.01
    assert R.read_pil(path, hint=(32, 32)).shape[1] <= 1024 // 8          # it really was reduced
