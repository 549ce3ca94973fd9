"""The Ray engine (issue 14) on one local Ray cluster of 2 CPUs for the module.

The same commands with ``--engine local`` and ``--engine ray`` give the same run: the same cases,
bit-identical maps of deterministic (Grad-CAM, integrated gradients) and seeded (SmoothGrad)
methods, the same counterfactuals and the same ``evaluate`` metrics; a file that fails in a worker
is recorded with its reason as locally; an actor killed with kill -9 in the middle and a driver
killed in the middle lose nothing and double nothing; the README's Ray Data example runs. Every
torch computation uses one thread (``--threads 1`` locally, ``--cpus-per-worker 1`` on Ray), so the
two engines run the same kernels.
"""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import single_thread
from counterlens.cli import main
from counterlens.runs.store import open_run
from test_store import make_images

ROOT = Path(__file__).resolve().parents[1]


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
        return ray
    except ImportError as exc:
        reason = f"Ray is not installed ({exc}); `make test` installs it (pip install 'counterlens[ray]')"
        if os.environ.get("COUNTERLENS_REQUIRE_RAY") == "1":
            raise RuntimeError(f"COUNTERLENS_REQUIRE_RAY=1 but the Ray tests cannot run: {reason}") from None
        pytest.skip(f"RAY TESTS NOT RUN: {reason}", allow_module_level=True)


ray = _ray()
_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

SIZE = 32
N_IMAGES = 20                       # + one broken file
EXPLAIN = ["--methods", "gradcam,integrated_gradients,smoothgrad", "--param", "integrated_gradients.steps=8",
           "--param", "smoothgrad.samples=4", "--images-per-batch", "4", "--quiet", "--no-report"]
COUNTERFACTUAL = ["--steps", "20", "--images-per-batch", "4", "--quiet", "--no-report"]
EVALUATE = ["--metrics", "deletion_auc,insertion_auc,mufidelity,sparseness,ig_completeness_error,relevance_mass",
            "--steps", "5", "--sanity-images", "2", "--images-per-batch", "8", "--quiet"]
