"""The first hour's rough edges (issue 16, item 4): one-line errors and messages a new user meets."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import single_thread
from torch import nn

from counterlens.cli import main
from counterlens.data.tabular import TabularSchema

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def loans(tmp_path_factory):
    """A small table with its label column ``ok`` and an exported model trained without it."""
    root = tmp_path_factory.mktemp("loans")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.integers(20, 65, 60), "plan": rng.choice(["basic", "plus"], 60),
                       "income": np.round(rng.uniform(10, 100, 60), 1)})
    df["ok"] = np.where(df["income"] > 50, "yes", "no")
    csv = root / "loans.csv"
    df.to_csv(csv, index=False)
    schema = TabularSchema.from_frame(df, label="ok")
    x = schema.encode(df)
    torch.manual_seed(0)
    net = nn.Sequential(schema.preprocess(), nn.Linear(schema.width, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    model = root / "model.pt2"
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      str(model))
    return csv, model


def test_a_table_without_label_is_one_line_naming_label_and_the_columns(loans, tmp_path, capsys):
    csv, model = loans
    base = ["counterfactual", "--table", str(csv), "--model", str(model), "--out", str(tmp_path / "r"),
            "--limit", "2", "--quiet"]
    with pytest.warns(UserWarning, match="no schema saved"):
        assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Guard failed" not in err and "Traceback" not in err
    assert "--label" in err and "age, plan, income, ok" in err
    with pytest.warns(UserWarning, match="no schema saved"):
        assert main(base + ["--label", "ok"]) == 0                  # the fix it names works


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic brain MRI and a reference model trained one epoch on it, through the CLI, at 32 pixels."""
    root = tmp_path_factory.mktemp("first_hour")
    data, model = root / "data", root / "model"
    assert main(["data", "synth", "brain-mri", "--out", str(data), "--n-train", "48", "--n-test", "12",
                 "--size", "32", "--seed", "3"]) == 0
    assert main(["train", "--data", str(data), "--arch", "brain-tumor-cnn", "--out", str(model), "--size", "32",
                 "--width", "0.25", "--epochs", "1", "--quiet"]) == 0
    return root, data, model


