"""3-D volumes end to end: the synthetic volume set, NIfTI (3-D, .nii.gz, 4-D), DICOM series folders,
the reference 3-D CNN (its maps against the ground-truth tumour masks), the slice viewer's data and
the command line on volumes."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import counterlens as cl
from counterlens.data import _readers as R
from counterlens.data.images import ImageFolder, load_case, load_image
from counterlens.data.series import describe_series, read_series
from counterlens.data.volumes import generate_volumes, make_volume_dataset, write_nifti, write_volume_dataset
from counterlens.errors import DataFileError
from counterlens.model import Classifier, Normalize
from counterlens.models import brain_tumor_cnn3d, build_model
from counterlens.training import train_classifier
from counterlens.viz.report_volumes import peak_slice, plane_slices, shown_spacing, volume_case_limit, volume_view
from conftest import single_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


# -- DICOM series written with pydicom's dataset API --------------------------------------------------
def _orientation(tilt: float):
    """An oblique orthonormal (row, col) pair: the axial frame rotated by ``tilt`` about two axes."""
    c, s = np.cos(tilt), np.sin(tilt)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return rot[:, 0], rot[:, 1]


def write_series(hu: np.ndarray, folder: Path, spacing=(2.5, 0.8, 0.7), tilt=0.3, seed=0, *, names=None,
                 positions=True, series_uid=None, slopes=None, window=None, description="test series"):
    """Write ``hu [D, H, W]`` (integers in HU) as one CT file per slice into ``folder``, in shuffled
    file names; slice k at origin + k * spacing[0] * normal. Returns the file of each slice."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row, col = _orientation(tilt)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    order = rng.permutation(len(hu))
    files = [None] * len(hu)
    for name_idx, k in enumerate(order):
        slope = (slopes[k] if slopes is not None else 1.0)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, "1.2.3"
        ds.SeriesDescription = description
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.InstanceNumber = int(k) + 1
        if positions:
            ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
            ds.ImagePositionPatient = [float(v) for v in np.array([-100.0, 20.0, 5.0]) + k * spacing[0] * normal]
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        stored = np.round((hu[k] + 1024) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        name = names[name_idx] if names else f"1.2.840.{rng.integers(1e9)}"     # UID-like: no order, no suffix
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        files[k] = path
    return files


@pytest.fixture(scope="module")
def ct_volume():
    rng = np.random.default_rng(1)
    return rng.integers(-1000, 2000, size=(7, 12, 10)).astype(np.float32)


def test_dicom_series_round_trip_shuffled_oblique_anisotropic(tmp_path, ct_volume):
    slopes = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]                         # per-slice rescale slopes
    hu = ct_volume.copy()
    hu[1::2] = np.round((hu[1::2] + 1024) / 2) * 2 - 1024                # values a slope of 2 can store
    files = write_series(hu, tmp_path / "s", spacing=(2.5, 0.8, 0.7), tilt=0.3, slopes=slopes)
    s = read_series(tmp_path / "s", window="none")
    assert s.volume.shape == (1, 7, 12, 10)
    np.testing.assert_array_equal(s.volume[0], hu)
    np.testing.assert_allclose(s.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
    assert [f.name for f in s.files] == [f.name for f in files]            # sorted along the normal
    assert s.sorted_by == "position" and "7 slice(s) 12x10 (sorted by position), spacing 2.5 x 0.8 x 0.7 mm" in \
        describe_series(s)
    one = pydicom.dcmread(files[3])                                      # pydicom's own reading of a slice
    np.testing.assert_array_equal(s.volume[0, 3], one.pixel_array * float(one.RescaleSlope) + float(one.RescaleIntercept))
    # the same folder as a case: load_image with a 3-D size, and the loader's choice for a 3-D model
    vol = load_image(tmp_path / "s", size=(7, 12, 10), window="none")
    np.testing.assert_allclose(vol[0], hu)


def test_dicom_series_window_applied_to_the_whole_volume(tmp_path, ct_volume):
    from pydicom.pixels import apply_windowing
    write_series(ct_volume, tmp_path / "s", window=(40, 400))
    s = read_series(tmp_path / "s")                                      # window="auto": the VOI window, 0..1
    ref = pydicom.dcmread(s.files[3])
    ref.BitsStored, ref.PixelRepresentation = 1, 0                      # pydicom's window onto 0..1
    ref.RescaleSlope, ref.RescaleIntercept = 1, 0
    np.testing.assert_allclose(s.volume[0], apply_windowing(ct_volume.astype(np.float64), ref), atol=1e-6)
    assert s.volume.min() == 0 and s.volume.max() == 1


def test_dicom_series_by_instance_number_without_positions(tmp_path, ct_volume):
    write_series(ct_volume, tmp_path / "s", positions=False, spacing=(3.0, 1.0, 1.0))
    s = read_series(tmp_path / "s", window="none")
    np.testing.assert_array_equal(s.volume[0], ct_volume)
    assert s.sorted_by == "instance number" and s.spacing[0] == 3.0 and "InstanceNumber" in s.notes[0]


def test_dicom_series_refused_clearly(tmp_path, ct_volume):
    files = write_series(ct_volume, tmp_path / "gap")
    files[3].unlink()                                                     # one slice missing: filled, and said
    with pytest.warns(UserWarning, match=r"gap: 1 slice\(s\) missing .*interpolation"):
        s = read_series(tmp_path / "gap", window="none")
    assert s.volume.shape == (1, 7, 12, 10) and s.missing == [3] and "1 slice(s) missing" in describe_series(s)
    np.testing.assert_allclose(s.volume[0, 3], (ct_volume[2] + ct_volume[4]) / 2)
    np.testing.assert_array_equal(s.volume[0, [0, 1, 2, 4, 5, 6]], ct_volume[[0, 1, 2, 4, 5, 6]])
    for f in files[1:3]:
        f.unlink()                                                        # 3 of 7 missing: too many to fill
    with pytest.raises(DataFileError, match=r"3 of 7 slices are missing.*more than 25%"):
        read_series(tmp_path / "gap")
    files = write_series(ct_volume, tmp_path / "uneven", seed=6)
    ds = pydicom.dcmread(files[4])                                        # half a step off: not a gap of slices
    ds.ImagePositionPatient = [float(v) + 0.5 * 2.5 * float(n) for v, n in
                               zip(ds.ImagePositionPatient, np.cross(*_orientation(0.3)))]
    ds.save_as(files[4])
    with pytest.raises(DataFileError, match=r"not evenly spaced.*not a gap of whole slices"):
        read_series(tmp_path / "uneven")
    write_series(ct_volume[:4], tmp_path / "mixed", seed=1)
    write_series(ct_volume[4:], tmp_path / "mixed", seed=2)              # a second series in the same folder
    with pytest.raises(DataFileError, match=r"holds 2 DICOM series .*series=NAME .*own folder"):
        read_series(tmp_path / "mixed")                                   # as one volume: which one? (see below)
    uid = generate_uid()
    write_series(ct_volume, tmp_path / "dup", seed=3, series_uid=uid)
    write_series(ct_volume[:1] + 5, tmp_path / "dup", seed=4, series_uid=uid)   # another slice at position 0
    with pytest.raises(DataFileError, match="two different slices at one position"):
        read_series(tmp_path / "dup")
    files = write_series(ct_volume, tmp_path / "copy", seed=5)
    (tmp_path / "copy" / "zz_copy.dcm").write_bytes(files[2].read_bytes())   # the same instance twice: read once
    s = read_series(tmp_path / "copy", window="none")
    np.testing.assert_array_equal(s.volume[0], ct_volume)
    assert "read once" in s.notes[0]


def test_folder_of_several_series_is_one_case_per_series(tmp_path, ct_volume):
    """A study exported flat (two series in one folder) is split by SeriesInstanceUID: one case per series,
    named by its SeriesDescription (path-safe) or, when that is repeated, its UID; orientation recorded."""
    from counterlens.data.headers import file_info
    from counterlens.data.series import series_names
    study = tmp_path / "data" / "a" / "study"
    write_series(ct_volume[:4], study, seed=1, description="T1 AX/post", window=(40, 400))
    write_series(ct_volume[4:], study, seed=2, description="T2")
    write_series(ct_volume, tmp_path / "data" / "b" / "patient2", seed=3)
    vols = ImageFolder(tmp_path / "data", size=(3, 12, 10), window="none")
    ids = [c.id for c in cl.runs.pipeline.cases_of(vols)]
    assert ids == ["a/study/T1 AX_post", "a/study/T2", "b/patient2"]
    assert [vols.classes[r.label] for r in vols.records] == ["a", "a", "b"]
    assert vols.load(1)[0].shape == (1, 3, 12, 10)
    flat = ImageFolder(tmp_path / "data" / "a", size=(3, 12, 10))        # a folder of (mixed) series: no labels
    assert flat.classes == [] and [c.id for c in cl.runs.pipeline.cases_of(flat)] == ["study/T1 AX_post", "study/T2"]
    np.testing.assert_array_equal(load_image(study / "T2", window="none", slice_index=None)[0], ct_volume[4:])
    t1 = read_series(study, series="T1 AX/post".replace("/", "_"))       # by case name (or UID), window applied
    assert t1.volume.shape == (1, 4, 12, 10) and 0 <= t1.volume.min() < t1.volume.max() <= 1
    np.testing.assert_allclose(t1.orientation, np.concatenate(_orientation(0.3)), atol=1e-6)
    assert file_info(study / "T2").shape == (3, 12, 10) and file_info(study / "T3") is None
    write_series(ct_volume[:2], tmp_path / "same", seed=4, description="T2")
    write_series(ct_volume[2:], tmp_path / "same", seed=5, description="T2")   # same description: UIDs
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in (tmp_path / "same").iterdir()}
    assert set(series_names(tmp_path / "same")) == uids
    (tmp_path / "m").mkdir()
    uid = sorted(uids)[0]
    np.save(tmp_path / "m" / f"{uid}.npy", np.ones(read_series(tmp_path / "same", series=uid).volume.shape[1:]))
    same = ImageFolder(tmp_path / "same", size=(2, 12, 10), masks=tmp_path / "m")   # masks match a UID-named case
    assert [r.mask_path is not None for r in same.records] == [True, False] and same.load(0)[2].all()
    with pytest.raises(DataFileError, match=r"holds no series 'T9'; its series: "):
        read_series(study, series="T9")


