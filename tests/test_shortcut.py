"""Shortcut audit: inpainting, random regions, the decision on hand-made models, the known-truth
validation on chest-xray (marker shortcut vs clean training) and the command handler."""
import argparse
import json

import numpy as np
import pytest
import torch
from conftest import single_thread
from torch import nn

from counterlens import open_run
from counterlens.cli.audit import audit_cmd
from counterlens.data.synthetic import generate, write_dataset
from counterlens.errors import InputError
from counterlens.metrics.shortcut import (
    audit,
    inpaint,
    random_regions,
    verdict,
)
from counterlens.model import Classifier, Normalize

_one_thread = pytest.fixture(autouse=True)(single_thread)


# -- inpainting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["normalized", "biharmonic"])
def test_inpainting_removes_the_marker_and_restores_the_background(method):
    # the generator draws the marker last, so the same seed without markers is the true background
    with_marker = generate("chest-xray", 24, size=64, seed=1, split="test", shortcut_rate=0.5)
    truth = generate("chest-xray", 24, size=64, seed=1, split="test", shortcut_rate=None)
    region = torch.from_numpy(with_marker.masks["marker"])
    keep = region.flatten(1).any(1)
    x, t, r = torch.from_numpy(with_marker.images)[keep], torch.from_numpy(truth.images)[keep], region[keep]
    filled = inpaint(x, r, method)
    hole = r.unsqueeze(1)
    assert torch.equal(filled[~hole.expand_as(x)], x[~hole.expand_as(x)])        # outside: untouched
    before = (x - t).abs()[hole].mean().item()
    after = (filled - t).abs()[hole].mean().item()
    assert before > 0.5 and after < 0.04, (before, after)                        # near the film noise level
    assert abs((filled - t)[hole].mean().item()) < 0.01                           # no bright or dark patch


