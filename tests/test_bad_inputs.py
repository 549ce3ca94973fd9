"""Bad inputs, as a new user brings them: each gives one clear line (or a failed file recorded with
its reason) and loses nothing already done. Image files, models, run directories, tables, reports
and arguments; see docs/reliability.md for what is promised."""
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import counterlens as cl
from counterlens.cards import save_model_card
from counterlens.cli import main
from counterlens.errors import CounterlensError, InputError
from counterlens.models import build_model

SIZE = 32
KW = {"num_classes": 2, "in_channels": 1, "input_size": [SIZE, SIZE], "width": 0.25}


def png(path: Path, seed: int = 0, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model folder, a good data folder (2 classes x 2 images) and a finished run of it."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = save_model_card(build_model("small-resnet", **KW), root / "model", architecture="small-resnet", kwargs=KW,
                            classes=["healthy", "sick"])
    for c in ("healthy", "sick"):
        for i in range(2):
            png(root / "data" / c / f"{c}{i}.png", seed=i + 10 * (c == "sick"))
    run = root / "run"
    assert main(explain_args(model, root / "data", run)) == 0
    return {"root": root, "model": model, "data": root / "data", "run": run}


def explain_args(model, data, out, *extra):
    return ["explain", "--model", str(model), "--data", str(data), "--out", str(out), "--methods", "gradcam",
            "--quiet", "--no-report", "--workers", "1", *extra]


def snapshot(run):
    r = cl.open_run(run)
    cases = r.cases.sort_values("path").reset_index(drop=True)
    maps = {p: r.map(p, "gradcam").copy() for p in cases.path[cases.status == "done"]}
    return cases, maps


def assert_unchanged(run, before):
    cases, maps = snapshot(run)
    pd.testing.assert_frame_equal(cases, before[0])
    assert maps.keys() == before[1].keys() and all(np.array_equal(maps[k], before[1][k]) for k in maps)


# -- image files: the file fails with its reason, the others are explained ----------------------------
def _truncated_png(p):
    png(p.with_suffix(".tmp.png"))
    data = p.with_suffix(".tmp.png").read_bytes()
    p.with_suffix(".tmp.png").unlink()
    p.write_bytes(data[:60])


def _nan_npy(p):
    a = np.random.default_rng(0).random((1, SIZE, SIZE)).astype(np.float32)
    a[0, 3, 3] = np.nan
    np.save(p, a)


def _big_tiff(p):
    import tifffile
    tile = np.zeros((512, 512), np.uint8)
    tifffile.imwrite(p, (tile for _ in range(40 * 40)), shape=(20480, 20480), dtype=np.uint8, compression="zlib",
                     tile=(512, 512))


def _png_as_dcm(p):
    png(p.with_suffix(".png"))
    p.with_suffix(".png").rename(p)


BAD_FILES = [
    ("truncated.png", _truncated_png, "cannot read the image"),
    ("empty.png", lambda p: p.write_bytes(b""), "cannot read the image"),
    ("text.png", lambda p: p.write_text("just some notes"), "cannot read the image"),
    ("truncated.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20), "cannot read the image"),
    ("photo.dcm", _png_as_dcm, "is a PNG image, not a DICOM file"),
    ("garbage.dcm", lambda p: p.write_bytes(b"not dicom at all " * 20), "not a DICOM file"),
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "object arrays are not loaded"),
    ("nan.npy", _nan_npy, "NaN/inf values"),
    ("vector.npy", lambda p: np.save(p, np.zeros(7, np.float32)), "vector.npy"),
    ("huge.tif", _big_tiff, "more than counterlens reads"),
    ("empty.tif", lambda p: p.write_bytes(b""), "cannot read the TIFF"),
    ("broken.nii", lambda p: p.write_bytes(b"\x5c\x01" + b"\x00" * 50), "cannot read the NIfTI"),
]


