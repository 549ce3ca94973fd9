"""Multi-label end to end: the synthetic chest films with several findings, labels.csv folders,
BCE training, all-positive runs keyed by finding, per-finding metrics, the report and the
switched-off counterfactual. One tiny model (32x32, trained in seconds) serves every test."""
import json

import numpy as np
import pytest
import torch

import counterlens as cl
from counterlens.data.images import ImageFolder
from counterlens.data.synthetic import generate, make_dataset, write_dataset
from counterlens.errors import DataFileError, InputError
from counterlens.model import Classifier, Normalize
from counterlens.models import build_model
from counterlens.runs.dataset import counterfactual_folder, explain_folder
from counterlens.runs.evaluate import evaluate_run
from counterlens.runs.pipeline import explain_arrays
from counterlens.training import finding_auc, train_classifier
from conftest import single_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
FINDINGS = ["opacity", "effusion", "cardiomegaly"]
SIZE = 32


@pytest.fixture(scope="module")
def clf():
    train = generate("chest-multilabel", 600, size=SIZE, seed=0)
    net = build_model("chest-findings-cnn", num_classes=3, input_size=SIZE)
    pre = Normalize([0.5], [0.25])
    train_classifier(net, torch.from_numpy(train.images), torch.from_numpy(train.labels), epochs=10, lr=3e-3,
                     seed=0, preprocess=pre, progress=False, device="cpu")
    return Classifier(net, preprocess=pre, classes=FINDINGS, device="cpu", output="multilabel",
                      in_channels=1, input_size=(SIZE, SIZE), value_range=(0, 1))


@pytest.fixture(scope="module")
def test_set():
    return generate("chest-multilabel", 40, size=SIZE, seed=0, split="test")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chest")
    write_dataset(make_dataset("chest-multilabel", n_train=8, n_test=24, size=SIZE), root)
    return root


@pytest.fixture(scope="module")
def run_dir(clf, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    folder = ImageFolder(data / "Testing", channels=1, size=SIZE, classes=clf.classes, masks=data / "masks")
    explain_folder(clf, folder, out, methods=["gradcam", "saliency"], target="all-positive", progress=False,
                   images_per_batch=8, workers=1)
    return out


def test_synthetic_findings_co_occur_with_a_mask_each():
    s = generate("chest-multilabel", 60, size=SIZE, seed=3)
    again = generate("chest-multilabel", 60, size=SIZE, seed=3)
    assert np.array_equal(s.images, again.images) and np.array_equal(s.labels, again.labels)
    assert s.labels.shape == (60, 3) and s.classes == FINDINGS and s.labels.sum(0).tolist() == [24, 24, 24]
    assert (s.labels.sum(1) >= 2).any() and (s.labels.sum(1) == 0).any()          # co-occurring, and none
    for k, finding in enumerate(FINDINGS):
        area = s.masks[finding].sum((1, 2))
        assert (area[s.labels[:, k] == 1] > 0).all() and (area[s.labels[:, k] == 0] == 0).all()


def test_labels_csv_folder_reordered_to_the_model_and_bad_values_named(data, tmp_path):
    folder = ImageFolder(data / "Testing", classes=["cardiomegaly", "opacity", "effusion"], masks=data / "masks")
    table = (data / "Testing" / "labels.csv").read_text().splitlines()
    first = dict(zip(table[0].split(","), table[1].split(",")))
    rec = folder.records[0]
    assert folder.multilabel and rec.path.name == first["path"] and rec.label is None
    assert rec.findings == tuple(int(first[c]) for c in ("cardiomegaly", "opacity", "effusion"))
    assert set(rec.finding_masks) == {"cardiomegaly", "opacity", "effusion"}
    (tmp_path / "a.png").write_bytes((data / "Testing" / first["path"]).read_bytes())
    (tmp_path / "labels.csv").write_text("path,opacity\na.png,maybe\n")
    with pytest.raises(DataFileError, match="line 2, column opacity: 'maybe' is not a label"):
        ImageFolder(tmp_path)
    (tmp_path / "labels.csv").write_text("path,nodule\na.png,1\n")
    with pytest.raises(InputError, match=r"columns \['nodule'\] are not findings of the model"):
        ImageFolder(tmp_path, classes=FINDINGS)


def test_multilabel_loss_leaves_unknown_labels_out():
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    from counterlens.training import multilabel_loss
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.7, 4.0]])
    y = torch.tensor([[1, -1, 0], [0, 1, -1]])
    known = y >= 0
    assert torch.allclose(multilabel_loss(logits, y), bce(logits[known], y[known].float()))


