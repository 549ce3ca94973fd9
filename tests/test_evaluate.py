"""evaluate(): the long table, the registry, closed-form localisation, equality with the metric
functions, grouping; Quantus on the localisation metrics; evaluate_run / evaluate_cmd on a run directory."""
import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TinyCNN, single_thread

import counterlens as cl
from counterlens.cli.evaluate import evaluate_cmd
from counterlens.errors import CounterlensError, InputError
from counterlens.metrics import complexity, faithfulness, localization
from counterlens.metrics.evaluate import (
    METRICS,
    evaluate,
    per_class,
    per_correctness,
    per_method,
    summarize,
    summary_table,
)
from counterlens.runs.evaluate import evaluate_run

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(n_classes=3, size=16), classes=["a", "b", "c"], device="cpu")
    x = torch.rand(4, 1, 16, 16)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    for i, (r, c, h) in enumerate([(2, 3, 4), (8, 8, 6), (0, 0, 3), (5, 9, 5)]):
        masks[i, r:r + h, c:c + h] = True
    return clf, x, masks


def test_map_equal_to_mask_and_constant_map(setup):
    clf, x, masks = setup
    maps = {"oracle": masks.float(), "flat": torch.ones(4, 16, 16)}
    df = evaluate(clf, x, maps, masks=masks, metrics=["pointing_game", "relevance_mass", "relevance_rank", "mass_lift"])
    wide = df.pivot_table(index=["method", "image"], columns="metric", values="value")
    share = masks.flatten(1).float().mean(1).double().numpy()
    oracle, flat = wide.loc["oracle"], wide.loc["flat"]
    np.testing.assert_allclose(oracle[["pointing_game", "relevance_mass", "relevance_rank"]].to_numpy(), 1.0)
    np.testing.assert_allclose(oracle["mass_lift"].to_numpy(), 1 / share, rtol=1e-6)
    np.testing.assert_allclose(flat["mass_lift"].to_numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat["relevance_mass"].to_numpy(), share, rtol=1e-6)


def test_long_table_registry_and_equality_with_the_functions(setup):
    clf, x, masks = setup
    maps = cl.explain(clf, x, methods=["saliency", "integrated_gradients"], integrated_gradients__steps=16)
    labels = torch.tensor([0, 1, 2, 0])
    df = evaluate(clf, x, maps, labels=labels, steps=8, n_subsets=8, seed=3)
    assert list(df.columns[:4]) == ["image", "method", "metric", "value"]
    assert {"target", "target_name", "predicted", "predicted_name", "label", "label_name", "correct"} <= set(df.columns)
    no_mask = {m for m, i in METRICS.items() if not i.needs_masks}
    assert set(df[df.method == "integrated_gradients"].metric) == no_mask
    assert set(df[df.method == "saliency"].metric) == no_mask - {"ig_completeness_error"}
    assert len(df) == 4 * (2 * len(no_mask) - 1)
    pred = clf.predict(x)
    assert (df.groupby("image")["predicted"].first().to_numpy() == pred.numpy()).all()
    assert (df["correct"] == (df["label"] == df["predicted"])).all()
    assert set(df["target_name"]) <= {"a", "b", "c"}

    def values(method, metric):
        return torch.tensor(df[(df.method == method) & (df.metric == metric)].sort_values("image")["value"].to_numpy())

    sal = maps["saliency"]
    for metric, kind, order in (("deletion_auc", "deletion", "morf"), ("insertion_auc", "insertion", "morf"),
                                ("deletion_lerf_auc", "deletion", "lerf")):
        curve = faithfulness.perturbation_curve(clf, x, sal, pred, kind=kind, order=order, steps=8, seed=3)
        torch.testing.assert_close(values("saliency", metric).float(), curve.auc)
    # the room insertion has: the model's probability on the image minus that on the blurred baseline
    from counterlens.attribution.perturbation import perturbation_baseline
    with torch.no_grad(), clf.eval_mode():
        p_full = torch.softmax(clf.forward(x), 1).gather(1, pred[:, None]).flatten()
        p_base = torch.softmax(clf.forward(perturbation_baseline(x, "blur", 3)), 1).gather(1, pred[:, None]).flatten()
    torch.testing.assert_close(values("saliency", "insertion_room").float(), p_full - p_base, atol=1e-5, rtol=1e-4)
    mf = faithfulness.mufidelity(clf, x, sal, pred, n_subsets=8, baseline="blur", seed=3)
    torch.testing.assert_close(values("saliency", "mufidelity").float(), mf.value, equal_nan=True)
    torch.testing.assert_close(values("saliency", "sparseness").float(), complexity.sparseness(sal))
    gap = complexity.completeness_error(clf, x, maps["integrated_gradients"]).abs()
    torch.testing.assert_close(values("integrated_gradients", "ig_completeness_error").float(), gap)
    # curves and costs ride along
    assert set(df.attrs["curves"]["saliency"]) == {"deletion", "insertion", "deletion_lerf"}
    assert len(df.attrs["curves"]["saliency"]["deletion"]["y"]) == 9
    assert df.attrs["evaluations"]["saliency"]["deletion_auc"] == faithfulness.cost("deletion", 4, steps=8)
    assert df.attrs["evaluations"]["saliency"]["mufidelity"] == faithfulness.cost("mufidelity", 4, n_subsets=8)
    # localisation only with masks
    with_masks = evaluate(clf, x, {"saliency": sal}, masks=masks, steps=4, n_subsets=4)
    assert {"pointing_game", "relevance_mass", "relevance_rank", "mass_lift"} <= set(with_masks.metric)


