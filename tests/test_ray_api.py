"""The library entry for other engines (issue 14), without a cluster: ``explain_cases`` gives a run's
maps and metrics bit for bit in a fixed schema; ``load_classifier`` builds the classifier from a path
or bytes with load_model's checks; ``--engine ray`` without Ray is one line naming what to install;
Ray options are checked before anything runs."""
import io
import sys
import zipfile

import numpy as np
import pytest
import torch

import counterlens as cl
import run_driver
from conftest import single_thread
from counterlens.cli import main
from counterlens.data.images import ImageFolder
from counterlens.errors import InputError, ModelLoadError, UntrustedModelError
from counterlens.runs.dataset import explain_folder
from counterlens.runs.evaluate import evaluate_run
from counterlens.runs.pipeline import cases_of
from counterlens.runs.store import open_run
from test_store import make_images

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
METRICS = ["deletion_auc", "mufidelity", "sparseness", "ig_completeness_error", "relevance_mass"]
OPTIONS = {"steps": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("api") / "data", n_per_class=6, size=run_driver.SIZE, masks=True)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A local run of run_driver's methods (one seeded), then evaluate, both in batches of 4."""
    out = tmp_path_factory.mktemp("api-run") / "run"
    clf = run_driver.classifier()
    ds = ImageFolder(data, channels=1, size=run_driver.SIZE, classes=clf.classes, masks=data.parent / "masks")
    explain_folder(clf, ds, out, methods=run_driver.METHODS, params=run_driver.PARAMS, images_per_batch=4,
                   workers=1, threads=1, progress=False)
    evaluate_run(out, clf, metrics=METRICS, steps=OPTIONS["steps"], images_per_batch=4, sanity=False)
    return open_run(out), ds


def test_explain_cases_gives_a_runs_maps_and_metrics_bit_for_bit(run):
    stored, ds = run
    clf = run_driver.classifier()
    cases = cases_of(ds)
    assert [c.id for c in cases] == sorted(c.id for c in cases)      # evaluate's batches are the run's batches
    for start in range(0, len(cases), 4):
        batch = cases[start:start + 4]
        x = np.stack([ds.load(start + j)[0] for j in range(len(batch))])
        masks = [stored.mask(c.id) for c in batch]
        records = cl.explain_cases(clf, x, [c.id for c in batch], labels=[c.label for c in batch], masks=masks,
                                   methods=stored.spec["methods"], metrics=METRICS, metric_options=OPTIONS)
        for c, rec in zip(batch, records):
            row = stored.cases.set_index("path").loc[c.id]
            assert rec["id"] == c.id and rec["label"] == c.label and rec["prediction"] == row.prediction_index
            assert np.array_equal(rec["probs"], np.float32([row.prob_a, row.prob_b]))
            values = stored.metrics[stored.metrics.path == c.id]
            for method in run_driver.METHODS:
                assert np.array_equal(rec[f"map.{method}"], stored.map(c.id, method)), (c.id, method)
                for metric in METRICS:
                    key = f"metric.{method}.{metric}"
                    if metric == "ig_completeness_error" and method != "integrated_gradients":
                        assert key not in rec
                        continue
                    want = values[(values.method == method) & (values.metric == metric)].value
                    assert rec[key] == float(want.iloc[0]), key