def test_bce_training_learns_each_finding(clf, test_set):
    scores = clf.logits(torch.from_numpy(test_set.images)).detach()
    aucs = [finding_auc(scores[:, k], torch.from_numpy(test_set.labels[:, k])) for k in range(3)]
    assert aucs[0] > 0.85 and aucs[1] > 0.9, aucs                 # opacity, effusion: clearly learned


def test_maps_put_more_mass_in_their_own_finding_mask(clf, test_set):
    """Ground truth: Grad-CAM of finding k is denser inside finding k's mask than outside it, and
    denser there than inside the other finding's mask of the same film."""
    for k, other in ((0, 1), (1, 0)):
        rows = np.flatnonzero(test_set.labels[:, k] == 1)
        out = explain_arrays(clf, test_set.images[rows], {"gradcam": {}}, target=FINDINGS[k])
        maps = np.clip(out.maps["gradcam"], 0, None)
        mask = test_set.masks[FINDINGS[k]][rows]
        inside = (maps * mask).sum((1, 2)) / mask.sum((1, 2))
        outside = (maps * ~mask).sum((1, 2)) / (~mask).sum((1, 2))
        assert np.median(inside / np.maximum(outside, 1e-12)) > 1.2        # measured: opacity 1.43
        both = test_set.labels[rows, other] == 1
        wrong = test_set.masks[FINDINGS[other]][rows][both]
        assert both.any() and np.mean(inside[both] > (maps[both] * wrong).sum((1, 2)) / wrong.sum((1, 2))) >= 0.75


def test_all_positive_gives_a_map_per_positive_finding_and_resumes(clf, data, run_dir):
    run = cl.open_run(run_dir)
    cases = run.cases
    assert run.multilabel and run.spec["target"] == "all-positive" and run.spec["model"]["output"] == "multilabel"
    probs = cases[[f"prob_{f}" for f in FINDINGS]].to_numpy()
    expected = {(p, FINDINGS[k]) for p, row in zip(cases.path, probs) for k in np.flatnonzero(row >= 0.5)}
    for method in ("gradcam", "saliency"):
        att = run.attributions[run.attributions.method == method]
        assert set(zip(att.path, att.target_name)) == expected
    none = cases.path[(probs < 0.5).all(1)]
    assert len(none) and (cases.status == "done").all() and not set(none) & set(run.attributions.path)
    assert cases.loc[cases.path.isin(none), "prediction"].eq("none").all()
    again = explain_folder(clf, ImageFolder(data / "Testing", channels=1, size=SIZE, classes=clf.classes,
                                            masks=data / "masks"),
                           run_dir, methods=["gradcam", "saliency"], target="all-positive", progress=False,
                           images_per_batch=8, workers=1)
    assert again.done == 0 and again.skipped == len(cases)             # cases without a positive too