def test_grouping_helpers(setup):
    clf, x, _ = setup
    maps = {"m1": torch.rand(4, 16, 16), "m2": torch.rand(4, 16, 16)}
    labels = clf.predict(x).clone()
    labels[0] = (labels[0] + 1) % 3                  # one wrong
    df = evaluate(clf, x, maps, labels=labels, metrics=["sparseness", "entropy"])
    pm = per_method(df)
    assert list(pm.columns) == ["method", "metric", "mean", "std", "n", "n_nan"]
    ref = df.groupby(["method", "metric"])["value"].agg(["mean", "std", "count"])
    row = pm[(pm.method == "m1") & (pm.metric == "entropy")].iloc[0]
    assert row["mean"] == pytest.approx(ref.loc[("m1", "entropy"), "mean"]) and row["n"] == 4
    pc = per_class(df)
    assert pc.columns[0] == "label_name" and pc["n"].sum() == len(df)
    pk = per_correctness(df)
    assert set(pk["correct"]) == {True, False}
    assert pk[pk.correct == False]["n"].unique().tolist() == [1]  # noqa: E712
    table = summary_table(df)
    assert set(table["group_by"]) == {"all", "class", "correct"}
    assert set(table[table.group_by == "correct"]["group"]) == {"correct", "incorrect"}
    assert set(summarize(df, ["predicted_name"]).columns) >= {"predicted_name", "mean", "std", "n"}
    with pytest.raises(InputError, match="cannot group"):
        summarize(df, "nowhere")
    no_labels = evaluate(clf, x, maps, metrics=["entropy"])
    assert no_labels["correct"].isna().all() and per_class(no_labels).columns[0] == "predicted_name"
    with pytest.raises(InputError, match="labels"):
        per_correctness(no_labels)


def test_volumes_go_through_every_metric():
    """3D input [B, 1, D, H, W]: every metric, and the sanity check, reduce over all spatial axes."""
    from counterlens.metrics.sanity import model_randomisation
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(n_classes=2, size=8, dims=3), device="cpu")
    x = torch.rand(2, 1, 8, 8, 8)
    masks = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 2:5, 2:5] = True
    maps = cl.explain(clf, x, methods=["saliency", "integrated_gradients"], integrated_gradients__steps=8)
    df = evaluate(clf, x, maps, masks=masks, steps=4, n_subsets=4)
    assert set(df.metric) == set(METRICS) and df["value"].notna().mean() > 0.9
    r = model_randomisation(clf, x, "gradcam", with_ssim=True)
    assert r.layers == ["classifier.2", "features.3", "features.0"] and len(r.ssim) == 3