def test_explain_cases_keys_are_the_same_in_every_batch(data):
    clf = run_driver.classifier()
    ds = ImageFolder(data, channels=1, size=run_driver.SIZE, classes=clf.classes)
    x = np.stack([ds.load(i)[0] for i in range(3)])
    mask = np.zeros(x.shape[2:], bool)
    mask[:10, :10] = True
    kw = dict(methods=["gradcam", "integrated_gradients"], params={"integrated_gradients": {"steps": 4}},
              metrics=["sparseness", "relevance_mass", "ig_completeness_error"])
    with_masks = cl.explain_cases(clf, x, ["a", "b", "c"], masks=[mask, None, mask], **kw)
    without = cl.explain_cases(clf, x[:2], ["a", "b"], **kw)
    keys = ["id", "label", "prediction", "probs", "map.gradcam", "target.gradcam", "seconds.gradcam",
            "metric.gradcam.sparseness", "metric.gradcam.relevance_mass", "map.integrated_gradients",
            "target.integrated_gradients", "seconds.integrated_gradients", "metric.integrated_gradients.sparseness",
            "metric.integrated_gradients.relevance_mass", "metric.integrated_gradients.ig_completeness_error",
            "seconds.metrics"]
    assert all(list(r) == keys for r in with_masks + without)
    assert with_masks[0]["label"] == -1 and with_masks[0]["probs"].dtype == np.float32
    assert np.isfinite(with_masks[0]["metric.gradcam.relevance_mass"])
    assert np.isnan(with_masks[1]["metric.gradcam.relevance_mass"])          # no mask: undefined, not dropped
    assert np.isnan(without[0]["metric.gradcam.relevance_mass"])
    assert without[0]["metric.gradcam.sparseness"] == with_masks[0]["metric.gradcam.sparseness"]
    with pytest.raises(InputError, match="one id per image"):
        cl.explain_cases(clf, x, ["a"], **kw)
    with pytest.raises(InputError, match="metric_options"):
        cl.explain_cases(clf, x, ["a", "b", "c"], metric_options={"step": 3}, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from counterlens.cards import save_model_card
    from counterlens.models import build_model
    root = tmp_path_factory.mktemp("models")
    kw = {"num_classes": 2, "in_channels": 1, "input_size": [32, 32], "width": 0.25}
    torch.manual_seed(0)
    net = build_model("small-resnet", **kw).eval()
    save_model_card(net, root / "dir", architecture="small-resnet", kwargs=kw, classes=["a", "b"])
    torch.jit.script(net).save(str(root / "scripted.pt"))
    torch.save(net.state_dict(), root / "state.pt")
    torch.save(net, root / "pickled.pt")
    from safetensors.torch import save_file
    save_file(net.state_dict(), str(root / "weights.safetensors"))
    return root, net


def test_load_classifier_from_a_path_or_bytes_with_load_models_checks(models):
    from counterlens.loading import load_model
    root, net = models
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = net(x)
    factory = "counterlens.models:build_model"
    fkw = {"factory_kwargs": {"name": "small-resnet", "num_classes": 2, "in_channels": 1, "input_size": [32, 32],
                              "width": 0.25}}
    reference = load_model(root / "dir", device="cpu")
    for source, kw in [(root / "dir", {}), (cl.pack_model(root / "dir"), {}), (root / "scripted.pt", {}),
                       ((root / "scripted.pt").read_bytes(), {}),
                       ((root / "state.pt").read_bytes(), {"factory": factory, **fkw}),
                       ((root / "weights.safetensors").read_bytes(), {"factory": factory, **fkw})]:
        clf = cl.load_classifier(source, device="cpu", **kw)
        assert torch.equal(clf.logits(x).detach(), want), type(source)
    assert cl.load_classifier(cl.pack_model(root / "dir"), device="cpu").source_hash == reference.source_hash
    assert cl.load_classifier(cl.pack_model(root / "dir"), sha256=reference.source_hash).classes == ["a", "b"]
    with pytest.raises(ModelLoadError, match=r"not 0{64} \(the run's model\)"):
        cl.load_classifier(cl.pack_model(root / "dir"), sha256="0" * 64)
    with pytest.raises(UntrustedModelError, match="trust"):
        cl.load_classifier((root / "pickled.pt").read_bytes())
    assert cl.load_classifier((root / "pickled.pt").read_bytes(), trust_model_file=True, device="cpu").module is not None
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("model.json", "{}")
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ModelLoadError, match="not a plain relative file name"):
        cl.load_classifier(evil.getvalue())
    with pytest.raises(InputError, match="a model directory or file"):
        cl.load_classifier(12)


def test_engine_ray_without_ray_is_one_line_naming_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)           # import ray fails as if it were not installed
    args = ["explain", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
            "--engine", "ray"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'counterlens[ray]'" in err and "ray[data]" in err
    assert "no-model" not in err                             # checked before the model
    assert not (tmp_path / "run").exists()
    with pytest.raises(InputError, match=r"counterlens\[ray\]"):
        explain_folder(run_driver.classifier(), None, tmp_path / "run", methods=["gradcam"], engine="ray")


@pytest.mark.parametrize("args,message", [
    (["--gpus-per-worker", "0.5"], "--gpus-per-worker applies to --engine ray"),
    (["--ray-address", "auto", "--cpus-per-worker", "2"], "--ray-address, --cpus-per-worker apply to --engine ray"),
])
def test_ray_options_without_engine_ray_are_refused(tmp_path, capsys, args, message):
    base = ["explain", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err


def test_ray_engine_arguments_are_checked():
    from counterlens.runs.engines.ray import RayEngine
    for kw, message in [({"workers": 0}, "workers=0"), ({"cpus_per_worker": 0}, "cpus-per-worker=0"),
                        ({"gpus_per_worker": -1}, "gpus-per-worker=-1"), ({"threads": 1.5}, "threads=1.5")]:
        with pytest.raises(InputError, match=message):
            RayEngine(**kw)
    assert RayEngine(gpus_per_worker=0.25).gpus_per_worker == 0.25
    with pytest.raises(SystemExit):
        main(["explain", "--model", "m", "--data", "d", "--out", "o", "--engine", "ray", "--cpus-per-worker", "0"])
