"""The run directory at scale: open_run round trip, float32 maps, refusal of mixed settings,
kill -9 at any moment then resume (bitwise), two processes writing one run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import counterlens as cl
import run_driver
from counterlens.data.images import ImageFolder
from counterlens.errors import InputError
from counterlens.runs.dataset import explain_folder
from counterlens.runs.records import Case, CaseResult
from counterlens.runs.store import RunMismatchError, ShardWriter, open_run, prepare_run

HERE = Path(__file__).parent


def make_images(root, n_per_class=24, size=48, classes=("a", "b"), masks=False):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / c / f"{i:02d}.png")
            if masks:
                (root.parent / "masks").mkdir(exist_ok=True)
                m = np.zeros((size, size), np.uint8)
                m[4 + i % 8:20 + i % 8, 10:30] = 255
                Image.fromarray(m).save(root.parent / "masks" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("store") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run every interrupted or concurrent run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = run_driver.run(data, out, workers=1)
    assert (summary.done, summary.failed) == (48, 0)
    return open_run(out)


def assert_same_run(run, reference):
    a, b = run.cases.set_index("path"), reference.cases.set_index("path")
    assert sorted(a.index) == sorted(b.index) and a.index.is_unique
    cols = ["prediction", "status", "probability", "prob_a", "prob_b"]
    assert a.loc[b.index, cols].equals(b[cols])
    for path in b.index:
        for method in reference.methods:
            assert np.array_equal(run.map(path, method), reference.map(path, method)), (path, method)


def test_open_run_round_trip(tmp_path):
    data = make_images(tmp_path / "data", n_per_class=5, size=32, masks=True)
    (data / "b" / "broken.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    from conftest import TinyCNN
    clf = cl.Classifier(TinyCNN(n_classes=2), preprocess=cl.Normalize([0.5], [0.25]), classes=["a", "b"],
                        device="cpu", input_size=(32, 32), value_range=(0, 1))
    ds = ImageFolder(data, channels=1, size=32, classes=clf.classes, masks=tmp_path / "masks")
    summary = explain_folder(clf, ds, tmp_path / "run", methods=["gradcam", "integrated_gradients"],
                             params={"integrated_gradients": {"steps": 8}}, images_per_batch=4, progress=False)
    assert (summary.done, summary.failed) == (10, 1)
    assert summary.failures[0][0] == "b/broken.png" and "broken.png" in summary.failures[0][1]
    run = cl.open_run(tmp_path / "run")
    cases = run.cases
    assert list(cases.columns[:4]) == ["path", "file", "label", "prediction"]
    assert {"prob_a", "prob_b", "status", "error"} <= set(cases.columns)
    assert cases.set_index("path").loc["b/broken.png", "status"] == "failed"
    assert "broken.png" in cases.set_index("path").loc["b/broken.png", "error"]
    done = cases[cases.status == "done"]
    assert len(done) == 10 and np.allclose(done.prob_a + done.prob_b, 1, atol=1e-6)
    assert run.methods == ["gradcam", "integrated_gradients"]
    assert run.spec["methods"]["integrated_gradients"]["steps"] == 8
    assert run.metrics is None and run.counterfactuals is None
    # each stored map is float32, in the image's shape, and equals the library's map of that image
    paths = list(done.path)
    x = torch.from_numpy(np.stack([run.image(p) for p in paths[:4]]))
    np.testing.assert_array_equal(x.numpy(), np.stack([ds.load(i)[0] for i in range(4)]))
    direct = cl.explain(clf, x, methods=["integrated_gradients"], integrated_gradients__steps=8)
    for j, p in enumerate(paths[:4]):
        stored = run.map(p, "integrated_gradients")
        assert stored.dtype == np.float32 and stored.shape == (32, 32)
        np.testing.assert_allclose(stored, direct["integrated_gradients"][j].numpy(), rtol=1e-5, atol=1e-7)
    assert run.mask(paths[0]).dtype == bool and run.mask(paths[0]).sum() > 0
    assert run.map(str(data / "a" / "00.png"), "gradcam").shape == (32, 32)     # the file path works too
    with pytest.raises(InputError, match="is not a case"):
        run.map("nope.png", "gradcam")
    att = run.attributions
    assert set(att.method) == {"gradcam", "integrated_gradients"} and len(att) == 20
    # one array file per batch, not per image and method
    files = list((tmp_path / "run" / "arrays").rglob("*.npz"))
    assert len(files) == 3


def test_maps_float32_by_default_and_float16_refused_out_of_range(tmp_path):
    prepare_run(tmp_path / "run", {"model": {}}, compare=())
    case = Case(id="x.png", file="/data/x.png")
    big = np.array([[1e5, 3e-9], [0.0, -2.5]], np.float32)
    with ShardWriter(tmp_path / "run") as w:
        w.write([CaseResult(case, prediction=0, prediction_name="a", probs=[1.0], image=np.zeros((1, 2, 2), np.float32),
                            maps={"m": big}, targets={"m": 0}, seconds={"m": 0.1})])
    assert np.array_equal(open_run(tmp_path / "run").map("x.png", "m"), big)    # nothing clipped or flushed
    with ShardWriter(tmp_path / "run", map_dtype="float16") as w, pytest.raises(InputError, match="float16 cannot hold"):
        w.write([CaseResult(case, image=np.zeros((1, 2, 2), np.float32), maps={"m": big}, targets={"m": 0})])
    with pytest.raises(InputError, match="map_dtype"):
        ShardWriter(tmp_path / "run", map_dtype="int8")


def test_other_settings_are_refused_not_mixed(tmp_path, data, reference):
    out = tmp_path / "run"
    clf = run_driver.classifier()
    ds = ImageFolder(data, channels=1, size=run_driver.SIZE, classes=clf.classes, limit=8)
    kw = dict(params=run_driver.PARAMS, images_per_batch=4, progress=False)
    explain_folder(clf, ds, out, methods=run_driver.METHODS, **kw)
    with pytest.raises(RunMismatchError, match=r"methods.integrated_gradients.steps: 48 in the run, 16 now.*--overwrite"):
        explain_folder(clf, ds, out, methods=run_driver.METHODS,
                       params={**run_driver.PARAMS, "integrated_gradients": {"steps": 16}}, images_per_batch=4,
                       progress=False)
    with pytest.raises(RunMismatchError, match="methods.occlusion: not in the run"):
        explain_folder(clf, ds, out, methods=run_driver.METHODS + ["occlusion"], **kw)
    with pytest.raises(RunMismatchError, match="target: 'predicted' in the run, 'b' now"):
        explain_folder(clf, ds, out, methods=run_driver.METHODS, target="b", **kw)
    other = run_driver.classifier()
    with torch.no_grad():
        next(other.module.parameters()).add_(0.01)
    with pytest.raises(RunMismatchError, match="model.weights_sha256"):
        explain_folder(other, ds, out, methods=run_driver.METHODS, **kw)
    other_data = make_images(tmp_path / "other", n_per_class=2, size=48)
    with pytest.raises(RunMismatchError, match="data.path"):
        explain_folder(clf, ImageFolder(other_data, channels=1, size=48, classes=clf.classes), out,
                       methods=run_driver.METHODS, **kw)
    assert len(open_run(out).cases) == 8                       # nothing was written by the refused calls
    summary = explain_folder(clf, ds, out, methods=["gradcam"], overwrite=True, images_per_batch=4, progress=False)
    assert summary.done == 8 and open_run(out).methods == ["gradcam"]
    assert set(open_run(out).attributions.method) == {"gradcam"}


def test_out_inside_the_data_folder_is_refused(tmp_path):
    data = make_images(tmp_path / "data", n_per_class=1, size=48)
    clf = run_driver.classifier()
    ds = ImageFolder(data, channels=1, size=48, classes=clf.classes)
    with pytest.raises(InputError, match="inside the data folder"):
        explain_folder(clf, ds, data / "a" / "run", methods=["gradcam"], progress=False)
    assert not (data / "a" / "run").exists()


def test_out_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.html").write_text("my own report")
    with pytest.raises(InputError, match="not a counterlens run"):
        prepare_run(tmp_path / "mine", {}, compare=())
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        prepare_run(tmp_path / "file", {}, compare=())
    assert (tmp_path / "mine" / "report.html").read_text() == "my own report"


def _spawn(data, out, workers=1):
    return subprocess.Popen([sys.executable, str(HERE / "run_driver.py"), str(data), str(out), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _committed(out) -> int:
    try:
        return open_run(out).written_rows("cases")
    except InputError:
        return 0


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_result(tmp_path, data, reference):
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    kills = 0
    for goal in (0, 12, 30):           # before anything is written, after 3 batches, after ~7 of 12
        proc = _spawn(data, out, workers=2 if goal == 30 else 1)
        deadline = time.time() + 120
        while _committed(out) < goal and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.3)))        # somewhere inside the next batch
        if proc.poll() is None:
            for child in _children(proc.pid):      # forked workers first, then their parent
                os.kill(child, signal.SIGKILL)
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    before = _committed(out)
    assert before < 48                                 # it really was interrupted
    summary = run_driver.run(data, out, workers=1)
    assert summary.done + summary.skipped == 48 and summary.failed == 0
    run = open_run(out)
    assert_same_run(run, reference)
    # work redone: at most the batches in flight when each process was killed (2 workers: 2 batches)
    assert run.written_rows("cases") - 48 <= 4 * (1 + 1 + 2)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_two_processes_write_one_run(tmp_path, data, reference):
    out = tmp_path / "run"
    procs = [_spawn(data, out), _spawn(data, out)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    run = open_run(out)
    assert_same_run(run, reference)
    shards = list((out / "index").glob("*.sqlite"))
    assert len(shards) == 2
    assert run.written_rows("cases") == 48            # claims split the work: no case was done twice


def test_file_names_that_are_not_utf8_are_explained_and_shown_escaped(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in (b"ok.png", b"caf\xe9.png", b"\xff\xfe.png"):
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(os.fsdecode(bytes(data) + b"/" + name))
    Path(os.fsdecode(bytes(data) + b"/bad\xff.png")).write_bytes(b"junk")
    clf = run_driver.classifier()
    summary = explain_folder(clf, ImageFolder(data, channels=1, size=48), tmp_path / "run", methods=["gradcam"],
                             progress=False)
    assert (summary.done, summary.failed) == (3, 1)
    run = open_run(tmp_path / "run")
    assert sorted(run.cases.path) == ["\\xff\\xfe.png", "bad\\xff.png", "caf\\xe9.png", "ok.png"]
    assert run.map("caf\\xe9.png", "gradcam").shape == (48, 48)
    assert "bad\\xff.png" in run.cases.set_index("path").loc["bad\\xff.png", "error"]
    from counterlens.cli.common import print_summary
    from counterlens.viz.report import write_report
    html = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "caf\\xe9.png" in html
    print_summary("explained", summary, tmp_path / "run")
    assert "failed: bad\\xff.png" in capsys.readouterr().out


def test_values_outside_the_models_range_warn(tmp_path):
    (tmp_path / "ct").mkdir()
    hu = np.random.default_rng(0).uniform(-1000, 1500, (1, 48, 48)).astype(np.float32)   # Hounsfield units
    np.save(tmp_path / "ct" / "slice.npy", hu)
    clf = run_driver.classifier()                                     # value_range (0, 1)
    with pytest.warns(UserWarning, match=r"outside the range the model takes \(0..1"):
        explain_folder(clf, ImageFolder(tmp_path / "ct", channels=1, size=48), tmp_path / "run",
                       methods=["saliency"], progress=False)


def test_counterfactual_stage_keeps_the_cases_ground_truth_mask(tmp_path):
    """Counterfactuals into an explain run's folder write the cases again (without the ground-truth
    mask, or with an editable one): the case as the explain stage read it must stay the case."""
    from conftest import TinyCNN
    from counterlens.runs.dataset import counterfactual_folder
    data = make_images(tmp_path / "data", n_per_class=3, size=32, masks=True)
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(n_classes=2), classes=["a", "b"], device="cpu", input_size=(32, 32),
                        value_range=(0, 1))
    with_masks = ImageFolder(data, channels=1, size=32, classes=clf.classes, masks=tmp_path / "masks")
    explain_folder(clf, with_masks, tmp_path / "run", methods=["gradcam"], progress=False)
    before = cl.open_run(tmp_path / "run")
    truth = {p: before.mask(p) for p in before.cases["path"]}
    assert all(m is not None and m.any() for m in truth.values())
    counterfactual_folder(clf, ImageFolder(data, channels=1, size=32, classes=clf.classes), tmp_path / "run",
                          params={"steps": 5}, progress=False)
    after = cl.open_run(tmp_path / "run")
    assert len(after.counterfactuals) == len(truth)
    for path, mask in truth.items():
        assert np.array_equal(after.mask(path), mask), path
        assert after.editable_mask(path) is None          # no --editable-masks: the whole image was editable
