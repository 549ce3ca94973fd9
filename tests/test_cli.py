"""The command line as a user meets it: help everywhere, the whole path end to end, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from counterlens import open_run
from counterlens.cli import main

SUBCOMMANDS = [["data"], ["data", "synth"], ["train"], ["explain"], ["counterfactual"], ["fit-prior"], ["evaluate"], ["audit"],
               ["methods"],
               ["report"], ["demo"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w))
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(words + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: counterlens " + " ".join(words))
    assert len(out.splitlines()) > 3


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "counterlens"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "explain" in proc.stdout and "demo" in proc.stdout


def test_methods_lists_methods_with_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("gradcam", "integrated_gradients", "saliency"):
        assert name in out
    assert "steps=50" in out and "rule='gausslegendre'" in out


def test_param_parsing_and_errors(capsys):
    from counterlens.cli import parse_params
    assert parse_params(["integrated_gradients.steps=64", "integrated_gradients.baseline=blur", "gradcam.relu=false"]) == {
        "integrated_gradients": {"steps": 64, "baseline": "blur"}, "gradcam": {"relu": False}}
    assert main(["explain", "--model", "nowhere", "--data", "nowhere", "--out", "x", "--param", "steps64"]) == 2
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data and a trained model, through the CLI, at a small size."""
    root = tmp_path_factory.mktemp("cli")
    data, model = root / "data", root / "model"
    assert main(["data", "synth", "brain-mri", "--out", str(data), "--n-train", "96", "--n-test", "24",
                 "--size", "32", "--seed", "3"]) == 0
    assert main(["train", "--data", str(data), "--arch", "brain-tumor-cnn", "--out", str(model), "--size", "32",
                 "--width", "0.25", "--epochs", "1", "--quiet"]) == 0
    return root, data, model


@pytest.mark.slow
def test_synth_train_explain_report(trained, capsys):
    root, data, model = trained
    assert sorted(p.name for p in (data / "Training").iterdir()) == ["glioma", "meningioma", "notumor", "pituitary"]
    card = json.loads((model / "model.json").read_text())
    assert card["architecture"] == "brain-tumor-cnn" and card["classes"][0] == "glioma"
    assert 0 <= card["test_accuracy"] <= 1 and card["input_size"] == [32, 32]
    assert card["preprocess"] == [{"normalize": {"mean": [0.5], "std": [0.25]}}]
    run = root / "run"
    capsys.readouterr()
    code = main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--methods", "gradcam,integrated_gradients,saliency", "--param", "integrated_gradients.steps=8",
                 "--masks", str(data / "masks" / "tumor"), "--limit", "8", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "explained 8 images" in out and "report.html" in out
    result = open_run(run)
    assert (result.cases.status == "done").sum() == 8 and len(result.attributions) == 24
    assert set(result.cases.label) == {"glioma", "meningioma", "notumor", "pituitary"}   # --limit spreads over classes
    assert all(result.mask(p) is not None for p in result.cases.path)
    assert len(list((run / "arrays").rglob("*.npz"))) == 1          # 8 images x 3 methods: one batch file
    html = (run / "report.html").read_text()
    assert html.count("gradcam (target:") == 8
    # resuming the same command does nothing new
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--methods", "gradcam,integrated_gradients,saliency", "--param", "integrated_gradients.steps=8",
                 "--masks", str(data / "masks" / "tumor"), "--limit", "8", "--quiet", "--no-report"]) == 0
    assert "explained 0 images (8 already done" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0


