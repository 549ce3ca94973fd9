"""The layer activation change of each case's counterfactual in a run (issue 16): recorded by the
counterfactual stage with both engines and on resume, for images, volumes and multi-label
counterfactuals, stored per case, read back by ``open_run(RUN).activation_changes(case)``, shown in
the report's counterfactual panel, skipped with its reason where the model's layers cannot be
observed, and absent without harm from a run written before it existed."""
import html as htmllib
import re
import shutil
import sqlite3
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import counterlens as cl
from conftest import single_thread
from counterlens.counterfactual.analysis import activation_changes, summary_layers
from counterlens.data.images import ImageFolder
from counterlens.errors import InputError
from counterlens.runs.dataset import counterfactual_folder
from counterlens.viz.report import write_report
from counterlens.viz.report_data import fmt
from test_store import make_images

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
SIZE = 16
PARAMS = {"steps": 8, "seed": 0}


def net_2d(n_out=2):
    """A small CNN with a layer name that must be escaped in HTML."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv<1>", nn.Conv2d(1, 4, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(16, n_out))]))


def classifier(net, classes=("a", "b"), **kw):
    return cl.Classifier(net, classes=list(classes), device="cpu", in_channels=1, value_range=(0, 1), **kw)


def run_cf(clf, folder, out, **kw):
    return counterfactual_folder(clf, folder, out, params=PARAMS, progress=False, workers=1, images_per_batch=4, **kw)


def assert_stored_equal_direct(run, clf, paths=None):
    """Each case's stored numbers equal activation_changes computed on its stored original and counterfactual."""
    paths = list(run.cases.path) if paths is None else paths
    assert paths
    for path in paths:
        stored = run.activation_changes(path)
        x, x_cf = torch.from_numpy(run.image(path)[None]), torch.from_numpy(run.counterfactual(path)[None])
        direct = activation_changes(clf, x, x_cf, layers=summary_layers(clf.module)[0], top=5)
        assert [s["name"] for s in stored] == [d["name"] for d in direct], path
        for s, d in zip(stored, direct):
            assert (s["module"], tuple(s["shape"])) == (d["module"], d["shape"])
            np.testing.assert_allclose(s["relative_change"], d["relative_change"], rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(s["mean_abs_change"], d["mean_abs_change"], rtol=1e-4, atol=1e-9)
            assert [c for c, _ in s["top_channels"]] == [c for c, _ in d["top_channels"]]
            np.testing.assert_allclose([v for _, v in s["top_channels"]], [v for _, v in d["top_channels"]],
                                       rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("acts") / "data", n_per_class=3, size=SIZE)


@pytest.fixture(scope="module")
def clf():
    return classifier(net_2d(), input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def run_dir(clf, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    run_cf(clf, ImageFolder(data, channels=1, size=SIZE, classes=clf.classes), out)
    return out


def test_stored_per_case_numbers_equal_activation_changes_on_the_stored_pair(clf, run_dir):
    run = cl.open_run(run_dir)
    assert len(run.cases) == 6
    assert_stored_equal_direct(run, clf)
    path = run.cases.path[0]
    layers = run.activation_changes(path)
    assert [c["name"] for c in layers] == ["conv<1>", "relu", "fc"]            # parameters or activations
    assert layers[0]["shape"] == [4, SIZE, SIZE] and len(layers[0]["top_channels"]) == 4
    assert layers[-1]["top_channels"] == []                                    # a flat output has no channels
    assert run.activation_record(path)["selection"] == ("the model's 3 leaf modules with parameters or an "
                                                        "activation function")
    assert run.activation_changes(path) == run.activation_changes(run.cases.file[0])  # the file as read names it too
    with pytest.raises(InputError, match="not a case"):
        run.activation_changes("nope.png")


def _panel(html: str, path: str) -> str:
    article = next(a for a in html.split("<article")[1:] if f"<h3>{htmllib.escape(path)}</h3>" in a)
    return article[article.index('<details class="cf-layers"'):article.index("</details>", article.index("cf-layers"))]


def test_the_report_panel_lists_the_layers_of_the_case_with_their_numbers(run_dir):
    write_report(run_dir)
    html = (run_dir / "report.html").read_text()
    run = cl.open_run(run_dir)
    path = run.cases.path[1]
    panel = _panel(html, path)
    layers = run.activation_changes(path)
    assert re.findall(r'<td class="lname">(.*?)</td>', panel) == ["conv&lt;1&gt;", "relu", "fc"]   # escaped
    assert "conv<1>" not in html and html.count("<details class=\"cf-layers\" open>") == 6
    rows = re.findall(r"<tr><td class=\"lname\">.*?</tr>", panel, flags=re.S)
    for row, layer in zip(rows, layers, strict=True):
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        assert cells[1] == layer["module"] and cells[2] == "\u00d7".join(map(str, layer["shape"]))
        assert cells[3] == fmt(layer["relative_change"]) and cells[4] == fmt(layer["mean_abs_change"])
        assert cells[5] == ", ".join(f"{c}: {fmt(v, 2)}" for c, v in layer["top_channels"] if v > 0)
    assert "||a_cf \u2212 a|| / ||a||" in panel and "execution order: the model&#39;s 3 leaf modules" in panel


def test_a_run_written_before_the_layer_changes_still_opens_and_reports(run_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "report.html").unlink(missing_ok=True)
    for shard in (old / "index").glob("*.sqlite"):
        with sqlite3.connect(shard) as con:
            con.execute("DROP TABLE activations")                  # the layout before this change
    run = cl.open_run(old)
    path = run.cases.path[0]
    assert run.counterfactuals is not None and len(run.counterfactuals) == 6
    assert run.activation_record(path) is None and run.case_arrays(path)["activations"] == {}
    with pytest.raises(InputError, match="written before"):
        run.activation_changes(path)
    html = write_report(old).read_text()
    assert 'class="cf"' in html and '<details class="cf-layers"' not in html


def test_a_resumed_run_records_the_cases_it_finishes(clf, data, tmp_path):
    out = tmp_path / "run"
    folder = ImageFolder(data, channels=1, size=SIZE, classes=clf.classes)
    run_cf(clf, folder, out)
    gone = sorted(cl.open_run(out).cases.path)[:3]                 # as if the run had stopped before them
    for shard in (out / "index").glob("*.sqlite"):
        with sqlite3.connect(shard) as con:
            for table in ("cases", "counterfactuals", "activations"):
                con.executemany(f"DELETE FROM {table} WHERE case_id = ?", [(p,) for p in gone])
    assert len(cl.open_run(out).table("activations")) == 3
    run_cf(clf, folder, out)
    run = cl.open_run(out)
    assert len(run.table("activations")) == 6
    assert_stored_equal_direct(run, clf, gone)


def test_volumes_and_multilabel_counterfactuals_record_their_layers(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "vol" / c).mkdir(parents=True)
        for i in range(2):
            nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)),
                     tmp_path / "vol" / c / f"{i}.nii.gz")
    torch.manual_seed(0)
    net3d = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(3, 2))
    clf3d = classifier(net3d, input_size=(8, 8, 8))
    run_cf(clf3d, ImageFolder(tmp_path / "vol", channels=1, size=(8, 8, 8), classes=clf3d.classes), tmp_path / "r3")
    run = cl.open_run(tmp_path / "r3")
    assert run.activation_changes(run.cases.path[0])[0]["shape"] == [3, 8, 8, 8]
    assert_stored_equal_direct(run, clf3d)

    make_images(tmp_path / "ml", n_per_class=4, size=SIZE, classes=("",))      # no labels: one flat folder
    clf_ml = classifier(net_2d(3), classes=("f0", "f1", "f2"), input_size=(SIZE, SIZE), output="multilabel")
    folder = ImageFolder(tmp_path / "ml", channels=1, size=SIZE, classes=["f0", "f1", "f2"])
    run_cf(clf_ml, folder, tmp_path / "rml", target="f1:on")
    run = cl.open_run(tmp_path / "rml")
    assert (run.counterfactuals.target_name == "f1:on").all()
    assert_stored_equal_direct(run, clf_ml)
    assert "cf-layers" in write_report(tmp_path / "rml").read_text()


