"""Faults in the middle of a run: kill -9 of a counterfactual run at random moments, a full disk, a
read-only folder, an index that cannot be written. Each ends with a clear line, a run directory
that opens, and a re-run whose results equal an uninterrupted run's."""
import errno
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import run_driver
from counterlens.cli import main
from counterlens.runs.store import open_run
from counterlens.runs.store.writer import ShardWriter
from test_store import _children, make_images

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("faults") / "data", n_per_class=10)


def same_counterfactuals(a, b):
    ca, cb = a.counterfactuals.set_index("path").sort_index(), b.counterfactuals.set_index("path").sort_index()
    assert list(ca.index) == list(cb.index) and ca.index.is_unique
    assert (ca.valid == cb.valid).all() and (ca.target == cb.target).all()
    for p in ca.index:
        assert np.array_equal(a.counterfactual(p), b.counterfactual(p)), p


@pytest.mark.slow
def test_kill_9_of_a_counterfactual_run_at_random_moments(data, tmp_path):
    reference = tmp_path / "reference"
    run_driver.run_counterfactual(data, reference)
    out = tmp_path / "run"
    rng = np.random.default_rng(1)
    for delay in rng.uniform(1.0, 6.0, size=3):        # import, first batches, mid-run: wherever it lands
        proc = subprocess.Popen([sys.executable, str(HERE / "run_driver.py"), str(data), str(out), "2",
                                 "counterfactual"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(delay))
        for child in _children(proc.pid):
            child_kill(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    summary = run_driver.run_counterfactual(data, out)
    assert summary.done + summary.skipped == 20
    same_counterfactuals(open_run(out), open_run(reference))


def child_kill(pid):
    import os
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fail_on_call(monkeypatch, target, name, n, exc):
    original = getattr(target, name)
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc
        return original(self, *args, **kwargs)
    monkeypatch.setattr(target, name, flaky)


@pytest.mark.parametrize("fault,message", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device; free some space"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (sqlite3.OperationalError("disk I/O error"), "the run's index cannot be written or read"),
], ids=["disk-full", "read-only", "index"])
def test_a_write_that_fails_mid_run_is_one_line_and_the_rerun_completes(data, tmp_path, monkeypatch, capsys, fault,
                                                                      message):
    """The third batch cannot be written: exit 1 with one line, the two batches before it are in the
    run, and once the disk is fine again the same command finishes it, equal to a run without fault."""
    model = tmp_path / "model"
    from counterlens.cards import save_model_card
    from counterlens.models import build_model
    import torch
    kw = {"num_classes": 2, "in_channels": 1, "input_size": [48, 48], "width": 0.25}
    torch.manual_seed(0)
    save_model_card(build_model("small-resnet", **kw), model, architecture="small-resnet", kwargs=kw, classes=["a", "b"])
    args = lambda out: ["explain", "--model", str(model), "--data", str(data), "--out", str(out), "--methods",  # noqa: E731
                        "gradcam,smoothgrad", "--param", "smoothgrad.samples=4", "--images-per-batch", "4",
                        "--workers", "1", "--threads", "1", "--quiet", "--no-report"]
    assert main(args(tmp_path / "reference")) == 0
    with monkeypatch.context() as m:
        _fail_on_call(m, ShardWriter, "_save_arrays", 3, fault)      # the third batch's write fails
        capsys.readouterr()
        assert main(args(tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    partial = open_run(tmp_path / "run")
    assert (partial.cases.status == "done").sum() == 8                 # two batches of 4, whole
    assert main(args(tmp_path / "run")) == 0
    run, ref = open_run(tmp_path / "run"), open_run(tmp_path / "reference")
    assert sorted(run.cases.path) == sorted(ref.cases.path)
    for p in ref.cases.path:
        for m in ("gradcam", "smoothgrad"):
            assert np.array_equal(run.map(p, m), ref.map(p, m)), (p, m)


def test_a_transaction_that_fails_leaves_no_half_batch(tmp_path, monkeypatch):
    """SQLite failing inside a batch's transaction: none of the batch's rows stay."""
    from counterlens.runs.records import Case, CaseResult
    from counterlens.runs.store import prepare_run
    prepare_run(tmp_path / "run", {}, compare=())
    results = [CaseResult(Case(id=f"{i}.png", file=f"/d/{i}.png"), prediction=0, prediction_name="a", probs=[1.0],
                          image=np.zeros((1, 2, 2), np.float32), maps={"m": np.ones((2, 2), np.float32)},
                          targets={"m": 0}) for i in range(3)]
    with ShardWriter(tmp_path / "run") as w:
        w.write(results[:1])
        real = w.db
        calls = {"n": 0}

        class Flaky:
            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return real.__enter__()

            def __exit__(self, *exc):
                return real.__exit__(*exc)

            def execute(self, *a):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise sqlite3.OperationalError("disk I/O error")
                return real.execute(*a)
        w.db = Flaky()
        with pytest.raises(sqlite3.OperationalError):
            w.write(results[1:])
        w.db = real
    assert list(open_run(tmp_path / "run").cases.path) == ["0.png"]