def test_image_folder_takes_series_folders_and_nifti_as_volume_cases(tmp_path, ct_volume):
    write_series(ct_volume, tmp_path / "data" / "a" / "patient1")
    write_nifti(np.linspace(0, 1, 6 * 8 * 9).reshape(6, 8, 9), tmp_path / "data" / "b" / "patient2.nii.gz", (3, 1, 1))
    vols = ImageFolder(tmp_path / "data", size=(8, 8, 8), window="none")
    assert vols.slice_index is None
    assert [r.path.name for r in vols.records] == ["patient1", "patient2.nii.gz"]
    assert [vols.classes[r.label] for r in vols.records] == ["a", "b"]
    assert vols.load(0)[0].shape == (1, 8, 8, 8)
    slices = ImageFolder(tmp_path / "data", size=8)                       # a 2-D model: every slice file a case
    assert len(slices) == 7 + 1 and slices.slice_index == "middle"
    flat = ImageFolder(tmp_path / "data" / "a", size=(8, 8, 8))          # a folder of series folders: no labels
    assert flat.classes == [] and flat.records[0].label is None
    single = ImageFolder(tmp_path / "data" / "a" / "patient1", size=(8, 8, 8))   # one series folder given
    assert [c.id for c in cl.runs.pipeline.cases_of(single)] == ["patient1"]