def test_audit_quiet_prints_only_the_verdict(trained, tmp_path, capsys):
    root, data, model = trained
    base = ["audit", "--model", str(model), "--data", str(data / "Testing"), "--region", "0,0,8,8",
            "--methods", "", "--n-random", "2", "--limit", "4"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert "audit written to" in loud and "audit written to" not in quiet
    verdict = loud.splitlines()[loud.splitlines().index(next(l for l in loud.splitlines() if "audit written" in l)) - 1]
    assert verdict in quiet.splitlines()
    assert (tmp_path / "quiet" / "audit.json").is_file()


def test_fit_prior_says_which_of_prior_and_mean_image_is_better():
    from counterlens.cli.fit_prior import versus_mean_image
    better = versus_mean_image(0.01, 0.027)
    assert "2.7x smaller" in better and "worse" not in better and "larger" not in better
    worse = versus_mean_image(0.027, 0.01)
    assert "2.7x larger" in worse and "no better than the mean image" in worse and "--epochs" in worse


def test_evaluate_and_audit_rewrite_the_runs_report(trained, tmp_path, capsys):
    root, data, model = trained
    run = tmp_path / "run"
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--methods", "gradcam", "--limit", "4", "--quiet"]) == 0
    before = (run / "report.html").read_text()
    ev = ["evaluate", str(run), "--metrics", "deletion_auc", "--steps", "4", "--sanity-images", "0", "--quiet"]
    assert main([*ev, "--no-report"]) == 0
    assert (run / "report.html").read_text() == before                   # --no-report: left as it was
    assert main(ev) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    after = (run / "report.html").read_text()
    assert 'id="method-table"' in after and 'id="method-table"' not in before      # the metrics are on the page
    assert "#method-table, table.group-table { display: block; max-width: 100%; overflow-x: auto; }" in after
    audit = tmp_path / "audit"
    assert main(["audit", "--model", str(model), "--data", str(data / "Testing"), "--region", "0,0,8,8",
                 "--methods", "gradcam", "--n-random", "2", "--limit", "4", "--out", str(audit)]) == 0
    assert f"report: {audit / 'report.html'}" in capsys.readouterr().out and (audit / "report.html").is_file()
    assert main(["audit", "--model", str(model), "--data", str(data / "Testing"), "--region", "0,0,8,8",
                 "--methods", "", "--n-random", "2", "--limit", "4", "--out", str(tmp_path / "a2"), "--no-report"]) == 0
    assert not (tmp_path / "a2" / "report.html").exists()


def test_one_default_size_shown_in_help(tmp_path, capsys):
    from PIL import Image

    from counterlens.cli.parser import DEFAULT_SIZE
    assert DEFAULT_SIZE == 64                                           # the demo's size
    for words in (["data", "synth"], ["train"], ["fit-prior"], ["demo"]):
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        assert f"(default: {DEFAULT_SIZE}" in " ".join(capsys.readouterr().out.split()), words
    assert main(["data", "synth", "chest-xray", "--out", str(tmp_path / "d"), "--n-train", "2", "--n-test", "2"]) == 0
    png = next((tmp_path / "d" / "Training").rglob("*.png"))
    assert Image.open(png).size == (DEFAULT_SIZE, DEFAULT_SIZE)


def test_a_prior_of_another_size_than_the_model_is_one_line_naming_both(trained, tmp_path, capsys):
    root, data, model = trained
    prior = tmp_path / "prior16"
    assert main(["fit-prior", "--data", str(data), "--out", str(prior), "--size", "16", "--epochs", "1",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["counterfactual", "--model", str(model), "--data", str(data / "Testing"), "--out",
                 str(tmp_path / "cf"), "--prior", str(prior), "--limit", "2", "--steps", "5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fit on 16x16 images but the model takes 32x32" in err and "fit-prior --data DIR --size 32" in err


def test_training_at_chance_warns_with_what_to_try(tmp_path):
    from counterlens.train_folder import chance_warning
    text = chance_warning(0.26, 4)
    assert "26.0% is at chance for 4 classes (25%)" in text
    assert all(flag in text for flag in ("--lr", "--width", "--epochs"))
    assert chance_warning(0.81, 2) is None and chance_warning(0.40, 4) is None
    assert chance_warning(0.52, 2) is not None                              # within 5 points of 50%
    assert "AUC 0.510" in chance_warning(0.9, 3, {"a": 0.49, "b": 0.53, "c": None})
    assert chance_warning(0.5, 3, {"a": 0.8, "b": 0.7}) is None
    one = chance_warning(0.8, 3, {"opacity": 0.9, "effusion": 1.0, "cardiomegaly": 0.54})   # mean 0.81 hides it
    assert "for 1 of 3 findings (cardiomegaly 0.540)" in one and "--epochs" in one
    # through the command: two classes of the same image cannot be told apart (every prediction the same: 50%)
    from PIL import Image
    for split, n in (("Training", 8), ("Testing", 4)):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "d" / split / cls / f"{i}.png")
    with pytest.warns(UserWarning, match=r"is at chance for 2 classes \(50%\).*--lr.*--width.*--epochs"):
        assert main(["train", "--data", str(tmp_path / "d"), "--arch", "brain-tumor-cnn", "--out", str(tmp_path / "m"),
                     "--size", "16", "--width", "0.25", "--epochs", "1", "--quiet"]) == 0


def test_the_progress_bar_moves_after_every_method_of_a_batch(tmp_path, monkeypatch):
    from PIL import Image

    import counterlens as cl
    from counterlens.data.images import ImageFolder
    from counterlens.runs import dataset as runs_dataset
    from counterlens.runs.engines import local
    moves = []

    class Recording(local.tqdm):
        def update(self, n=1):
            moves.append(n)
            return super().update(n)

    monkeypatch.setattr(local, "tqdm", Recording)
    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    for i in range(6):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(tmp_path / "d" / f"{i}.png")
    clf = cl.Classifier(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), device="cpu")
    summary = runs_dataset.explain_folder(clf, ImageFolder(tmp_path / "d", channels=1), tmp_path / "run",
                                          methods=["saliency", "input_x_gradient"], images_per_batch=3, workers=1,
                                          progress=True)
    assert summary.done == 6
    # two batches of 3 images, two methods each: the bar moves 1.5 images after each method, four times
    assert moves == [1.5, 1.5, 0.0, 1.5, 1.5, 0.0] and sum(moves) == 6
    # two worker processes: their ticks come back through the queue, and the bar ends at every image
    moves.clear()
    summary = runs_dataset.explain_folder(clf, ImageFolder(tmp_path / "d", channels=1), tmp_path / "run2",
                                          methods=["saliency", "input_x_gradient"], images_per_batch=3, workers=2,
                                          threads=1, progress=True)
    assert summary.done == 6 and sorted(moves) == [0.0, 0.0, 1.5, 1.5, 1.5, 1.5]


def test_select_picks_cases_and_is_part_of_the_run(trained, tmp_path, capsys):
    import counterlens as cl
    root, data, model = trained
    base = ["explain", "--model", str(model), "--data", str(data / "Testing"), "--methods", "saliency", "--quiet",
            "--no-report", "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    cases = cl.open_run(tmp_path / "all").cases
    wrong = set(cases.path[cases.prediction_index != cases.label_index])
    assert 0 < len(wrong) < len(cases)
    assert main([*base, "--out", str(tmp_path / "wrong"), "--select", "misclassified"]) == 0
    assert set(cl.open_run(tmp_path / "wrong").cases.path) == wrong
    assert main([*base, "--out", str(tmp_path / "right"), "--select", "correct"]) == 0
    assert set(cl.open_run(tmp_path / "right").cases.path) == set(cases.path) - wrong
    assert main([*base, "--out", str(tmp_path / "glioma"), "--select", "glioma"]) == 0
    picked = cl.open_run(tmp_path / "glioma").cases
    assert len(picked) == (cases.label == "glioma").sum() > 0 and set(picked.label) == {"glioma"}
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "glioma"), "--select", "correct"]) == 2     # another selection
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.select: 'glioma' in the run, 'correct' now" in err
    assert main([*base, "--out", str(tmp_path / "x"), "--select", "tumour"]) == 2
    assert "pass misclassified, correct or a class: glioma, meningioma, notumor, pituitary" in capsys.readouterr().err
    cf = tmp_path / "cf"
    assert main(["counterfactual", "--model", str(model), "--data", str(data / "Testing"), "--out", str(cf),
                 "--select", "glioma", "--steps", "5", "--quiet", "--no-report", "--workers", "1"]) == 0
    assert set(cl.open_run(cf).cases.label) == {"glioma"} and cl.open_run(cf).spec["data"]["select"] == "glioma"