def test_errors(setup):
    clf, x, masks = setup
    m = {"m": torch.rand(4, 16, 16)}
    with pytest.raises(InputError, match="unknown"):
        evaluate(clf, x, m, metrics=["accuracy"])
    with pytest.raises(InputError, match="need ground-truth masks"):
        evaluate(clf, x, m, metrics=["pointing_game"])
    with pytest.raises(InputError, match="non-empty dict"):
        evaluate(clf, x, torch.rand(4, 16, 16))
    with pytest.raises(InputError, match=r"maps\['m'\] has shape"):
        evaluate(clf, x, {"m": torch.rand(4, 8, 8)}, metrics=["entropy"])
    with pytest.raises(InputError, match="drop the channel axis"):
        evaluate(clf, x, m, masks=masks[:, None], metrics=["entropy"])
    with pytest.raises(InputError, match="labels has 2"):
        evaluate(clf, x, m, labels=[0, 1], metrics=["entropy"])


def test_localisation_agrees_with_quantus(setup):
    """Quantus 0.6 PointingGame and RelevanceMassAccuracy on non-negative maps without ties."""
    quantus = pytest.importorskip("quantus")
    _, x, masks = setup
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    rng = np.random.default_rng(0)
    maps = rng.random((4, 1, 16, 16)).astype(np.float32) ** 3
    maps[1, 0, 10, 10] = 2.0                            # one map whose maximum is in its mask
    s = masks[:, None].numpy().astype(np.float32)
    kw = dict(model=model, x_batch=x.numpy(), y_batch=np.zeros(4, dtype=int), s_batch=s, device="cpu")
    pg = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(a_batch=maps.copy(), **kw)
    rma = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(a_batch=maps.copy(), **kw)
    ours_pg = localization.pointing_game(torch.from_numpy(maps[:, 0]), masks)
    ours_rm = localization.relevance_mass(torch.from_numpy(maps[:, 0]), masks)
    np.testing.assert_array_equal(ours_pg.numpy(), np.asarray(pg, dtype=np.float32))
    np.testing.assert_allclose(ours_rm.numpy(), np.asarray(rma), rtol=1e-5)
    assert ours_pg[1] == 1