def test_nifti_gz_round_trip_spacing_and_nibabel(tmp_path):
    vol = generate_volumes(1, size=(16, 24, 20), seed=3).images[0, 0]
    path = write_nifti(vol, tmp_path / "v.nii.gz", spacing=(12.5, 8.3, 10.0))
    got = load_image(path, slice_index=None)[0]
    np.testing.assert_allclose(got, vol, atol=0.5 / 255 + 1e-6)
    ras = nib.load(str(path)).get_fdata()                                 # nibabel's own reading, (R, A, S)
    np.testing.assert_allclose(got, ras.transpose(2, 1, 0)[:, ::-1, :], atol=1e-6)
    assert R.nifti_spacing(path) == pytest.approx((12.5, 8.3, 10.0), rel=1e-5)


def test_nifti_4d_takes_the_first_frame_and_says_so(tmp_path):
    data = np.arange(5 * 6 * 7 * 3, dtype=np.float32).reshape(5, 6, 7, 3)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 4.0, 1.0])), str(tmp_path / "t.nii.gz"))
    got = load_image(tmp_path / "t.nii.gz", slice_index=None)[0]
    np.testing.assert_array_equal(got, data[..., 0].transpose(2, 1, 0)[:, ::-1, :])
    np.testing.assert_array_equal(R.read_nifti(tmp_path / "t.nii.gz", frame=2)[0],
                                  data[..., 2].transpose(2, 1, 0)[:, ::-1, :])
    assert "3 volumes: volume 0 taken" in R.nifti_description(tmp_path / "t.nii.gz")
    with pytest.raises(DataFileError, match="frame=5"):
        R.read_nifti(tmp_path / "t.nii.gz", frame=5)