@pytest.mark.parametrize("shape", [(64,), (24, 24, 24)], ids=["1d", "3d"])
def test_inpainting_1d_and_3d_fills_smooth_signals(shape):
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    x = (sum(axes) / len(shape)).expand(2, 1, *shape).clone()        # a linear ramp
    region = torch.zeros(2, *shape, dtype=torch.bool)
    region[(slice(None),) + tuple(slice(s // 3, s // 3 + s // 4) for s in shape)] = True
    filled = inpaint(x, region)
    assert (filled - x).abs().max() < 0.03


def test_inpainting_errors():
    x = torch.rand(2, 1, 8, 8)
    corner = torch.zeros(2, 8, 8, dtype=torch.bool)
    corner[:, :2, :2] = True
    with pytest.raises(InputError, match="inpaint='median'"):
        inpaint(x, corner, "median")
    with pytest.raises(InputError, match="whole image"):
        inpaint(x, torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="region has shape"):
        inpaint(x, torch.ones(8, 8, dtype=torch.bool))


# -- random regions -------------------------------------------------------------------------------
def test_random_regions_keep_shape_area_and_avoid_the_region():
    region = torch.zeros(3, 32, 40, dtype=torch.bool)
    region[0, 2:6, 3:10] = True
    region[1, 20:30, 30:38] = True
    region[1, 22, 10] = True                  # a second blob: the shape is shifted as a whole
    out = random_regions(region, 6, seed=4)
    assert out.shape == (3, 6, 32, 40)
    assert torch.equal(out[2], torch.zeros(6, 32, 40, dtype=torch.bool))            # empty stays empty
    for i in (0, 1):
        idx = region[i].nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        for j in range(6):
            assert out[i, j].sum() == region[i].sum()
            shifted = out[i, j].nonzero()
            offset = shifted.min(0).values - lo
            assert torch.equal(shifted - offset, idx)                                 # same shape
            box = torch.zeros(32, 40, dtype=torch.bool)
            box[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1] = True
            assert not (out[i, j] & box).any()                                        # clear of its box
    assert torch.equal(out, random_regions(region, 6, seed=4))
    assert not torch.equal(out, random_regions(region, 6, seed=5))


# -- the audit on models whose reliance is known by construction ----------------------------------
class CornerReader(nn.Module):
    """Class 1 iff the 4x4 top-left corner is bright: it relies on the corner only."""

    def forward(self, x):
        score = 20 * (x[:, :, :4, :4].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], 1)


class CentreReader(nn.Module):
    """Class 1 iff the centre is bright: the corner never matters."""

    def forward(self, x):
        score = 20 * (x[:, :, 12:20, 12:20].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], 1)


def _corner_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.05 * torch.rand(n, 1, 32, 32, generator=g)
    label = torch.arange(n) % 2
    x[label == 1, :, 12:20, 12:20] = 0.9                  # the "disease" in the centre
    marker = torch.rand(n, generator=g) < 0.5
    x[marker, :, :4, :4] = 1.0                             # the "marker" in the corner
    region = torch.zeros(n, 32, 32, dtype=torch.bool)
    region[marker, :4, :4] = True
    return x, region, label, marker


def test_audit_flags_a_model_that_reads_the_corner():
    x, region, label, marker = _corner_data()
    clf = Classifier(CornerReader(), classes=["normal", "pneumonia"], device="cpu")
    r = audit(clf, x, region, methods=["integrated_gradients"], labels=label, n_random=4,
              params={"integrated_gradients": {"steps": 8}})
    assert r["relies_on_region"] is True
    assert r["region_flip_rate"] == 1.0 and r["random_flip_rate"] == 0.0
    assert r["n_images"] == int(marker.sum()) and r["n_without_region"] == int((~marker).sum())
    assert r["flips"] == {"pneumonia -> normal": int(marker.sum())}
    ig = r["methods"]["integrated_gradients"]
    assert ig["mass_lift"] == pytest.approx(1024 / 16, rel=1e-3)       # all relevance in the 16 corner pixels
    assert ig["confounder_sensitivity"] == 1.0
    assert "relies on the region: 100% of decisions change" in r["verdict"]
    assert "0% for random regions" in r["verdict"]
    json.dumps(r)                                                          # JSON-ready
    assert audit(clf, x, region, methods=["integrated_gradients"], labels=label, n_random=4,
                 params={"integrated_gradients": {"steps": 8}}) == r      # deterministic


def test_audit_raises_no_alarm_for_a_model_that_ignores_the_corner():
    x, region, label, marker = _corner_data()
    clf = Classifier(CentreReader(), classes=["normal", "pneumonia"], device="cpu")
    r = audit(clf, x, region, methods=["saliency"], labels=label, n_random=4)
    assert r["relies_on_region"] is False and r["region_flip_rate"] == 0.0
    assert r["accuracy"] == 1.0 and r["accuracy_region_removed"] == 1.0
    assert r["methods"]["saliency"]["mass_lift"] == 0.0
    assert r["methods"]["saliency"]["confounder_sensitivity"] is None     # no decision changed
    assert r["verdict"].startswith("No alarm")
    # a fixed box for every image (here: the corner of all 24 images, marked or not)
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[:4, :4] = True
    r_box = audit(Classifier(CornerReader(), device="cpu"), x, box, methods=[], n_random=4)
    assert r_box["n_images"] == 24 and r_box["region_flip_rate"] == pytest.approx(marker.float().mean().item(), abs=1e-4)


def test_decision_rule_thresholds_and_verdict_wording():
    x, region, _, _ = _corner_data()
    clf = Classifier(CornerReader(), device="cpu")
    assert audit(clf, x, region, methods=[], min_flip_rate=1.01, n_random=2)["relies_on_region"] is False
    result = {"relies_on_region": True, "region_flip_rate": 0.62, "random_flip_rate": 0.03, "n_images": 200,
              "n_random": 8, "flips": {}, "top_fraction": 0.1,
              "methods": {"gradcam": {"mass_lift": 0.8, "confounder_sensitivity": 0.05}}}
    text = verdict(result)
    assert "62% of decisions change when it is removed, 3% for random regions" in text
    assert "would have hidden the shortcut" in text
    partial = result | {"relies_on_region": False, "region_flip_rate": 0.07, "random_flip_rate": 0.0,
                        "decision_rule": {"min_flip_rate": 0.1}, "methods": {}}
    assert "7% is a partial dependence below the alarm line (10%)" in verdict(partial)
    assert "partial" not in verdict(partial | {"region_flip_rate": 0.01})


def test_audit_input_errors():
    x, region, label, _ = _corner_data()
    clf = Classifier(CornerReader(), device="cpu")
    with pytest.raises(InputError, match="empty for every image"):
        audit(clf, x, torch.zeros_like(region), methods=[])
    with pytest.raises(InputError, match="region_masks has shape"):
        audit(clf, x, region[:, :10], methods=[])
    with pytest.raises(InputError, match="labels has"):
        audit(clf, x, region, methods=[], labels=label[:3])
    with pytest.raises(InputError, match="n_random"):
        audit(clf, x, region, methods=[], n_random=0)
    with pytest.raises(InputError, match="params given for"):
        audit(clf, x, region, methods=[], params={"saliency": {}})


# -- known truth: pneumonia CNNs trained with and without the marker shortcut ---------------------
SIZE = 32


def _train(shortcut_rate, seed=0):
    from counterlens.models import pneumonia_cnn
    from counterlens.training import train_classifier
    data = generate("chest-xray", 600, size=SIZE, seed=seed, split="train", shortcut_rate=shortcut_rate)
    torch.manual_seed(seed)
    module = pneumonia_cnn(2, 1, (SIZE, SIZE), width=0.25)
    preprocess = Normalize([0.5], [0.25])
    train_classifier(module, torch.from_numpy(data.images), torch.from_numpy(data.labels), epochs=8, batch_size=32,
                     lr=2e-3, seed=seed, preprocess=preprocess, progress=False, device="cpu")
    return module, preprocess, data.classes


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"shortcut": _train(0.9), "clean": _train(None)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def marked_test_set():
    return generate("chest-xray", 160, size=SIZE, seed=0, split="test", shortcut_rate=0.5)   # half carry a marker


@pytest.mark.slow
def test_audit_flags_the_marker_shortcut_and_not_the_clean_model(models, marked_test_set):
    x = torch.from_numpy(marked_test_set.images)
    region = torch.from_numpy(marked_test_set.masks["marker"])
    labels = torch.from_numpy(marked_test_set.labels)
    out = {}
    for name, (module, preprocess, classes) in models.items():
        clf = Classifier(module, preprocess=preprocess, classes=classes, device="cpu")
        out[name] = audit(clf, x, region, labels=labels, n_random=4,
                          params={"integrated_gradients": {"steps": 16}})
    short, clean = out["shortcut"], out["clean"]
    assert short["relies_on_region"] is True, short["verdict"]
    assert short["region_flip_rate"] > 0.3 and short["random_flip_rate"] < 0.05
    assert set(short["flips"]) == {"pneumonia -> normal"}            # removing the marker removes "pneumonia"
    for method in ("gradcam", "integrated_gradients"):
        assert short["methods"][method]["mass_lift"] > 2
        assert short["methods"][method]["confounder_sensitivity"] > 0.5     # chance: 0.1
    assert clean["relies_on_region"] is False, clean["verdict"]
    assert clean["region_flip_rate"] < 0.1
    assert clean["accuracy"] > 0.9 > short["accuracy"]


@pytest.mark.slow
def test_audit_command_writes_the_run_and_fails_on_shortcut(models, marked_test_set, tmp_path, capsys):
    from counterlens.cards import save_model_card
    write_dataset({"test": marked_test_set.subset(np.arange(40))}, tmp_path / "data")
    dirs = {}
    for name, (module, preprocess, classes) in models.items():
        dirs[name] = save_model_card(module, tmp_path / name, architecture="pneumonia-cnn",
                                     kwargs={"num_classes": 2, "in_channels": 1, "input_size": [SIZE, SIZE],
                                             "width": 0.25},
                                     classes=classes, preprocess=preprocess, input_size=[SIZE, SIZE])

    def args(model, region, out, **kw):
        base = {"model": model, "factory": None, "trust_model_file": False, "classes": None, "device": "cpu",
                "data": tmp_path / "data" / "Testing", "region": str(region), "out": out, "methods": ["gradcam"],
                "param": None, "limit": None, "batch_size": 64, "seed": 0, "n_random": 4, "inpaint": "normalized",
                "fail_on_shortcut": True, "quiet": False}      # quiet: the verdict only
        return argparse.Namespace(**(base | kw))

    run = tmp_path / "run"
    assert audit_cmd(args(dirs["shortcut"], tmp_path / "data" / "masks" / "marker", run)) == 3
    printed = capsys.readouterr().out
    assert "The model relies on the region" in printed and "audit.json" in printed
    result = json.loads((run / "audit.json").read_text())
    assert result["relies_on_region"] is True and result["n_images"] + result["n_without_region"] == 40
    assert {"region_flip_rate", "random_flip_rate"} <= set(result)
    assert {"mass_lift", "confounder_sensitivity"} <= set(result["methods"]["gradcam"])
    assert len(result["per_image"]) == result["n_images"]
    assert "| relies on region | yes |" in (run / "audit.md").read_text()
    stored = open_run(run)
    assert (stored.cases.status == "done").sum() == result["n_images"]
    assert len(stored.attributions) == result["n_images"]
    case = stored.cases.path[stored.cases.status == "done"].iloc[0]
    assert stored.mask(case).any() and stored.map(case, "gradcam").shape == (SIZE, SIZE)   # the region is the mask
    from counterlens.viz.report import write_report
    assert write_report(run).read_text().count("gradcam (target:") == result["n_images"]    # the run renders
    # without --fail-on-shortcut the same finding exits 0; the clean model passes either way
    assert audit_cmd(args(dirs["shortcut"], tmp_path / "data" / "masks" / "marker", run, fail_on_shortcut=False)) == 0
    assert audit_cmd(args(dirs["clean"], tmp_path / "data" / "masks" / "marker", tmp_path / "clean-run")) == 0
    with pytest.raises(InputError, match="not a counterlens run"):       # the model folder is not a run to fill
        audit_cmd(args(dirs["clean"], tmp_path / "data" / "masks" / "marker", dirs["clean"]))
    # a box in pixels: the whole top-left corner of every image
    assert audit_cmd(args(dirs["clean"], "0,0,12,12", tmp_path / "box", methods=[])) == 0
    assert json.loads((tmp_path / "box" / "audit.json").read_text())["n_images"] == 40
    with pytest.raises(InputError, match="--region"):
        audit_cmd(args(dirs["clean"], tmp_path / "missing", tmp_path / "x"))
    with pytest.raises(InputError, match="0 <= x0 < x1"):
        audit_cmd(args(dirs["clean"], "0,0,99,12", tmp_path / "y"))
    with pytest.raises(InputError, match="model.sha256.*--overwrite"):
        audit_cmd(args(dirs["clean"], tmp_path / "data" / "masks" / "marker", run))