# -- run directories --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """8 synthetic brain-MRI test slices (32 px, tumour masks), a small ResNet saved as a model card,
    and a run with saliency, Grad-CAM and integrated gradients."""
    from counterlens.cards import save_model_card
    from counterlens.runs.dataset import explain_folder
    from counterlens.data.images import ImageFolder
    from counterlens.data.synthetic import make_dataset, write_dataset
    from counterlens.loading import load_model
    from counterlens.models import build_model
    root = tmp_path_factory.mktemp("evaluate")
    sets = make_dataset("brain-mri", n_train=4, n_test=8, size=32, seed=0)
    write_dataset(sets, root / "data")
    kw = {"num_classes": 4, "in_channels": 1, "input_size": [32, 32], "width": 0.25}
    torch.manual_seed(0)
    save_model_card(build_model("small-resnet", **kw), root / "model", architecture="small-resnet", kwargs=kw,
                    classes=sets["test"].classes, preprocess=cl.Normalize([0.5], [0.25]))
    clf = load_model(root / "model", device="cpu")
    data = ImageFolder(root / "data" / "Testing", channels=1, size=32, classes=clf.classes)
    explain_folder(clf, data, root / "run", methods=["saliency", "gradcam", "integrated_gradients"],
                   params={"integrated_gradients": {"steps": 8}}, progress=False, model_source=str(root / "model"),
                   data_source=str(root / "data" / "Testing"))
    return root, clf


@pytest.mark.slow
def test_evaluate_run_writes_table_csvs_curves_and_sanity(run_dir):
    root, clf = run_dir
    run = root / "run"
    df = evaluate_run(run, clf, masks_dir=root / "data" / "masks" / "tumor", steps=8, n_subsets=8, sanity_images=3)
    n_metrics = len(METRICS)
    assert len(df) == 8 * (3 * n_metrics - 2)          # completeness only for IG
    result = cl.open_run(run)
    stored = result.metrics
    assert list(stored.columns) == ["path", "method", "metric", "value"]
    assert len(stored) == len(df) and not stored.duplicated(["path", "method", "metric"]).any()
    got = {(p, m, k): v for p, m, k, v in stored.itertuples(index=False)}
    for r in df.itertuples():
        v = got[(r.path, r.method, r.metric)]
        assert (math.isnan(v) and math.isnan(r.value)) or v == pytest.approx(r.value)
    notumor = set(result.cases.path[result.cases.label == "notumor"])
    loc = df[df.metric == "relevance_mass"]
    assert loc[loc.path.isin(notumor)]["value"].isna().all()              # empty masks
    assert loc[~loc.path.isin(notumor)]["value"].notna().all()
    csv = pd.read_csv(run / "metrics.csv")
    assert {"path", "method", "metric", "value", "label_name", "predicted_name", "correct"} <= set(csv.columns)
    summary = pd.read_csv(run / "metrics_summary.csv")
    assert list(summary.columns) == ["group_by", "group", "method", "metric", "mean", "std", "n", "n_nan"]
    curves = json.loads((run / "curves.json").read_text())
    assert set(curves) == {"saliency", "gradcam", "integrated_gradients"}
    for kinds in curves.values():
        assert len(kinds["deletion"]["x"]) == len(kinds["deletion"]["y"]) == 9 and "insertion" in kinds
        assert kinds["deletion"]["x"][0] == 0 and kinds["deletion"]["x"][-1] == 1
    sanity = json.loads((run / "sanity.json").read_text())
    assert set(sanity) == {"saliency", "gradcam", "integrated_gradients"}
    for v in sanity.values():
        assert len(v["layers"]) == len(v["similarity"]) > 10 and isinstance(v["passed"], bool)
        assert v["threshold"] == 0.5 and "random_logit" in v and v["layers"][0] == "fc"
    # a second evaluation of fewer metrics replaces only those rows
    evaluate_run(run, clf, metrics=["entropy"], sanity=False)
    assert len(cl.open_run(run).metrics) == len(df)


@pytest.mark.slow
def test_evaluate_cmd(run_dir, capsys, tmp_path):
    root, _ = run_dir
    args = argparse.Namespace(run=root / "run", masks=None, metrics=["sparseness", "deletion_auc"], steps=4,
                              sanity_images=2, quiet=True)
    assert evaluate_cmd(args) == 0
    out = capsys.readouterr().out
    assert "deletion_auc" in out and "sanity saliency:" in out and "metrics.csv" in out
    assert "its mean over the cascade" in out or "barely changes" in out      # the rule behind the verdict, not one number
    # another model than the run's is refused
    from counterlens.cards import save_model_card
    from counterlens.models import build_model
    kw = {"num_classes": 4, "in_channels": 1, "input_size": [32, 32], "width": 0.25}
    torch.manual_seed(1)
    save_model_card(build_model("small-resnet", **kw), tmp_path / "other", architecture="small-resnet", kwargs=kw,
                    classes=["glioma", "meningioma", "notumor", "pituitary"])
    with pytest.raises(CounterlensError, match="SHA-256"):
        evaluate_cmd(argparse.Namespace(run=root / "run", model=tmp_path / "other", masks=None, sanity_images=0))
    with pytest.raises(InputError, match="not a counterlens run"):
        evaluate_cmd(argparse.Namespace(run=tmp_path / "nowhere", masks=None))