def test_synthetic_volumes_seeded_with_masks(tmp_path):
    a, b = generate_volumes(8, size=(16, 20, 20), seed=7), generate_volumes(8, size=(16, 20, 20), seed=7)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (8, 1, 16, 20, 20) and a.spacing == (12.5, 10.0, 10.0)
    tumour = a.masks["tumor"].reshape(8, -1).any(1)
    assert (tumour == (a.labels != a.classes.index("notumor"))).all()
    assert not (a.masks["tumor"] & ~a.masks["head"]).any() and (a.masks["brain"] <= a.masks["head"]).all()
    out = write_volume_dataset(make_volume_dataset(n_train=4, n_test=2, size=16), tmp_path / "d")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["shape"] == [16, 16, 16] and len(list(out.glob("Training/*/*.nii.gz"))) == 4
    assert len(list((out / "masks" / "tumor").glob("*.nii.gz"))) == 6


# -- the reference 3-D CNN: its maps against the ground truth -----------------------------------------
@pytest.fixture(scope="module")
def trained_3d():
    """The reference 3-D CNN (half width) trained 360 steps on 192 synthetic 16^3 volumes (~10 s)."""
    train = generate_volumes(192, size=16, seed=0, split="train")
    res = train_classifier(lambda: brain_tumor_cnn3d(4, 1, 16, width=0.5), train.images, train.labels, epochs=15,
                           batch_size=8, lr=3e-3, seed=0, preprocess=Normalize([0.5], [0.25]), progress=False)
    return Classifier(res["module"], preprocess=Normalize([0.5], [0.25]), classes=train.classes)


def test_trained_3d_cnn_puts_attribution_in_the_tumour(trained_3d):
    """Ground truth: a share of the positive attribution in the tumour mask well above the tumour's
    share of the volume (what a map that ignores the tumour gets), for most volumes."""
    test = generate_volumes(32, size=16, seed=0, split="test")
    has = test.labels != test.classes.index("notumor")
    x, mask = torch.from_numpy(test.images[has]), torch.from_numpy(test.masks["tumor"][has])
    assert cl.training.evaluate_accuracy(trained_3d, test.images, test.labels) > 0.4       # chance: 0.25
    maps = cl.explain(trained_3d, x, target=torch.from_numpy(test.labels[has]),
                      methods=["gradcam", "integrated_gradients"], integrated_gradients={"steps": 16})
    chance = mask.float().mean((1, 2, 3))                                   # share of the volume in the tumour
    for name, m, most in (("gradcam", maps["gradcam"], 0.5), ("integrated_gradients", maps["integrated_gradients"], 0.9)):
        assert m.shape == x.shape[:1] + x.shape[2:]
        pos = m.clamp(min=0)
        share = (pos * mask).sum((1, 2, 3)) / pos.sum((1, 2, 3)).clamp(min=1e-12)
        assert share.mean() > 2 * chance.mean(), (name, share.mean(), chance.mean())
        assert (share > chance).float().mean() >= most, (name, share, chance)


