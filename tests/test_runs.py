"""The pipeline stages: plain data in and out (picklable), failures recorded per file, results equal
to the library's; the local engine's parallelism plan and claims."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TinyCNN
from PIL import Image

import counterlens as cl
from counterlens.data.images import ImageFolder
from counterlens.errors import InputError
from counterlens.runs import pipeline
from counterlens.runs.dataset import explain_folder
from counterlens.runs.engines.local import Job, plan_parallelism
from counterlens.runs.records import CaseResult
from counterlens.runs.store import Claims

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
                         classes=["healthy", "<script>"], device="cpu", input_size=(32, 32), value_range=(0, 1))


def test_stages_take_and_give_plain_picklable_data(tmp_path, clf):
    data = make_folder(tmp_path / "data")
    ds = ImageFolder(data, channels=1, size=32, classes=clf.classes)
    cases = pipeline.cases_of(ds)
    assert [c.id for c in cases][:2] == ["<script>/broken.png", "<script>/img0.png"]
    assert cases[0].label_name == "<script>" and cases[0].label == 1
    batch = pipeline.read_batch(cases, ds.read_options)
    assert len(batch.cases) == 7 and [c.id for c, _ in batch.failed] == ["<script>/broken.png"]
    assert "broken.png" in batch.failed[0][1]
    batch = pickle.loads(pickle.dumps(batch))                       # crosses a process boundary intact
    methods = {"gradcam": {}, "integrated_gradients": {"steps": 8, "batch_size": 64}}
    results = pipeline.explain_batch(clf, batch, methods)
    results = pickle.loads(pickle.dumps(results))
    assert all(isinstance(r, CaseResult) for r in results)
    failed = [r for r in results if r.status == "failed"]
    assert len(failed) == 1 and failed[0].image is None and "broken.png" in failed[0].error
    done = [r for r in results if r.status == "done"]
    x = torch.from_numpy(np.stack([r.image for r in done]))
    direct = cl.explain(clf, x, methods=["gradcam", "integrated_gradients"], integrated_gradients__steps=8)
    for j, r in enumerate(done):
        assert set(r.maps) == set(methods) and r.maps["gradcam"].dtype == np.float32
        np.testing.assert_allclose(r.maps["integrated_gradients"], direct["integrated_gradients"][j], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.probs, clf.probs(x[j:j + 1])[0].numpy(), rtol=1e-5)
        assert r.prediction == int(np.argmax(r.probs)) and r.prediction_name == clf.classes[r.prediction]
        assert r.targets["gradcam"] == r.prediction and r.seconds["gradcam"] > 0


def test_explain_arrays_is_one_call_for_any_engine(clf):
    x = np.random.default_rng(1).random((3, 1, 32, 32)).astype(np.float32)
    out = pipeline.explain_arrays(clf, x, {"saliency": {"batch_size": 64}}, target=1)
    assert out.probs.shape == (3, 2) and list(out.targets) == [1, 1, 1]
    assert out.maps["saliency"].shape == (3, 32, 32) and out.class_names == clf.classes
    direct = cl.explain(clf, torch.from_numpy(x), target=1, methods=["saliency"])["saliency"].numpy()
    np.testing.assert_array_equal(out.maps["saliency"], direct)


def test_mixed_image_sizes_are_explained_in_groups(tmp_path, clf):
    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    for i, s in enumerate((32, 32, 40, 40, 32)):
        Image.fromarray((rng.random((s, s)) * 255).astype(np.uint8)).save(tmp_path / "d" / f"{i}.png")
    ds = ImageFolder(tmp_path / "d", channels=1)
    summary = explain_folder(cl.Classifier(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                               torch.nn.Linear(16, 2)), device="cpu"),
                             ds, tmp_path / "run", methods=["saliency"], images_per_batch=5, progress=False)
    assert (summary.done, summary.failed) == (5, 0)
    run = cl.open_run(tmp_path / "run")
    assert run.map("2.png", "saliency").shape == (40, 40) and run.map("4.png", "saliency").shape == (32, 32)


def test_plan_parallelism():
    cores = len(os.sched_getaffinity(0))
    assert plan_parallelism("cpu", 100) == (cores, 1)                # one single-thread worker per core
    assert plan_parallelism("cpu", 1) == (1, cores)                  # one batch: one worker, every core
    assert plan_parallelism("cpu", 100, workers=1) == (1, cores)
    assert plan_parallelism("cpu", 100, threads=cores) == (1, cores)
    assert plan_parallelism("cuda", 100)[0] == 1
    with pytest.raises(InputError, match="workers=0"):
        plan_parallelism("cpu", 10, workers=0)
    with pytest.raises(InputError, match="stage="):
        Job("train", read={})


def test_claims_split_work_and_are_taken_over_from_dead_processes(tmp_path):
    a = Claims(tmp_path, "explain")
    assert a.claim("k1") and not a.claim("k1")                      # held by a live process (this one)
    a.mark_done("k1")
    later = Claims(tmp_path, "explain", since=0.0)
    assert later.is_done("k1") and not later.claim("k1")
    newer = Claims(tmp_path, "explain", since=1e12)                  # listed its work after the mark: ignores it
    assert not newer.is_done("k1") and newer.claim("k1")
    # a claim of a process that died (kill -9) is stale and taken over
    code = ("import sys; from counterlens.runs.store import Claims; "
            "assert Claims(sys.argv[1], 'explain').claim('k2')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert Claims(tmp_path, "explain").stale("k2") and Claims(tmp_path, "explain").claim("k2")


def test_report_of_a_run_escapes_user_data(tmp_path, clf):
    data = make_folder(tmp_path / "data")
    ds = ImageFolder(data, channels=1, size=32, classes=clf.classes)
    explain_folder(clf, ds, tmp_path / "run", methods=["gradcam"], progress=False)
    from counterlens.viz.report import write_report
    html = write_report(tmp_path / "run").read_text()
    assert EVIL not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("data:image/png;base64,") >= 7 * 2
    assert "http://" not in html and "https://" not in html   # nothing to fetch
    assert "broken.png" in html


def test_random_methods_key_an_image_by_its_case_not_its_row(tmp_path, clf):
    """SmoothGrad noise, IG's uniform baseline and faithfulness tie-breaks follow the case: the same
    image gets the same maps in any batch (another --images-per-batch, a resumed run, a worker)."""
    data = make_folder(tmp_path / "data", n_per_class=4)
    ds = ImageFolder(data, channels=1, size=32, classes=clf.classes)
    methods = ["smoothgrad", "integrated_gradients"]
    params = {"smoothgrad": {"samples": 6}, "integrated_gradients": {"steps": 6, "baseline": "uniform"}}
    for n, out in ((3, "a"), (5, "b")):
        explain_folder(clf, ds, tmp_path / out, methods=methods, params=params, images_per_batch=n, progress=False,
                       threads=1)
    a, b = cl.open_run(tmp_path / "a"), cl.open_run(tmp_path / "b")
    done = list(a.cases.path[a.cases.status == "done"])
    for p in done:
        for m in methods:
            np.testing.assert_allclose(a.map(p, m), b.map(p, m), rtol=1e-5, atol=1e-6)
    # by row instead (the plain library call): the same image in another row gets other noise
    x = torch.from_numpy(np.stack([a.image(p) for p in done[:3]]))
    first = cl.explain(clf, x, methods=["smoothgrad"], smoothgrad__samples=6)["smoothgrad"]
    moved = cl.explain(clf, x.flip(0), methods=["smoothgrad"], smoothgrad__samples=6)["smoothgrad"].flip(0)
    assert not torch.allclose(first, moved, rtol=1e-3)
    from counterlens.attribution.noise import case_keys
    with case_keys(done[:3]):
        keyed = cl.explain(clf, x, methods=["smoothgrad"], smoothgrad__samples=6)["smoothgrad"]
    with case_keys(done[:3][::-1]):
        keyed_moved = cl.explain(clf, x.flip(0), methods=["smoothgrad"], smoothgrad__samples=6)["smoothgrad"].flip(0)
    np.testing.assert_allclose(keyed, keyed_moved, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keyed.numpy(), np.stack([a.map(p, "smoothgrad") for p in done[:3]]), rtol=1e-5, atol=1e-7)