def test_store_round_trip_of_per_finding_maps_and_masks(clf, data, run_dir):
    run = cl.open_run(run_dir)
    att = run.attributions
    several = att[att.method == "saliency"].groupby("path").filter(lambda g: len(g) >= 2)
    path = several.path.iloc[0]
    image = run.image(path)
    for name in several[several.path == path].target_name:
        direct = explain_arrays(clf, image[None], {"saliency": {}}, target=name).maps["saliency"][0]
        np.testing.assert_allclose(run.map(path, "saliency", target=name), direct, rtol=1e-4, atol=1e-6)
        k = FINDINGS.index(name)
        truth = np.asarray(ImageFolder(data / "masks" / name).load(
            [r.path.name for r in ImageFolder(data / "masks" / name).records].index(path))[0][0] > 0)
        assert np.array_equal(run.mask(path, target=name), truth) and run.mask(path).shape == (3, SIZE, SIZE)
        assert np.array_equal(run.mask(path)[k], truth)
    row = run.cases.set_index("path").loc[path]
    labels = json.loads(run.table("cases").set_index("case_id").loc[path, "labels"])
    assert [row[f"label_{f}"] for f in FINDINGS] == labels
    with pytest.raises(InputError, match="no saliency map for target 'cardiomegaly'|is not a class"):
        missing = [f for f in FINDINGS if f not in set(several[several.path == path].target_name)]
        run.map(path, "saliency", target=missing[0] if missing else "nodule")


def test_metrics_per_finding_and_report_with_escaped_names(clf, data, run_dir):
    df = evaluate_run(run_dir, clf, metrics=["relevance_mass", "mass_lift", "deletion_auc"], steps=5, sanity=False)
    run = cl.open_run(run_dir)
    m = run.metrics
    att = run.attributions
    assert {"target", "target_name"} <= set(m.columns)
    assert len(m[m.metric == "deletion_auc"]) == len(att)          # one row per stored map (case, method, finding)
    lift = m[(m.metric == "mass_lift") & (m.method == "gradcam") & m.target_name.isin(["opacity", "effusion"])]
    assert lift.value.median() > 1.0                                  # localised against that finding's mask
    assert set(df.target_name) <= set(FINDINGS) and "correct" in df
    from counterlens.viz.report import write_report
    html = write_report(run_dir).read_text()
    assert "By finding" in html and "gradcam (target: effusion)" in html
    # finding names from a user's table are escaped
    odd = Classifier(clf.module, preprocess=clf.preprocess, classes=["<b>op</b>", "eff&", "card"], device="cpu",
                     output="multilabel", in_channels=1, input_size=(SIZE, SIZE))
    folder = data / "Odd"
    folder.mkdir()
    for name in ("test_00000.png", "test_00001.png"):
        (folder / name).write_bytes((data / "Testing" / name).read_bytes())
    (folder / "labels.csv").write_text("path,<b>op</b>,eff&,card\ntest_00000.png,1,0,1\ntest_00001.png,0,1,0\n")
    out = run_dir.parent / "odd"
    explain_folder(odd, ImageFolder(folder, classes=odd.classes), out, methods=["saliency"], target="eff&",
                   progress=False, workers=1)
    page = write_report(out).read_text()
    assert "&lt;b&gt;op&lt;/b&gt;" in page and "<b>op</b>" not in page and "eff&amp;" in page


def test_switched_off_counterfactual_is_valid_and_reports_the_others(clf, data, run_dir):
    folder = ImageFolder(data / "Testing", channels=1, size=SIZE, classes=clf.classes)
    run = cl.open_run(run_dir)
    on = set(run.cases.path[run.cases.prob_opacity >= 0.5])
    folder.records = [r for r in folder.records if r.path.name in on][:3]
    counterfactual_folder(clf, folder, run_dir, target="opacity:off", params={"steps": 150, "seed": 0},
                          progress=False, workers=1)
    cf = cl.open_run(run_dir).counterfactuals
    assert len(cf) == len(folder.records) and (cf.target_name == "opacity:off").all() and cf.valid.all()
    for path, before, after in zip(cf.path, cf.probs_before, cf.probs_after):
        assert len(before) == len(after) == 3 and before[0] >= 0.5 and after[0] <= 0.5
        x = torch.from_numpy(cl.open_run(run_dir).counterfactual(path)[None])
        np.testing.assert_allclose(clf.probs(x)[0].numpy(), after, atol=1e-4)       # the others, as stored


