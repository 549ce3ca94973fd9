"""Bring-your-own diagnostics: a model file without a card (TorchScript, .pt2) checked against the data
before the first image, with one line that says what the model expects, what the data has and the
flag that fixes it (--channels, --size, --value-range, --preprocess); the flags describe the model,
override its card, and are recorded; what the loader does to each image is said in the console,
run.yaml and the report."""
import argparse
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from torch import nn

import counterlens as cl
from conftest import single_thread
from counterlens.cards import save_model_card
from counterlens.cli import main
from counterlens.cli.common import preprocess_arg
from counterlens.data.headers import file_info, read_steps
from counterlens.data.images import ImageFolder, load_image
from counterlens.errors import InputError
from counterlens.models import build_model
from counterlens.runs.diagnose import describe_loading, diagnose
from counterlens.runs.probe import find_size

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

CT = get_testdata_file("CT_small.dcm")
ANAT = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")


class FullyConv(nn.Module):
    """Any size; ``channels`` in its first conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def fixed_size(side: int = 32) -> nn.Module:
    """Flatten + Linear: takes ``side`` x ``side`` grey images only."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * (side // 2) ** 2, 2))


def png(path: Path, shape, seed: int = 0, rgb: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(seed).random((*shape, 3) if rgb else shape)
    Image.fromarray((values * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models without cards (TorchScript, .pt2) and folders of grey, RGB, 48x48 and mixed-size images."""
    root = tmp_path_factory.mktemp("diag")
    torch.manual_seed(0)
    torch.jit.script(FullyConv(3).eval()).save(str(root / "rgb.ts"))
    torch.jit.script(FullyConv(1).eval()).save(str(root / "grey.ts"))
    torch.jit.script(fixed_size(32).eval()).save(str(root / "fixed.ts"))
    program = torch.export.export(fixed_size(32).eval(), (torch.zeros(2, 1, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(root / "fixed.pt2"))
    for c in ("a", "b"):
        for i in range(2):
            png(root / "grey" / c / f"{i}.png", (32, 32), seed=i)
            png(root / "big" / c / f"{i}.png", (48, 48), seed=i)
            png(root / "rgb" / c / f"{i}.png", (32, 32), seed=i, rgb=True)
    png(root / "mixed" / "x.png", (48, 48), 0)
    png(root / "mixed" / "y.png", (48, 48), 1)
    png(root / "mixed" / "z.png", (40, 56), 2)
    return root


def explain(model, data, out, *extra):
    return ["explain", "--model", str(model), "--data", str(data), "--out", str(out), "--methods", "saliency",
            "--quiet", "--no-report", "--workers", "1", *extra]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("counterlens: error: ")
    return err.strip()[len("counterlens: error: "):]


# -- channels ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rgb_torchscript_on_grey_pngs_says_channels_3_then_runs(world, tmp_path, capsys):
    assert main(explain(world / "rgb.ts", world / "grey", tmp_path / "run")) == 2
    assert one_error(capsys) == (f"the model expects 3-channel images; the data in {world / 'grey'} are grey (1 channel): "
                                 "add --channels 3 (repeats the grey channel) or give a model card with in_channels")
    assert not (tmp_path / "run").exists()                        # refused before anything was written
    assert main(explain(world / "rgb.ts", world / "grey", tmp_path / "run", "--channels", "3")) == 0
    out = capsys.readouterr().out
    assert "--channels 3 describes the model" in out and "4 images: grey -> RGB (channel repeated)" in out
    run = cl.open_run(tmp_path / "run")
    assert (run.cases.status == "done").all() and run.map(run.cases.path[0], "saliency").shape == (32, 32)
    assert run.spec["model"]["overrides"] == {"in_channels": 3} and run.spec["model"]["in_channels"] == 3


@pytest.mark.slow
def test_grey_model_on_rgb_data_says_channels_1(world, tmp_path, capsys):
    assert main(explain(world / "grey.ts", world / "rgb", tmp_path / "run")) == 2
    assert one_error(capsys) == (f"the model expects grey (1-channel) images; the data in {world / 'rgb'} are RGB "
                                 "(3 channels): add --channels 1 (converts RGB to grey by luminance) or give a model "
                                 "card with in_channels")
    assert main(explain(world / "grey.ts", world / "rgb", tmp_path / "run", "--channels", "1")) == 0
    assert "4 images: RGB -> grey (luminance)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_model_that_matches_the_data_needs_no_flag(world, tmp_path, capsys):
    """RGB data, an RGB model without a card: its first layer says 3 channels, the data has them."""
    assert main(explain(world / "rgb.ts", world / "rgb", tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "3 channels, from its first layer" in out and "4 images: read as stored (32x32, RGB)" in out
    assert cl.open_run(tmp_path / "run").spec["data"]["read"]["channels"] == 3


@pytest.mark.slow
def test_channels_that_contradict_the_model(world, tmp_path, capsys):
    assert main(explain(world / "fixed.pt2", world / "grey", tmp_path / "run", "--channels", "3")) == 2
    assert one_error(capsys).startswith("the model expects 1-channel images but --channels says 3: pass --channels 1")


# -- size --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fixed_size_model_on_48px_images_says_size_32_then_runs(world, tmp_path, capsys):
    assert main(explain(world / "fixed.ts", world / "big", tmp_path / "run")) == 2
    assert one_error(capsys) == (f"the model expects 32x32 images; the images in {world / 'big'} are 48x48: add --size "
                                 "32 32 (resizes them) or give a model card with input_size")
    assert main(explain(world / "fixed.ts", world / "big", tmp_path / "run", "--size", "32", "32")) == 0
    assert "4 images: resized from 48x48 to 32x32" in capsys.readouterr().out
    assert cl.open_run(tmp_path / "run").spec["model"]["input_size"] == [32, 32]


@pytest.mark.slow
def test_mixed_sizes(world, tmp_path, capsys):
    mixed = world / "mixed"
    assert main(explain(world / "fixed.ts", mixed, tmp_path / "fixed")) == 2
    assert one_error(capsys) == (f"the model expects 32x32 images; the images in {mixed} have 2 sizes (2 of 48x48, 1 of "
                                 "40x56): add --size 32 32 (resizes them) or give a model card with input_size")
    assert main(explain(world / "fixed.ts", mixed, tmp_path / "fixed", "--size", "32", "32")) == 0
    out = capsys.readouterr().out
    assert "2 images: resized from 48x48 to 32x32" in out
    assert "1 image: resized from 40x56 to 32x32 (aspect changed 1.40 -> 1.00)" in out
    # a fully convolutional model takes every size: each image at its own, and said so
    assert main(explain(world / "grey.ts", mixed, tmp_path / "conv")) == 0
    assert "each is explained at its own size" in capsys.readouterr().out
    assert sorted(np.shape(cl.open_run(tmp_path / "conv").map(p, "saliency")) for p in ("x.png", "z.png")) \
        == [(40, 56), (48, 48)]
    # the audit stacks every image into one batch: one size needed
    assert main(["audit", "--model", str(world / "grey.ts"), "--data", str(mixed), "--out", str(tmp_path / "audit"),
                 "--region", "0,0,4,4", "--methods", ""]) == 2
    assert one_error(capsys).endswith("this command takes them as one batch: add --size 48 48 (resizes them to the "
                                      "most common size)")


@pytest.mark.slow
def test_pt2_without_card_described_by_flags(world, tmp_path, capsys):
    assert main(explain(world / "fixed.pt2", world / "big", tmp_path / "run")) == 2
    assert "add --size 32 32" in one_error(capsys)
    assert main(explain(world / "fixed.pt2", world / "big", tmp_path / "run", "--size", "32", "33")) == 2
    assert one_error(capsys).startswith("the model does not take 32x33 images (the size from --size;")
    assert main(explain(world / "fixed.pt2", world / "big", tmp_path / "run", "--size", "32", "32",
                        "--value-range", "0", "1", "--preprocess", "normalize:0.5,0.25")) == 0
    out = capsys.readouterr().out
    assert "1 channel, from its input signature" in out and "--preprocess normalize:0.5,0.25 describes the model" in out
    model = cl.open_run(tmp_path / "run").spec["model"]
    assert model["preprocess"] == [{"normalize": {"mean": [0.5], "std": [0.25]}}] and model["value_range"] == [0, 1]
    # evaluate scores the maps on the model as the run described it; another description is refused
    assert main(["evaluate", str(tmp_path / "run"), "--quiet", "--sanity-images", "0", "--metrics", "sparseness"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--quiet", "--sanity-images", "0", "--size", "48", "48"]) == 2
    assert one_error(capsys).startswith("--size 48 48 differs from the run's 32 32")


@pytest.mark.slow
def test_rerun_with_another_size_is_refused(world, tmp_path, capsys):
    assert main(explain(world / "grey.ts", world / "big", tmp_path / "run", "--size", "32", "32")) == 0
    capsys.readouterr()
    assert main(explain(world / "grey.ts", world / "big", tmp_path / "run", "--size", "40", "40")) == 2
    err = one_error(capsys)
    assert "model.input_size: [32, 32] in the run, [40, 40] now" in err and "--overwrite" in err


def test_find_size_prefers_the_round_size():
    """MaxPool floors 33 to 16 as it does 32: both work, 32 is named."""
    clf = cl.Classifier(fixed_size(32).eval(), device="cpu")
    error = "mat1 and mat2 shapes cannot be multiplied (1x2304 and 1024x2)"
    assert find_size(clf, 1, (48, 48), error) == (32, 32)
    assert find_size(cl.Classifier(fixed_size(28).eval(), device="cpu"), 1, (48, 48), None) == (28, 28)


# -- values ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_world(tmp_path_factory):
    """A model card with value_range [0, 1] and normalize(0.5, 0.5); CT data in Hounsfield units."""
    root = tmp_path_factory.mktemp("ct")
    kw = {"num_classes": 2, "in_channels": 1, "input_size": [32, 32], "width": 0.25}
    torch.manual_seed(0)
    save_model_card(build_model("small-resnet", **kw), root / "model", architecture="small-resnet", kwargs=kw,
                    classes=["a", "b"], preprocess=[{"normalize": {"mean": [0.5], "std": [0.5]}}])
    (root / "ct").mkdir()
    for i in range(2):
        np.save(root / "ct" / f"s{i}.npy", np.random.default_rng(i).uniform(-1000, 3000, (40, 40)).astype(np.float32))
    shutil.copy(CT, root / "ct" / "ct_small.dcm")
    return root


@pytest.mark.slow
def test_hounsfield_units_into_a_0_1_model_warn_with_the_flags_that_fix_it(ct_world, tmp_path, capsys):
    assert main(explain(ct_world / "model", ct_world / "ct", tmp_path / "run")) == 0
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: "))
    assert "(Hounsfield units?)" in warning and "outside the range the model takes (0..1, its model card's value_range)" \
        in warning and "--value-range" in warning and "--window CENTER,WIDTH" in warning \
        and "these DICOM files carry no window of their own" in warning
    assert "1 image: values in HU (no window); resized from 128x128 to 32x32" in out
    flags = warning.split("Add ")[1].split(" (maps")[0].split()              # --preprocess SPEC --value-range LOW HIGH
    assert flags[0] == "--preprocess" and flags[2] == "--value-range"
    low, high = float(flags[3]), float(flags[4])
    mean, std = (float(v) for v in flags[1].split(":")[1].split(","))
    assert (low - mean) / std == pytest.approx(-1, abs=2e-3) and (high - mean) / std == pytest.approx(1, abs=2e-3)
    assert cl.open_run(tmp_path / "run").spec["data_info"]["loading"]["warnings"] == [warning[len("warning: "):]]
    # the flags it names: no warning, recorded as overrides of the card
    assert main(explain(ct_world / "model", ct_world / "ct", tmp_path / "fixed", *flags)) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "overrides the model card's value_range 0 1" in out
    model = cl.open_run(tmp_path / "fixed").spec["model"]
    assert set(model["overrides"]) == {"preprocess", "value_range"} and model["value_range"] == [low, high]


@pytest.mark.slow
def test_a_window_of_the_users_maps_hounsfield_units_onto_0_1(ct_world, tmp_path, capsys):
    """--window C,W: the values every file holds as read (HU from .npy or DICOM) windowed onto 0..1, the
    card's range then fits (no warning), the loader says it, run.yaml records it, re-runs compare it."""
    from counterlens.data.images import load_image
    from counterlens.data._readers import read_dicom
    assert main(explain(ct_world / "model", ct_world / "ct", tmp_path / "run", "--window", "40,400")) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "window 40,400 (values -160..240 -> 0..1)" in out
    run = cl.open_run(tmp_path / "run")
    hu = np.load(ct_world / "ct" / "s0.npy")
    direct = load_image(ct_world / "ct" / "s0.npy", size=32, window=(40, 400))
    assert np.array_equal(run.image("s0.npy"), direct)
    unresized = load_image(ct_world / "ct" / "s0.npy", window="40,400")[0]
    np.testing.assert_allclose(unresized, np.clip((hu - (40 - 200)) / 400, 0, 1), atol=1e-6)
    dicom = load_image(ct_world / "ct" / "ct_small.dcm", window=(40, 400))[0]
    np.testing.assert_allclose(dicom, np.clip((read_dicom(ct_world / "ct" / "ct_small.dcm", "none")[0] + 160) / 400,
                                              0, 1), atol=1e-6)   # the user's window replaces the file's own
    assert run.spec["data"]["read"]["window"] == [40.0, 400.0]
    assert main(["run", str(tmp_path / "run" / "run.yaml"), "--out", str(tmp_path / "again")]) == 0   # its run.yaml
    again = cl.open_run(tmp_path / "again")                                # re-makes it, window included
    assert again.spec["data"]["read"]["window"] == [40.0, 400.0]
    assert all(np.array_equal(again.map(p, "saliency"), run.map(p, "saliency")) for p in run.cases["path"])
    capsys.readouterr()
    assert main(explain(ct_world / "model", ct_world / "ct", tmp_path / "run", "--window", "50,400")) == 2
    err = one_error(capsys)
    assert "window" in err and "--overwrite" in err
    with pytest.raises(SystemExit) as exit_:
        main(explain(ct_world / "model", ct_world / "ct", tmp_path / "bad", "--window", "40"))
    assert exit_.value.code == 2 and "CENTER,WIDTH" in capsys.readouterr().err


# -- what the loader does: console, run.yaml, report ------------------------------------------------
@pytest.mark.slow
def test_the_loader_description_is_in_stdout_run_yaml_and_the_report(world, tmp_path, capsys):
    args = explain(world / "fixed.ts", world / "mixed", tmp_path / "run", "--size", "32", "32")
    args.remove("--no-report")
    assert main(args) == 0
    out = capsys.readouterr().out
    line = "1 image: resized from 40x56 to 32x32 (aspect changed 1.40 -> 1.00)"
    assert f"  {line}" in out and out.index(line) < out.index("explained 3 images")
    loading = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["data_info"]["loading"]
    assert line in loading["lines"] and loading["files"] == 3 and loading["described"] == 3
    assert {"images": 1, "what": line, "examples": ["z.png"]} in loading["groups"]
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert line.replace("->", "-&gt;") in html and "--size 32 32" in html


def test_library_runs_record_the_loader_description_too(world, tmp_path):
    from counterlens.runs.dataset import explain_folder
    clf = cl.Classifier(FullyConv(3).eval(), device="cpu")
    explain_folder(clf, ImageFolder(world / "grey", channels=3, size=24), tmp_path / "run", methods=["saliency"],
                   progress=False)
    loading = cl.open_run(tmp_path / "run").spec["data_info"]["loading"]
    assert loading["lines"] == ["4 images: grey -> RGB (channel repeated); resized from 32x32 to 24x24"]


def test_headers_say_what_the_reader_gives(tmp_path):
    """Channels and shape from the header equal what the reader decodes, for every format."""
    arr16 = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "a16.png")
    png(tmp_path / "rgb.png", (40, 30), rgb=True)
    np.save(tmp_path / "vol.npy", np.zeros((12, 20, 24), np.float32))
    np.save(tmp_path / "hwc.npy", np.zeros((20, 24, 3), np.uint8))
    for path in [tmp_path / n for n in ("a16.png", "rgb.png", "vol.npy", "hwc.npy")] + [Path(CT), Path(ANAT)]:
        info = file_info(path)
        decoded = load_image(path, slice_index=None)
        assert (info.channels, info.shape) == (decoded.shape[0], decoded.shape[1:]), path
    assert file_info(tmp_path / "a16.png").bits == 16
    assert read_steps(file_info(ANAT), channels=3, size=(32, 32)) == (
        "middle slice of 25", "grey -> RGB (channel repeated)", "resized from 41x33 to 32x32 (aspect changed 0.80 -> 1.00)")
    assert read_steps(file_info(CT), channels=1, size=None, window="auto") == ("values in HU (no window)",)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert file_info(tmp_path / "junk.png") is None


def test_describe_loading_groups_and_counts(tmp_path):
    for i in range(5):
        png(tmp_path / "d" / f"{i}.png", (64, 64), i)
    png(tmp_path / "d" / "wide.png", (32, 64), 9, rgb=True)
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG broken")
    loading = describe_loading(ImageFolder(tmp_path / "d", channels=1, size=32))
    assert loading["lines"] == ["5 images: resized from 64x64 to 32x32",
                                "1 image: not described here (header not read)",
                                "1 image: RGB -> grey (luminance); resized from 32x64 to 32x32 (aspect changed 2.00 -> 1.00)"]
    assert loading["files"] == 7 and loading["described"] == 6


def test_diagnose_leaves_a_described_model_alone(world):
    """A classifier whose card says channels and size: those are read, and said."""
    clf = cl.Classifier(fixed_size(32).eval(), device="cpu", in_channels=1, input_size=(32, 32), value_range=(0, 1))
    found = diagnose(clf, ImageFolder(world / "rgb", size=(32, 32)))
    assert (found.channels, found.size, found.warnings) == (1, (32, 32), [])
    assert found.lines[-1] == "  4 images: RGB -> grey (luminance)"
    with pytest.raises(InputError, match=r"the model does not take 24x24 images .*it expects 32x32: pass --size 32 32"):
        diagnose(cl.Classifier(fixed_size(32).eval(), device="cpu", in_channels=1, input_size=(24, 24)),
                 ImageFolder(world / "grey", size=(24, 24)))


@pytest.mark.parametrize("text,spec", [
    ("normalize:0.5,0.25", [{"normalize": {"mean": [0.5], "std": [0.25]}}]),
    ("normalize:-1000,4000", [{"normalize": {"mean": [-1000.0], "std": [4000.0]}}]),
    ("normalize:0.485/0.456/0.406,0.229/0.224/0.225",
     [{"normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}]),
    ("imagenet", [{"normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}]),
    ("none", []),
    ('[{"repeat_channels": 3}, {"normalize": {"mean": [0.5], "std": [0.5]}}]',
     [{"repeat_channels": 3}, {"normalize": {"mean": [0.5], "std": [0.5]}}]),
])
def test_preprocess_syntax(text, spec):
    assert preprocess_arg(text) == spec


@pytest.mark.parametrize("text", ["normalize:0.5", "normalize:0.5,0", "normalize:a,b", "standardize:0,1",
                                  "normalize:0.1/0.2,0.3", "[{\"scale\": 2}]", "[oops"])
def test_preprocess_syntax_errors(text):
    with pytest.raises(argparse.ArgumentTypeError):
        preprocess_arg(text)


@pytest.mark.slow
def test_flag_errors_are_one_line(world, tmp_path, capsys):
    assert main(explain(world / "grey.ts", world / "grey", tmp_path / "run", "--size", "32")) == 2
    assert one_error(capsys).startswith("--size 32: give the model's input size as H W")
    assert main(explain(world / "grey.ts", world / "grey", tmp_path / "run", "--value-range", "1", "0")) == 2
    assert one_error(capsys).startswith("--value-range 1 0: LOW must be below HIGH")


class Volume3D(nn.Module):
    """A 3-D CNN with a fixed input (Flatten + Linear): 16 x 16 x 16 volumes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 ** 3, 2)

    def forward(self, x):
        return self.head(nn.functional.max_pool3d(torch.relu(self.conv(x)), 2).flatten(1))


@pytest.mark.slow
def test_a_3d_model_on_volumes_without_a_size(tmp_path, capsys):
    torch.manual_seed(0)
    torch.jit.script(Volume3D().eval()).save(str(tmp_path / "vol.ts"))
    (tmp_path / "vols").mkdir()
    shutil.copy(ANAT, tmp_path / "vols" / "a.nii")
    assert main(explain(tmp_path / "vol.ts", tmp_path / "vols", tmp_path / "run")) == 2
    assert one_error(capsys) == (f"the model takes 3-D volumes (its first layer is 3-D); the data in {tmp_path / 'vols'} "
                                 "hold volumes (25x41x33) that are read as 2-D slices without a 3-D size: add --size 16 "
                                 "16 16 (reads whole volumes, resized to it) or give a model card with input_size")
    assert main(explain(tmp_path / "vol.ts", tmp_path / "vols", tmp_path / "run", "--size", "16", "16", "16")) == 0
    assert "1 volume: resized from 25x41x33 to 16x16x16" in capsys.readouterr().out
    assert cl.open_run(tmp_path / "run").map("a.nii", "saliency").shape == (16, 16, 16)
    png(tmp_path / "slices" / "s.png", (32, 32))                     # 2-D files for a volume size
    assert main(explain(tmp_path / "vol.ts", tmp_path / "slices", tmp_path / "run2", "--size", "16", "16", "16")) == 2
    assert one_error(capsys) == (f"the model takes 3-D volumes of 16x16x16 (the size from --size); the data in "
                                 f"{tmp_path / 'slices'} are 2-D images that are 32x32: give --size with 2 values for "
                                 "these files, or files of the model's kind")


@pytest.mark.slow
def test_12_bit_data_in_16_bit_pngs_is_named(ct_world, tmp_path, capsys):
    for i in range(2):
        values = np.random.default_rng(i).integers(0, 4096, (32, 32)).astype(np.uint16)   # 12-bit data
        png16 = tmp_path / "data" / f"x{i}.png"
        png16.parent.mkdir(exist_ok=True)
        Image.fromarray(values).save(png16)
    assert main(explain(ct_world / "model", tmp_path / "data", tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "2 images: 16-bit values / 65535" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning: "))
    assert re.search(r"16-bit images in .* use only [0-9.e-]+\.\.0\.06\d* of the range the model takes \(0\.\.1", warning)
    assert "--preprocess normalize:" in warning


def test_ray_actors_load_the_model_as_the_flags_describe_it(world):
    """--engine ray sends the model's bytes and these keyword arguments to every actor."""
    from counterlens.cli.engine import model_args
    from counterlens.cli.parser import build_parser
    from counterlens.runs.worker import load_classifier, pack_model
    args = build_parser().parse_args(explain(world / "fixed.pt2", world / "big", "run", "--size", "32", "32",
                                             "--channels", "1", "--value-range", "0", "1", "--preprocess", "imagenet"))
    kwargs = {k: v for k, v in model_args(args).items() if k not in ("source", "device")}
    clf = load_classifier(pack_model(args.model), device="cpu", **kwargs)
    assert (clf.in_channels, clf.input_size, clf.value_range) == (1, (32, 32), (0.0, 1.0))
    spec = clf.preprocess.to_spec()["normalize"]
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406]) and spec["std"] == pytest.approx([0.229, 0.224, 0.225])


class GreyInside(nn.Module):
    """Takes grey or RGB: averages the channels itself, then a grey conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x.mean(dim=1, keepdim=True))).mean(dim=(2, 3)))


def test_a_model_that_takes_the_files_as_they_are_is_not_refused(world):
    """The first conv says 1 channel, but the model runs on the RGB files as stored: no conversion."""
    found = diagnose(cl.Classifier(GreyInside().eval(), device="cpu"), ImageFolder(world / "rgb"))
    assert found.channels == 3 and "3 channels, from a probe pass (no card or --channels says)" in found.lines[0]


def test_find_size_of_a_model_with_a_non_square_input():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 16 * 32, 2)).eval()
    clf = cl.Classifier(net, device="cpu")
    error = "mat1 and mat2 shapes cannot be multiplied (1x4096 and 1024x2)"      # what it says at 64x128
    assert find_size(clf, 1, (64, 128), error) == (32, 64)


def test_many_sizes_are_summed_up_after_eight_groups(tmp_path):
    for i in range(10):
        png(tmp_path / "d" / f"{i}.png", (20 + i, 20), i)
    loading = describe_loading(ImageFolder(tmp_path / "d", channels=1, size=16))
    assert len(loading["lines"]) == 9 and loading["lines"][-1] == "2 more files in 2 other groups (run.yaml lists them)"
    assert len(loading["groups"]) == 10 and sum(g["images"] for g in loading["groups"]) == 10