def test_the_curves_legend_lies_under_the_curves_not_on_them():
    import matplotlib.pyplot as plt

    from counterlens.viz.plots import curves_figure
    x = np.linspace(0, 1, 11).tolist()
    curves = {f"method_{i}": {"deletion": {"x": x, "y": np.linspace(1, 0.1 * i, 11).tolist()},
                              "insertion": {"x": x, "y": np.linspace(0.1 * i, 1, 11).tolist()}} for i in range(5)}
    fig = curves_figure(curves)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend, plot = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.y1 <= plot.y0 and legend.y0 >= 0          # below the plotting area, inside the figure
        assert legend.y1 <= ax.xaxis.label.get_window_extent(renderer).y0      # and under the axis label
        assert len(ax.get_legend().get_texts()) == 5
    plt.close(fig)


def test_evaluate_select_scores_only_those_cases_and_keeps_to_one_selection(trained, tmp_path, capsys):
    import counterlens as cl
    root, data, model = trained
    run = tmp_path / "run"
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--methods", "saliency", "--quiet", "--no-report", "--workers", "1"]) == 0
    cases = cl.open_run(run).cases
    wrong = set(cases.path[cases.prediction_index != cases.label_index])
    ev = ["evaluate", str(run), "--metrics", "sparseness", "--sanity-images", "0", "--quiet", "--no-report"]
    assert main([*ev, "--select", "misclassified"]) == 0
    assert set(cl.open_run(run).metrics.path) == wrong and cl.open_run(run).spec["evaluate"]["select"] == "misclassified"
    capsys.readouterr()
    assert main([*ev, "--select", "correct"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evaluate.select: 'misclassified' in the run, 'correct' now" in err