@pytest.mark.parametrize("name,make,reason", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_recorded_with_its_reason_and_the_run_goes_on(world, tmp_path, capsys, name, make, reason):
    data = tmp_path / "data"
    png(data / "good.png")
    make(data / name)
    assert main(explain_args(world["model"], data, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert f"failed: {name}" in out and reason in out                      # named on the console
    cases = cl.open_run(tmp_path / "run").cases.set_index("path")
    assert cases.loc["good.png", "status"] == "done"
    assert cases.loc[name, "status"] == "failed" and reason in cases.loc[name, "error"]


def test_a_mask_of_another_field_of_view_fails_its_image(world, tmp_path, capsys):
    png(tmp_path / "data" / "a.png")
    png(tmp_path / "data" / "b.png", seed=1)
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((SIZE, 2 * SIZE), np.uint8)).save(tmp_path / "masks" / "a.png")
    assert main(explain_args(world["model"], tmp_path / "data", tmp_path / "run", "--masks", str(tmp_path / "masks"))) == 0
    cases = cl.open_run(tmp_path / "run").cases.set_index("path")
    assert cases.loc["a.png", "status"] == "failed" and "mask shape" in cases.loc["a.png", "error"]
    assert cases.loc["b.png", "status"] == "done"


def test_every_file_failing_exits_1_and_names_them(world, tmp_path, capsys):
    for i in range(12):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"bad{i:02d}.png").write_bytes(b"junk")
    assert main(explain_args(world["model"], tmp_path / "data", tmp_path / "run")) == 1
    out = capsys.readouterr().out
    assert "0 images" in out and "failed: bad00.png" in out and "and 2 more failed files" in out


# -- models ---------------------------------------------------------------------------------------------
def _pickled(world, tmp_path):
    from counterlens.loading import load_model
    path = tmp_path / "full.pt"
    torch.save(load_model(world["model"], device="cpu").module, path)
    return path


def _state_dict(world, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_model("small-resnet", **KW).state_dict(), path)
    return path


def _garbage_pt(world, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a model")
    return path


def _broken_card(world, tmp_path):
    import shutil
    out = tmp_path / "card"
    shutil.copytree(world["model"], out)
    (out / "model.json").write_text("{not json")
    return out


def _extra_entry_pt2(world, tmp_path):
    from counterlens.loading import load_model
    good, evil = tmp_path / "good.pt2", tmp_path / "evil.pt2"
    net = load_model(world["model"], device="cpu").module
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, SIZE, SIZE),)), str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        dst.writestr(f"{root}/data/constants/x/opaque_obj_1", b"\x80\x04K\x01.")
    return evil


BAD_MODELS = [
    (_pickled, [], "--trust-model-file"),
    (lambda w, t: t / "missing.pt", [], "missing.pt"),
    (_state_dict, [], "--factory"),
    (_garbage_pt, [], "garbage.pt"),
    (_broken_card, [], "model.json"),
    (_extra_entry_pt2, [], "--trust-model-file"),
    (_state_dict, ["--factory", "nowhere.module:make"], "nowhere"),
    (lambda w, t: w["model"], ["--classes", "healthy,sick,other"], "3 class names"),
]


@pytest.mark.parametrize("make,extra,message", BAD_MODELS,
                         ids=["pickle", "missing", "state-dict", "garbage", "card", "pt2-entry", "factory", "classes"])