def test_3d_cnn_builds_and_refuses_2d_sizes():
    net = build_model("brain-tumor-cnn3d", num_classes=3, input_size=[16, 24, 20])
    assert net(torch.zeros(2, 1, 16, 24, 20)).shape == (2, 3)
    with pytest.raises(cl.errors.InputError, match=r"\(D, H, W\)"):
        brain_tumor_cnn3d(input_size=(32, 32))


def test_slice_viewer_opens_at_the_peak_slices():
    amap = np.zeros((6, 9, 11), np.float32)
    amap[4, 2, 7] = 3.0
    amap[1, 5, 1] = -9.0                                                 # negative: not evidence for the class
    assert [peak_slice(amap, p) for p in ("axial", "coronal", "sagittal")] == [4, 2, 7]
    vol = np.arange(6 * 9 * 11, dtype=np.float32).reshape(1, 6, 9, 11)
    assert plane_slices(vol[0], "coronal")[2][0, 0] == vol[0, 5, 2, 0]    # superior at the top
    view = volume_view(vol, {"m": amap}, spacing=(2.0, 1.0, 1.0))
    planes = {p["name"]: p for p in view["planes"]}
    assert [planes[p]["start"] for p in planes] == [4, 2, 7] and planes["axial"]["n"] == 6
    assert float(planes["coronal"]["aspect"]) == pytest.approx(11 / 12, rel=1e-3)    # W x 1 mm over D x 2 mm
    assert planes["sagittal"]["maps"][0]["uri"].startswith("data:image/png;base64,")
    assert volume_case_limit([32] * 3) > volume_case_limit([64] * 3) >= 24     # one report file, then pages


def test_slice_viewer_spacing_of_resized_volumes(tmp_path, ct_volume):
    """The viewer's voxel size: the file's spacing times its shape over the stored (resized) shape."""
    write_nifti(np.zeros((6, 8, 9)), tmp_path / "v.nii.gz", spacing=(3.0, 1.0, 1.5))
    assert shown_spacing(tmp_path / "v.nii.gz", (8, 8, 8)) == pytest.approx((3.0 * 6 / 8, 1.0, 1.5 * 9 / 8))
    write_series(ct_volume, tmp_path / "s", spacing=(2.5, 0.8, 0.7))
    assert shown_spacing(tmp_path / "s", (7, 6, 5)) == pytest.approx((2.5, 1.6, 1.4))
    assert shown_spacing(tmp_path / "gone.nii.gz", (8, 8, 8)) is None