LOCAL = ["--workers", "2", "--threads", "1"]
RAY = ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "1"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs (the engine uses it: this process has called ray.init); its address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from counterlens.cards import save_model_card
    from counterlens.models import build_model
    kw = {"num_classes": 2, "in_channels": 1, "input_size": [SIZE, SIZE], "width": 0.25}
    torch.manual_seed(0)
    return save_model_card(build_model("small-resnet", **kw), tmp_path_factory.mktemp("model") / "model",
                           architecture="small-resnet", kwargs=kw, classes=["a", "b"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_images(tmp_path_factory.mktemp("ray") / "data", n_per_class=N_IMAGES // 2, size=SIZE, masks=True)
    (root / "b" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    return root


def explain(model, data, out, *engine):
    return ["explain", "--model", str(model), "--data", str(data), "--out", str(out), "--masks",
            str(data.parent / "masks"), *EXPLAIN, *engine]


def commands(model, data, out, engine):
    """explain and evaluate into ``out``; counterfactuals into ``out``-cf (a counterfactual run into
    an explain run's folder replaces its case rows, and with them the explain run's masks)."""
    return [explain(model, data, out, *engine),
            ["evaluate", str(out), *EVALUATE, *(engine if "ray" in engine else [])],
            ["counterfactual", "--model", str(model), "--data", str(data), "--out", f"{out}-cf", *COUNTERFACTUAL,
             *engine]]


@pytest.fixture(scope="module")
def runs(cluster, model, data, tmp_path_factory):
    """The same explain, evaluate and counterfactual commands with each engine: ``{engine: run dir}``
    (the counterfactuals in ``<run dir>-cf``)."""
    out = {}
    for name, engine in (("local", LOCAL), ("ray", RAY)):
        out[name] = tmp_path_factory.mktemp(name) / "run"
        for args in commands(model, data, out[name], engine):
            assert main(args) == 0, args
    return out


def assert_same_explained(run, reference):
    a, b = run.cases.set_index("path").sort_index(), reference.cases.set_index("path").sort_index()
    assert list(a.index) == list(b.index) and a.index.is_unique
    cols = ["file", "label", "prediction", "probability", "prob_a", "prob_b", "status", "error"]
    differ = {c: a.index[(a[c] != b[c]) & ~(a[c].isna() & b[c].isna())].tolist() for c in cols}
    assert a[cols].equals(b[cols]), {c: (rows, a.loc[rows, c].tolist(), b.loc[rows, c].tolist())
                                     for c, rows in differ.items() if rows} or (a[cols].dtypes, b[cols].dtypes)
    assert reference.methods == ["gradcam", "integrated_gradients", "smoothgrad"] == run.methods
    for path in b.index[b.status == "done"]:
        for method in reference.methods:
            assert np.array_equal(run.map(path, method), reference.map(path, method)), (path, method)
        assert np.array_equal(run.image(path), reference.image(path))
        assert reference.mask(path).any() and np.array_equal(run.mask(path), reference.mask(path))


@pytest.mark.slow
def test_the_same_command_gives_the_same_run_with_both_engines(runs):
    ray_run, local_run = open_run(runs["ray"]), open_run(runs["local"])
    assert (ray_run.cases.status == "done").sum() == N_IMAGES
    assert_same_explained(ray_run, local_run)
    # the Ray actors wrote it: every claim is one of the Ray run's, and no shard is this process's
    claims = [json.loads(f.read_text()) for f in (runs["ray"] / "claims").glob("explain-*")]
    assert len(claims) == 6 and all(c["done"] and c["job"] and c["pid"] != os.getpid() for c in claims)
    assert not list((runs["ray"] / "index").glob(f"*-{os.getpid()}-*.sqlite"))


@pytest.mark.slow
def test_counterfactuals_are_the_same_with_both_engines(runs):
    ray_run, local_run = open_run(f"{runs['ray']}-cf"), open_run(f"{runs['local']}-cf")
    a, b = ray_run.counterfactuals.set_index("path").sort_index(), local_run.counterfactuals.set_index("path").sort_index()
    assert len(a) == N_IMAGES and list(a.index) == list(b.index)
    columns = [c for c in b.columns if c != "seconds"]
    assert a[columns].equals(b[columns])
    for path in b.index:
        assert np.array_equal(ray_run.counterfactual(path), local_run.counterfactual(path))


@pytest.mark.slow
def test_evaluate_gives_the_same_metrics_with_both_engines(runs):
    a, b = open_run(runs["ray"]).metrics, open_run(runs["local"]).metrics
    key = ["path", "method", "metric"]
    a = a.astype({k: str for k in key}).sort_values(key).reset_index(drop=True)
    b = b.astype({k: str for k in key}).sort_values(key).reset_index(drop=True)
    assert len(b) == N_IMAGES * (3 * 5 + 1)            # 5 metrics per method, + the completeness error of IG
    assert a[key].equals(b[key])
    np.testing.assert_array_equal(a["value"].to_numpy(float), b["value"].to_numpy(float))
    shards = set(open_run(runs["ray"]).table("metrics").shard.astype(str))       # written by the actors
    assert shards and not any(f"-{os.getpid()}-" in shard for shard in shards)
    for name in ("metrics.csv", "curves.json", "sanity.json"):
        assert (runs["ray"] / name).read_text() == (runs["local"] / name).read_text(), name


@pytest.mark.slow
def test_a_file_that_fails_in_a_worker_is_recorded_with_its_reason(runs):
    rows = {name: open_run(path).cases.set_index("path").loc["b/zz-broken.png"] for name, path in runs.items()}
    assert rows["ray"].status == "failed" == rows["local"].status
    assert "zz-broken.png" in rows["ray"].error and rows["ray"].error == rows["local"].error


@pytest.mark.slow
def test_the_report_reads_a_ray_run(runs):
    assert main(["report", str(runs["ray"])]) == 0
    assert (runs["ray"] / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_replaced_and_every_case_is_there_once(cluster, model, data, runs, tmp_path):
    """kill -9 of the actor holding the first claimed batch: Ray restarts it and runs its batches
    again, the new actor takes the dead one's claim over, and the run equals the local one."""
    out, killed = tmp_path / "run", {}

    def kill_the_first_holder():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for claim in sorted((out / "claims").glob("explain-*")) if (out / "claims").is_dir() else []:
                try:
                    holder = json.loads(claim.read_text())
                except (OSError, ValueError):
                    continue                        # being written
                if not holder.get("done") and holder["pid"] != os.getpid():
                    os.kill(holder["pid"], signal.SIGKILL)
                    killed.update(claim=claim, pid=holder["pid"])
                    return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_the_first_holder, daemon=True)
    watcher.start()
    assert main(explain(model, data, out, *RAY)) == 0
    watcher.join(timeout=5)
    assert killed, "no actor was seen holding a batch"
    run = open_run(out)
    assert len(run.cases) == N_IMAGES + 1 and run.cases.path.is_unique
    assert_same_explained(run, open_run(runs["local"]))
    holder = json.loads(killed["claim"].read_text())
    assert holder["done"] and holder["pid"] != killed["pid"]     # taken over and finished by another actor


def _written(out: Path) -> int:
    try:
        return open_run(out).written_rows("cases")
    except Exception:                 # noqa: BLE001 - not created yet
        return 0


@pytest.mark.slow
def test_a_killed_driver_loses_nothing_and_the_same_command_resumes(cluster, model, data, runs, tmp_path, capsys):
    """The command in its own process joins the cluster (RAY_ADDRESS), is killed with kill -9 once
    its first batch is written; the same command again resumes and ends equal to the local run."""
    out = tmp_path / "run"
    args = explain(model, data, out, "--engine", "ray", "--workers", "1")
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "counterlens.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "RAY_ADDRESS": cluster})
        deadline = time.time() + 240
        while _written(out) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    at_kill = len(open_run(out).cases)
    assert 4 <= at_kill < N_IMAGES + 1, (at_kill, (tmp_path / "stderr").read_text()[-2000:])
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    resumed = re.search(r"explained (\d+) images \((\d+) already done, (\d+) failed\)", printed)
    assert resumed and int(resumed[2]) >= at_kill - 1, printed          # the broken file is tried again
    assert int(resumed[1]) + int(resumed[2]) <= N_IMAGES     # (less: batches the killed run's actors finished meanwhile)
    assert_same_explained(open_run(out), open_run(runs["local"]))


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### On Ray Data.*?```python\n(.*?)```", text, re.S)
    assert block, "README: the Ray Data example"
    return block[1]


@pytest.mark.slow
def test_the_readme_ray_data_example_runs(cluster, model, tmp_path):
    import counterlens as cl
    from counterlens.data.images import ImageFolder
    data = tmp_path / "data"
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).save(data / c / f"{i}.png")
    code = (readme_example().replace('"models/mri"', repr(str(model))).replace('"data/mri/Testing"', repr(str(data)))
            .replace("size=64", f"size={SIZE}").replace('"explained/"', repr(str(tmp_path / "explained"))))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    table = ray.data.read_parquet(str(tmp_path / "explained")).to_pandas().set_index("id").sort_index()
    assert list(table.index) == [f"{c}/{i}.png" for c in ("a", "b") for i in range(5)]
    assert {"prediction", "probs", "map.gradcam", "map.integrated_gradients", "metric.gradcam.deletion_auc",
            "metric.integrated_gradients.sparseness", "seconds.gradcam"} <= set(table.columns)
    # the maps are the library's maps of the same images (other batches: equal to float precision)
    clf = cl.load_classifier(model, device="cpu")
    folder = ImageFolder(data, channels=1, size=SIZE)
    x = torch.from_numpy(np.stack([folder.load(i)[0] for i in range(len(folder))]))
    direct = cl.explain(clf, x, methods=["gradcam", "integrated_gradients"], integrated_gradients__steps=16)
    for j, case in enumerate(table.index):
        for method in ("gradcam", "integrated_gradients"):
            stored = np.asarray(table.loc[case, f"map.{method}"], np.float32)
            assert stored.shape == (SIZE, SIZE)
            np.testing.assert_allclose(stored, direct[method][j].numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_classifier_made_in_python_runs_on_ray_as_locally(cluster, data, tmp_path):
    """The library call with an in-memory classifier (no model file): the driver pickles it to the
    actors; the maps equal the local engine's."""
    import counterlens as cl
    from counterlens.data.images import ImageFolder
    from counterlens.models import build_model
    from counterlens.runs.dataset import explain_folder
    from counterlens.runs.engines.ray import RayEngine
    torch.manual_seed(1)
    clf = cl.Classifier(build_model("brain-tumor-cnn", num_classes=2, input_size=[SIZE, SIZE], width=0.25),
                        classes=["a", "b"], device="cpu", input_size=(SIZE, SIZE))
    ds = ImageFolder(data, channels=1, size=SIZE, classes=clf.classes, limit=8)
    kw = dict(methods=["gradcam", "smoothgrad"], params={"smoothgrad": {"samples": 4}}, images_per_batch=4,
              progress=False)
    explain_folder(clf, ds, tmp_path / "local", workers=1, threads=1, **kw)
    summary = explain_folder(clf, ds, tmp_path / "ray", engine=RayEngine(workers=1), **kw)
    assert (summary.done, summary.workers, summary.threads) == (8, 1, 1) and summary.first_result > 0
    run, reference = open_run(tmp_path / "ray"), open_run(tmp_path / "local")
    assert sorted(run.cases.path) == sorted(reference.cases.path)
    for path in reference.cases.path:
        for method in ("gradcam", "smoothgrad"):
            assert np.array_equal(run.map(path, method), reference.map(path, method)), (path, method)


@pytest.mark.slow
def test_an_error_in_a_worker_ends_the_run_as_that_error(cluster, tmp_path):
    """Ours (and a model the actor may not load) as itself, for the command's one line; anything
    else as RunFailedError with the worker's traceback behind it; nothing retried in vain."""
    import counterlens as cl
    from counterlens.errors import InputError, RunFailedError, UntrustedModelError
    from counterlens.models import build_model
    from counterlens.runs.engines.ray import RayEngine
    ns = {"__name__": "failing_work"}                 # a module the actors cannot import: pickled by value
    exec("from counterlens.errors import InputError\n"
         "def work(clf, payload):\n"
         "    if payload == 2:\n"
         "        raise InputError('case 2: pass another thing')\n"
         "    return payload\n"
         "def bug(clf, payload):\n"
         "    return 1 / 0\n", ns)
    net = build_model("brain-tumor-cnn", num_classes=2, input_size=[SIZE, SIZE], width=0.25)
    clf = cl.Classifier(net, device="cpu")
    seen = []
    with pytest.raises(InputError, match="^case 2: pass another thing$"):
        RayEngine(workers=1).map(clf, [0, 1, 2, 3], ns["work"], lambda i, r: seen.append(r))
    assert 2 not in seen
    with pytest.raises(RunFailedError, match=r"a Ray worker failed \(ZeroDivisionError: division by zero\)") as info:
        RayEngine(workers=1).map(clf, [0], ns["bug"], lambda i, r: None)
    assert "in bug\nZeroDivisionError" in str(info.value.__cause__)          # where, in the worker
    torch.save(net, tmp_path / "pickled.pt")                 # a full pickle: refused in the actor without trust
    with pytest.raises(UntrustedModelError, match="trust"):
        RayEngine(workers=1, model={"source": str(tmp_path / "pickled.pt")}).map(clf, [0], ns["work"], lambda i, r: None)