def test_a_bad_model_is_one_line_and_writes_nothing(world, tmp_path, capsys, make, extra, message):
    model = make(world, tmp_path)
    assert main(explain_args(model, world["data"], tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("counterlens: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


class _Grey3(torch.nn.Module):
    """Expects 3 channels (as many ImageNet models), with no card to say so."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


class _Nan(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(SIZE * SIZE, 2)

    def forward(self, x):
        return self.lin(x.flatten(1)) * float("nan")


class _Tuple(_Nan):
    def forward(self, x):
        return x.flatten(1), self.lin(x.flatten(1))


@pytest.mark.parametrize("module,message", [(_Grey3, "cannot run on these images: it was given a batch of shape"),
                                            (_Nan, "NaN or infinite logits"), (_Tuple, "logits_output")],
                         ids=["3-channels", "nan", "tuple"])
def test_a_model_that_cannot_explain_these_images_says_why(world, tmp_path, module, message):
    from counterlens.data.images import ImageFolder
    from counterlens.runs.dataset import explain_folder
    clf = cl.Classifier(module(), device="cpu")
    with pytest.raises(InputError, match=message):
        explain_folder(clf, ImageFolder(world["data"], channels=1, size=SIZE), tmp_path / "run", methods=["saliency"],
                       progress=False)
    assert cl.open_run(tmp_path / "run").cases.empty                  # no row was written for it


def test_a_torchscript_model_with_3_channels_from_the_cli(world, tmp_path, capsys):
    path = tmp_path / "rgb.ts"
    torch.jit.script(_Grey3()).save(str(path))
    assert main(explain_args(path, world["data"], tmp_path / "run", "--methods", "saliency")) == 2
    err = capsys.readouterr().err
    assert "expects 3-channel images" in err and "add --channels 3" in err and "Traceback" not in err


# -- run directories --------------------------------------------------------------------------------------
def test_out_that_is_a_file(world, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(explain_args(world["model"], world["data"], tmp_path / "out")) == 2
    assert "is a file" in capsys.readouterr().err


def test_out_that_holds_other_files_is_not_touched(world, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.html").write_text("my report")
    (tmp_path / "mine" / "results.csv").write_text("a,b")
    assert main(explain_args(world["model"], world["data"], tmp_path / "mine")) == 2
    assert "not a counterlens run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "report.html").read_text() == "my report"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["report.html", "results.csv"]
    assert main(explain_args(world["model"], world["data"], tmp_path / "mine", "--force")) == 2   # would clobber them
    assert "report.html, results.csv would be overwritten" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(explain_args(world["model"], world["data"], tmp_path / "notes")) == 2
    assert "--force" in capsys.readouterr().err
    assert main(explain_args(world["model"], world["data"], tmp_path / "notes", "--force")) == 0
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and cl.open_run(tmp_path / "notes").cases.shape[0] == 4


def test_out_inside_data(world, tmp_path, capsys):
    assert main(explain_args(world["model"], world["data"], world["data"] / "healthy" / "run")) == 2
    assert "inside the data folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra,difference", [(["--target", "sick"], "target: 'predicted' in the run, 'sick' now"),
                                              (["--param", "gradcam.relu=false"], "methods.gradcam.relu"),
                                              (["--methods", "saliency"], "methods.gradcam")],
                         ids=["target", "param", "methods"])
def test_rerun_with_other_settings_is_refused_and_changes_nothing(world, capsys, extra, difference):
    before = snapshot(world["run"])
    args = explain_args(world["model"], world["data"], world["run"])
    if extra[0] == "--methods":
        args[args.index("--methods") + 1] = extra[1]
        extra = []
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert difference in err and "--overwrite" in err
    assert_unchanged(world["run"], before)


def test_rerun_with_another_data_folder_is_refused(world, tmp_path, capsys):
    png(tmp_path / "other" / "healthy" / "x.png")
    before = snapshot(world["run"])
    assert main(explain_args(world["model"], tmp_path / "other", world["run"])) == 2
    assert "data.path" in capsys.readouterr().err
    assert_unchanged(world["run"], before)


def test_overwrite_starts_over(world, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert main(explain_args(world["model"], world["data"], run, "--target", "sick", "--overwrite")) == 0
    assert set(cl.open_run(run).attributions.target_name) == {"sick"}


def test_a_damaged_index_shard_is_named(world, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shard = next((run / "index").glob("*.sqlite"))
    shard.write_bytes(b"garbage" * 100)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "move it aside" in err


def test_a_damaged_run_yaml_is_named(world, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "run.yaml").write_text("model: [unclosed\n")
    assert main(explain_args(world["model"], world["data"], run)) == 2
    assert "run.yaml cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["report"], ["evaluate"]])
def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys, command):
    assert main([*command, str(tmp_path)]) == 2
    assert "is not a counterlens run directory" in capsys.readouterr().err


def test_report_of_a_run_without_cases(tmp_path):
    from counterlens.runs.store import prepare_run
    from counterlens.viz.report import write_report
    prepare_run(tmp_path / "run", {"model": {"classes": ["a", "b"]}}, compare=())
    assert write_report(tmp_path / "run").exists()


# -- tables ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    from counterlens.data.tabular import TabularSchema
    root = tmp_path_factory.mktemp("credit")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.integers(20, 60, 200), "income": rng.uniform(10, 90, 200).round(1),
                       "job": rng.choice(["a", "b"], 200)})
    df["ok"] = np.where(df.income + df.age > 80, "yes", "no")
    df.to_csv(root / "credit.csv", index=False)
    schema = TabularSchema.from_frame(df, label="ok")
    torch.manual_seed(0)
    net = torch.nn.Sequential(schema.preprocess(), torch.nn.Linear(schema.width, 2)).eval()
    torch.export.save(torch.export.export(net, (schema.encode(df[:2]),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(root / "credit.pt2"))
    return root, df


def table_args(root, *extra):
    return ["counterfactual", "--table", str(root / "credit.csv"), "--label", "ok", "--model", str(root / "credit.pt2"),
            "--out", str(root / "out"), "--quiet", *extra]


@pytest.mark.parametrize("change,message", [
    (lambda a: a[:a.index("--label")] + ["--label", "approved"] + a[a.index("--label") + 2:], "'approved' is not a column"),
    (lambda a: a + ["--k", "100000"], "--k=100000 is out of range"),
    (lambda a: a[:a.index("--label")] + a[a.index("--label") + 2:], "pass --label COLUMN"),
    (lambda a: a[:2] + [a[2].replace("credit.csv", "missing.csv")] + a[3:], "missing.csv"),
    (lambda a: a + ["--immutable", "height"], "height"),
], ids=["label", "k", "no-label", "missing-table", "immutable"])
@pytest.mark.filterwarnings("ignore:no schema saved")
def test_bad_table_arguments(credit, capsys, change, message):
    root, _ = credit
    assert main(change(table_args(root))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:no schema saved")
def test_a_table_with_missing_values_or_no_rows(credit, tmp_path, capsys):
    root, df = credit
    holes = df.copy()
    holes.loc[3, "income"] = np.nan
    holes.to_csv(tmp_path / "holes.csv", index=False)
    (tmp_path / "empty.csv").write_text("age,income,job,ok\n")
    for name, message in (("holes.csv", "missing values"), ("empty.csv", "the table has no rows")):
        args = table_args(root)
        args[2] = str(tmp_path / name)
        args[args.index("--out") + 1] = str(tmp_path / f"out-{name}")
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("counterlens: error:") and message in err and "Traceback" not in err


# -- arguments: refused by the parser or before the model loads ---------------------------------------------
@pytest.mark.parametrize("extra", [["--images-per-batch", "0"], ["--images-per-batch", "-2"], ["--workers", "0"],
                                   ["--threads", "0"], ["--batch-size", "0"], ["--map-dtype", "int8"],
                                   ["--limit", "0"], ["--limit", "-1"], ["--seed", "abc"]],
                         ids=lambda e: " ".join(e))
def test_bad_numbers_are_refused_by_the_parser(world, tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exc:
        main(explain_args(world["model"], world["data"], tmp_path / "run", *extra))
    assert exc.value.code == 2
    assert extra[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["--param", "integrated_gradients.steps=abc", "--methods", "integrated_gradients"], "pass an integer"),
    (["--param", "gradcam.relu=[1,"], "cannot be read"),
    (["--param", "occlusion.window=8"], "not among the methods"),
    (["--param", "steps=3"], "METHOD.NAME=VALUE"),
    (["--param", "gradcam.nonsense=1"], "has no parameter nonsense"),
    (["--methods", "gradcam,nonsense"], "unknown method 'nonsense'"),
    (["--clip-percentile", "80"], "--clip-percentile 80"),
], ids=["type", "yaml", "other-method", "format", "unknown-param", "method", "clip"])
def test_bad_method_arguments_are_refused_before_the_model_loads(tmp_path, capsys, extra, message):
    args = explain_args(tmp_path / "no-model-here", tmp_path / "no-data-here", tmp_path / "run")
    if "--methods" in extra:
        i = extra.index("--methods")
        args[args.index("--methods") + 1] = extra[i + 1]
        extra = extra[:i] + extra[i + 2:]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model-here" not in err              # the argument, not the missing model


def test_a_target_that_is_not_a_class(world, tmp_path, capsys):
    assert main(explain_args(world["model"], world["data"], tmp_path / "run", "--target", "zebra")) == 2
    assert "zebra" in capsys.readouterr().err


def test_report_arguments(world, capsys):
    with pytest.raises(SystemExit):
        main(["report", str(world["run"]), "--page-size", "0"])
    assert main(["report", str(world["run"]), "--clip-percentile", "80"]) == 2
    assert "--clip-percentile=80.0: pass a percentage in [0, 50)" in capsys.readouterr().err


def test_debug_shows_the_traceback(world, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(CounterlensError, match="is a file"):
        main(["--debug", *explain_args(world["model"], world["data"], tmp_path / "out")])


def test_open_run_of_nothing():
    with pytest.raises(InputError, match="not a counterlens run directory"):
        cl.open_run("/nonexistent/run")


def test_json_of_a_hostile_class_name_is_escaped_in_the_report(world, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    spec = (run / "run.yaml").read_text().replace("- healthy", "- <script>alert(1)</script>")
    (run / "run.yaml").write_text(spec)
    from counterlens.viz.report import write_report
    html = write_report(run).read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