def test_a_torchscript_model_is_skipped_with_its_reason(data, tmp_path):
    clf = classifier(torch.jit.script(net_2d()), input_size=(SIZE, SIZE))
    run_cf(clf, ImageFolder(data, channels=1, size=SIZE, classes=clf.classes, limit=4), tmp_path / "run")
    run = cl.open_run(tmp_path / "run")
    assert len(run.counterfactuals) == 4                            # the counterfactuals are kept
    record = run.activation_record(run.cases.path[0])
    assert record["layers"] == [] and "TorchScript" in record["skipped"]
    with pytest.raises(InputError, match="no layer activation change: the layer activations cannot be observed"):
        run.activation_changes(run.cases.path[0])
    html = write_report(tmp_path / "run").read_text()
    assert "Not recorded: the layer activations cannot be observed on this model" in html


def test_the_ray_engine_stores_the_same_numbers_as_the_local_one(clf, data, run_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from counterlens.runs.engines.ray import RayEngine
    folder = ImageFolder(data, channels=1, size=SIZE, classes=clf.classes)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_cf(clf, folder, tmp_path / "ray", engine=RayEngine(workers=1, threads=1))
    finally:
        ray.shutdown()
    local, on_ray = cl.open_run(run_dir), cl.open_run(tmp_path / "ray")
    assert sorted(on_ray.cases.path) == sorted(local.cases.path)
    for path in local.cases.path:
        assert on_ray.activation_changes(path) == local.activation_changes(path), path


def test_an_exported_model_whose_layers_report_nothing_is_skipped_with_its_reason():
    from counterlens.loading import ExportedModule
    from counterlens.runs.activations import case_activation_changes
    net = net_2d().eval()
    program = torch.export.export(net, (torch.zeros(2, 1, SIZE, SIZE),))
    clf = classifier(ExportedModule(program.module(), 2, exported_program=program), input_size=(SIZE, SIZE))
    x = torch.rand(2, 1, SIZE, SIZE)
    records = case_activation_changes(clf, x, x + 0.1)
    assert len(records) == 2 and all(r["layers"] == [] and "exported" in r["skipped"] for r in records)