@pytest.mark.slow
def test_cli_errors_are_one_clear_line(trained, tmp_path, capsys):
    root, data, model = trained
    from counterlens.loading import load_model
    net = load_model(model).module
    pickled = tmp_path / "full.pt"
    torch.save(net, pickled)
    capsys.readouterr()
    args = ["explain", "--model", str(pickled), "--data", str(data / "Testing"), "--out", str(tmp_path / "r"),
            "--limit", "2", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("counterlens: error:") and "--trust-model-file" in err and "Traceback" not in err
    assert main(args + ["--trust-model-file", "--classes", "glioma,meningioma,notumor,pituitary"]) == 0
    capsys.readouterr()
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(tmp_path / "r2"),
                 "--methods", "gradcam,nonsense", "--quiet"]) == 2
    assert "available" in capsys.readouterr().err
    assert main(["explain", "--model", str(model), "--data", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "r3"), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(tmp_path / "r4"),
                 "--target", "zebra", "--limit", "2", "--quiet"]) == 2
    assert "zebra" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo-run"
    args = ["demo", "--out", str(out), "--n-train", "96", "--n-test", "32", "--size", "32", "--epochs", "1",
            "--cases", "6", "--methods", "gradcam,integrated_gradients", "--counterfactuals", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[6/6]" in printed and f"report: {(out / 'report.html').resolve()}" in printed
    assert (tmp_path / "demo-run-work" / "model" / "model.json").exists()
    result = open_run(out)
    assert (result.cases.status == "done").sum() == 6
    assert set(result.attributions.method) == {"gradcam", "integrated_gradients"}
    assert len(result.counterfactuals) == 2
    metrics = set(result.metrics.metric)
    assert {"deletion_auc", "insertion_auc", "mass_lift", "pointing_game"} <= metrics
    assert (out / "run.yaml").exists() and (out / "report.html").stat().st_size > 10_000
    assert (out / "sanity.json").exists() and (out / "curves.json").exists() and (out / "results.csv").exists()
    assert len(list((out / "figures").glob("*.png"))) == 6
    # a second demo reuses data and model
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reusing the synthetic data" in printed and "reusing the model" in printed


@pytest.mark.slow
def test_shortcut_demo_small(tmp_path, capsys):
    """demo --shortcut: chest X-rays with a planted marker, a model, the audit and its report."""
    out = tmp_path / "shortcut"
    assert main(["demo", "--shortcut", "--out", str(out), "--n-train", "64", "--n-test", "16", "--size", "32",
                 "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "relies on the marker:" in printed and f"report: {(out / 'report.html').resolve()}" in printed
    import json
    audit = json.loads((out / "audit.json").read_text())
    assert {"relies_on_region", "region_flip_rate", "random_flip_rate", "methods"} <= set(audit)
    assert set(audit["methods"]) == {"gradcam", "integrated_gradients"}
    assert 0 < audit["n_images"] <= 16
    html = (out / "report.html").read_text()
    assert "audit" in html.lower() and audit["verdict"].split(":")[0] in html


@pytest.mark.slow
def test_explain_every_method_from_the_cli(trained, tmp_path, capsys):
    """--methods all, with --param for each random or costly method, into one run and one report."""
    root, data, model = trained
    from counterlens.attribution import METHODS
    params = ["integrated_gradients.steps=4", "smoothgrad.samples=3", "vargrad.samples=3", "squaregrad.samples=3",
              "rise.samples=16", "lime.samples=16", "kernel_shap.samples=16", "occlusion.window=8",
              "lime.segmentation=grid", "kernel_shap.segmentation=grid", "lime.cell=8", "kernel_shap.cell=8"]
    run = tmp_path / "all"
    args = ["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run), "--methods", "all",
            "--limit", "2", "--quiet", "--batch-size", "auto"]
    for p in params:
        args += ["--param", p]
    assert main(args) == 0
    assert set(open_run(run).attributions.method) == set(METHODS)
    html = (run / "report.html").read_text()
    assert all(f"{m} (target:" in html for m in METHODS)
    spec = (run / "run.yaml").read_text()
    assert "samples: 16" in spec and "batch_size: auto" in spec


@pytest.mark.slow
def test_counterfactual_and_fit_prior_from_the_cli(trained, tmp_path, capsys):
    """counterfactual into the same run directory as explain; fit-prior; resumable; in the report."""
    root, data, model = trained
    run = tmp_path / "cf"
    base = ["--model", str(model), "--data", str(data / "Testing"), "--out", str(run), "--limit", "3", "--quiet"]
    assert main(["explain", *base, "--methods", "gradcam"]) == 0
    assert main(["counterfactual", *base, "--target", "other", "--steps", "60",
                 "--editable-masks", str(data / "masks" / "brain")]) == 0
    out = capsys.readouterr().out
    assert "counterfactuals for 3 images" in out
    result = open_run(run)
    rows = result.counterfactuals.merge(result.cases, on="path")
    assert len(rows) == 3 and len(result.attributions) == 3          # explain rows kept
    import numpy as np
    for r in rows.itertuples():
        assert r.target != r.prediction_index and r.valid == (r.reason == "")
        cf = result.counterfactual(r.path)
        assert cf.dtype == np.float32 and cf.min() >= 0 and cf.max() <= 1
        mask = result.editable_mask(r.path)
        assert mask is not None and result.mask(r.path) is None   # the case has no ground truth; the search had a region
        assert np.abs(cf - result.image(r.path))[0][~mask].max() <= 1e-6   # nothing outside the editable mask moved
    html = (run / "report.html").read_text()
    assert html.count("<figure class=\"cf\">") == 3 and html.count("gradcam (target:") == 3
    cf_args = ["counterfactual", *base, "--target", "other", "--steps", "60", "--editable-masks",
               str(data / "masks" / "brain")]
    assert main(cf_args) == 0
    assert "counterfactuals for 0 images (3 already done" in capsys.readouterr().out
    assert main([*cf_args[:-2], "--no-report"]) == 2                  # other settings: refused, not mixed
    err = capsys.readouterr().err
    assert "counterfactual.editable_masks" in err and "--overwrite" in err
    prior = tmp_path / "prior"
    assert main(["fit-prior", "--data", str(data), "--out", str(prior), "--size", "32", "--epochs", "1", "--quiet"]) == 0
    assert (prior / "prior.json").exists()
    # guided by class prototypes of the prior, with the distance to the nearest training image recorded
    run2 = tmp_path / "cf-proto"
    base2 = ["--model", str(model), "--data", str(data / "Testing"), "--out", str(run2), "--limit", "2", "--quiet"]
    assert main(["counterfactual", *base2, "--prototypes", "--steps", "40"]) == 2       # needs --prior
    assert "--prototypes needs --prior" in capsys.readouterr().err
    assert main(["counterfactual", *base2, "--prior", str(prior), "--prototypes", "--steps", "40"]) == 2
    assert "--prototypes needs --train-data" in capsys.readouterr().err
    assert main(["counterfactual", *base2, "--prior", str(prior), "--prototypes", "--train-data",
                 str(data / "Training"), "--steps", "40", "--no-report"]) == 0
    near = list(open_run(run2).counterfactuals.nearest_train_distance)
    assert len(near) == 2 and all(v is not None and v > 0 for v in near)
    spec = (run2 / "run.yaml").read_text()
    assert "proto_weight: 10.0" in spec and "train_data:" in spec