@pytest.mark.slow
def test_command_line_train_then_explain_evaluate_counterfactual_without_flags(tmp_path, capsys):
    """The card written by ``train`` makes every later command multi-label: no head or class flags."""
    from counterlens.cli import main
    data, model, run = tmp_path / "data", tmp_path / "model", tmp_path / "run"
    assert main(["data", "synth", "chest-multilabel", "--out", str(data), "--n-train", "96", "--n-test", "8",
                 "--size", "32"]) == 0
    assert main(["train", "--data", str(data), "--arch", "chest-findings-cnn", "--out", str(model), "--size", "32",
                 "--epochs", "2", "--quiet"]) == 0
    card = json.loads((model / "model.json").read_text())
    assert card["output"] == "multilabel" and card["classes"] == FINDINGS and set(card["test_auc"]) == set(FINDINGS)
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--masks", str(data / "masks"),
                 "--out", str(run), "--methods", "saliency", "--target", "effusion", "--quiet", "--workers", "1"]) == 0
    assert main(["evaluate", str(run), "--metrics", "relevance_mass", "--sanity-images", "0", "--quiet",
                 "--masks", str(data / "masks")]) == 0                  # a subfolder per finding: effusion's masks
    assert main(["counterfactual", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--target", "opacity:on", "--limit", "2", "--steps", "20", "--quiet", "--workers", "1"]) == 0
    result = cl.open_run(run)
    assert result.multilabel and (result.attributions.target_name == "effusion").all()
    assert len(result.attributions) == 8 and set(result.metrics.target_name) == {"effusion"}
    has_effusion = result.cases.set_index("path")["label_effusion"] == 1
    mass = result.metrics.set_index("path")["value"]
    assert mass[~has_effusion[mass.index].to_numpy()].isna().all()      # an empty effusion mask: undefined
    assert mass[has_effusion[mass.index].to_numpy()].notna().all() and has_effusion.sum() == 3
    assert (result.counterfactuals.target_name == "opacity:on").all() and len(result.counterfactuals) == 2
    assert "labels.csv" in capsys.readouterr().out


def test_a_shard_of_the_previous_schema_reads_as_before(clf, data, tmp_path):
    """Runs written before maps and metrics were keyed by target (no labels/targets/target columns,
    maps keyed by case and method) read the same: cases, maps by method, metrics without a target."""
    import sqlite3
    folder = ImageFolder(data / "Testing", channels=1, size=SIZE, classes=clf.classes)
    folder.records = folder.records[:4]
    out = tmp_path / "run"
    explain_folder(clf, folder, out, methods=["saliency"], target="opacity", progress=False, workers=1)
    evaluate_run(out, clf, metrics=["sparseness"], sanity=False)
    before = cl.open_run(out)
    cases, maps = before.cases, {p: before.map(p, "saliency") for p in before.cases.path}
    for shard in (out / "index").glob("*.sqlite"):
        con = sqlite3.connect(shard)
        con.execute("ALTER TABLE cases DROP COLUMN labels")
        con.execute("ALTER TABLE cases DROP COLUMN targets")
        con.executescript("CREATE TABLE m (case_id TEXT NOT NULL, method TEXT NOT NULL, metric TEXT NOT NULL, "
                          "value REAL, written REAL NOT NULL, PRIMARY KEY (case_id, method, metric)); "
                          "INSERT INTO m SELECT case_id, method, metric, value, written FROM metrics; "
                          "DROP TABLE metrics; ALTER TABLE m RENAME TO metrics;")
        con.close()
    old = cl.open_run(out)
    assert list(old.table("maps")["target"]) == [0] * 4
    assert old.metrics.columns.tolist() == ["path", "method", "metric", "value"] and len(old.metrics) == 4
    pd_cases = old.cases.drop(columns=[c for c in old.cases if c.startswith(("label_", "pred_"))] + ["label"])
    assert pd_cases.equals(cases.drop(columns=[c for c in cases if c.startswith(("label_", "pred_"))] + ["label"]))
    assert all(np.array_equal(old.map(p, "saliency"), m) for p, m in maps.items())