# -- the command line on volumes ------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_on_volumes_end_to_end(tmp_path, capsys):
    from counterlens.cli import main
    data, model, run = tmp_path / "data", tmp_path / "model", tmp_path / "run"
    assert main(["data", "synth", "brain-mri-3d", "--out", str(data), "--n-train", "16", "--n-test", "4",
                 "--size", "16", "--slices", "12"]) == 0
    assert main(["train", "--data", str(data), "--arch", "brain-tumor-cnn3d", "--out", str(model), "--size", "16",
                 "--epochs", "1", "--batch-size", "8", "--width", "0.5", "--quiet"]) == 0
    assert json.loads((model / "model.json").read_text())["input_size"] == [16, 16, 16]
    masks = data / "masks" / "tumor"
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run), "--masks",
                 str(masks), "--methods", "gradcam,saliency", "--quiet", "--images-per-batch", "2"]) == 0
    r = cl.open_run(run)
    case = r.cases["path"].iloc[0]
    assert r.map(case, "gradcam").shape == (16, 16, 16) and r.image(case).shape == (1, 16, 16, 16)
    stem = Path(case).name[: -len(".nii.gz")]
    truth = load_case(data / "Testing" / case, masks / f"{stem}.nii.gz", size=(16, 16, 16))[1]
    np.testing.assert_array_equal(r.mask(case), truth)
    assert main(["evaluate", str(run), "--masks", str(masks), "--sanity-images", "0", "--steps", "4", "--quiet"]) == 0
    assert "relevance_mass" in set(cl.open_run(run).metrics["metric"])
    assert main(["counterfactual", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--steps", "10", "--limit", "2", "--quiet", "--no-report"]) == 0
    cfs = cl.open_run(run).counterfactuals
    assert len(cfs) == 2 and cl.open_run(run).counterfactual(cfs["path"].iloc[0]).shape == (1, 16, 16, 16)
    assert main(["audit", "--model", str(model), "--data", str(data / "Testing"), "--region", str(masks),
                 "--out", str(tmp_path / "audit"), "--methods", "saliency", "--n-random", "2"]) == 0
    html = (run / "report.html").read_text()
    assert html.count('class="sv"') == 4 and "sv-plane-btn" in html


def test_audit_box_in_a_volume():
    from counterlens.cli.audit import _parse_box
    box = _parse_box("1,2,3,4,6,5", (8, 7, 6))                             # x0,y0,z0,x1,y1,z1 on [D, H, W]
    expected = np.zeros((8, 7, 6), bool)
    expected[3:5, 2:6, 1:4] = True
    np.testing.assert_array_equal(box.numpy(), expected)
    with pytest.raises(cl.errors.InputError, match="x0,y0,z0,x1,y1,z1"):
        _parse_box("1,2,3,4", (8, 7, 6))
    with pytest.raises(cl.errors.InputError, match="z1 exclusive"):
        _parse_box("0,0,0,6,7,9", (8, 7, 6))


def test_volume_benchmark_smoke(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_volumes", Path(__file__).parents[1] / "benchmarks" / "volumes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "v.json"
    assert bench.main(["--quick", "--methods", "saliency,rise", "--json", str(out)]) == 0
    assert bench.main(["--quick", "--methods", "gradcam", "--json", str(out)]) == 0      # merged into the file
    rows = {r["method"]: r for r in json.loads(out.read_text())["methods"]}
    assert sorted(rows) == ["gradcam", "rise", "saliency"]
    assert all(r["volumes_per_s"] > 0 for r in rows.values()) and rows["rise"]["volumes"] == 1


def test_pydicom_bundled_series_folders_refused_with_the_reason():
    """pydicom's own MR study folders: MR2 mixes three series (pilots and a localizer), MR700 is a radial
    acquisition (every slice at another orientation): neither is one volume, and each says why; a dataset
    splits MR2 into its three series (the localizer reads, the three-plane pilots are refused)."""
    study = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892003"
    if not study.is_dir():
        pytest.skip("pydicom's bundled test files are not installed")
    with pytest.raises(DataFileError, match=r"holds 3 DICOM series .*'FAST LOCALIZER'"):
        read_series(study / "MR2")
    with pytest.raises(DataFileError, match="different orientations"):
        read_series(study / "MR700")
    heads = {f.name: pydicom.dcmread(f, stop_before_pixels=True) for f in (study / "MR2").iterdir()}
    pilot = str(heads["4950"].SeriesInstanceUID)                  # T/S/C pilot: three planes in one series
    with pytest.raises(DataFileError, match="different orientations"):
        read_series(study / "MR2", series=pilot)
    name, head = next((n, h) for n, h in heads.items() if "LOCALIZER" in str(h.SeriesDescription))
    one = read_series(study / "MR2", series=str(head.SeriesInstanceUID), window="none")   # one series by UID
    ds = pydicom.dcmread(study / "MR2" / name)
    np.testing.assert_array_equal(one.volume[0, 0], pydicom.pixels.apply_modality_lut(ds.pixel_array, ds))
    cases = [r.path for r in ImageFolder(study, size=(4, 8, 8)).records if r.path.parent.name == "MR2"]
    assert len(cases) == 3 and study / "MR2" / "FAST LOCALIZER" in cases          # a dataset: one case per series
    np.testing.assert_array_equal(load_image(study / "MR2" / "FAST LOCALIZER", window="none", slice_index=None)[0],
                                  one.volume[0])
