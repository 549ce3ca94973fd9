"""The run directory: rows written as work completes, resumable, failures recorded, report escaped."""
import sqlite3

import numpy as np
import pytest
import torch
import yaml
from conftest import TinyCNN
from PIL import Image

import counterlens as cl
from counterlens.runs.application import run_explain
from counterlens.data.images import ImageFolder
from counterlens.errors import CounterlensError

EVIL = "<img src=x onerror=alert(1)>"


def make_folder(root, n_per_class=3, size=32, classes=("healthy", "<script>")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / c / f"img{i}.png")
    Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / classes[0] / f"{EVIL}.png")
    (root / classes[1] / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture
def clf():
    torch.manual_seed(0)
    return cl.Classifier(TinyCNN(n_classes=2), preprocess=cl.Normalize([0.5], [0.25]),
                         classes=["healthy", "<script>"], device="cpu", input_size=(32, 32),
                         value_range=(0, 1))


def rows(run, sql):
    with sqlite3.connect(run / "results.sqlite") as db:
        return db.execute(sql).fetchall()


def test_explain_writes_run_directory_and_resumes(tmp_path, clf):
    data = make_folder(tmp_path / "data")
    ds = ImageFolder(data, channels=1, size=32, classes=clf.classes)
    run = tmp_path / "run"
    summary, report = run_explain(clf, ds, run, methods=["gradcam", "integrated_gradients"],
                                  params={"integrated_gradients": {"steps": 8}}, images_per_batch=3,
                                  progress=False, model_source="tiny", data_source=str(data))
    assert (summary.done, summary.failed, summary.skipped) == (7, 1, 0)
    spec = yaml.safe_load((run / "run.yaml").read_text())
    assert spec["methods"]["integrated_gradients"]["steps"] == 8
    assert spec["methods"]["integrated_gradients"]["rule"] == "gausslegendre"
    assert spec["versions"]["torch"] == torch.__version__.split("+")[0] or spec["versions"]["torch"]
    status = dict(rows(run, "SELECT name, status FROM images"))
    assert status["<script>/broken.png"] == "failed" and list(status.values()).count("done") == 7
    err = rows(run, "SELECT error FROM images WHERE name LIKE '%broken.png'")[0][0]
    assert "broken.png" in err
    n_attr = rows(run, "SELECT COUNT(*) FROM attributions")[0][0]
    assert n_attr == 14
    # maps stored equal the library's maps for the same image
    image_id, file = rows(run, "SELECT i.id, a.array_file FROM images i JOIN attributions a ON a.image_id = i.id "
                               "WHERE a.method = 'gradcam' ORDER BY i.id LIMIT 1")[0]
    stored = np.load(run / file).astype(np.float32)
    img = np.load(run / f"arrays/images/{image_id}.npy").astype(np.float32)
    direct = cl.explain(clf, torch.from_numpy(img)[None], methods=["gradcam"])["gradcam"][0].numpy()
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())
    # resume: nothing left to do
    summary2, _ = run_explain(clf, ds, run, methods=["gradcam", "integrated_gradients"],
                              params={"integrated_gradients": {"steps": 8}}, progress=False,
                              model_source="tiny", data_source=str(data))
    assert summary2.done == 0 and summary2.skipped == 7
    # a run killed after some images: delete two rows, re-run does exactly those
    with sqlite3.connect(run / "results.sqlite") as db:
        db.execute("DELETE FROM attributions WHERE image_id IN (SELECT id FROM images WHERE status='done' LIMIT 2)")
    summary3, _ = run_explain(clf, ds, run, methods=["gradcam", "integrated_gradients"],
                              params={"integrated_gradients": {"steps": 8}}, progress=False,
                              model_source="tiny", data_source=str(data))
    assert summary3.done == 2 and rows(run, "SELECT COUNT(*) FROM attributions")[0][0] == 14
    # other settings into the same directory are refused
    with pytest.raises(CounterlensError, match="new --out"):
        run_explain(clf, ds, run, methods=["gradcam"], params={}, progress=False)


def test_report_is_self_contained_and_escapes_user_data(tmp_path, clf):
    data = make_folder(tmp_path / "data")
    ds = ImageFolder(data, channels=1, size=32, classes=clf.classes)
    _, report = run_explain(clf, ds, tmp_path / "run", methods=["gradcam"], params={}, progress=False,
                            model_source="tiny", data_source=str(data))
    html = report.read_text()
    assert EVIL not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("data:image/png;base64,") >= 7 * 2
    assert "http://" not in html and "https://" not in html   # nothing to fetch
    assert "failed to load" in html and "broken.png" in html
