"""The HTML report and its exports, without a browser (tests/browser/ opens it in Chromium).

``make_run`` writes a run directory straight through the store's writer (no model: synthetic
brain-MRI slices, maps shaped like what Grad-CAM and guided backprop give, seeded), as the
pipeline writes it; ``add_metric_files`` adds what the metrics step writes (metric rows,
curves.json, sanity.json, audit.json) with plausible values.
"""
import base64
import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from counterlens.data.synthetic import generate
from counterlens.errors import InputError
from counterlens.runs.records import Case, CaseResult
from counterlens.runs.store import ShardWriter, open_run, prepare_run
from counterlens.viz.exports import figure_name
from counterlens.viz.plots import curves_figure, figure_png, randomisation_figure
from counterlens.viz.report import write_report
from counterlens.viz.report_images import difference_png, grey_png, map_png

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
EVIL_NAME = "<img src=x onerror=alert(1)>.png"
EVIL_CLASS = "<script>"
METHODS = ("gradcam", "guided_backprop")
AUDIT_VERDICT = ("The model relies on the region: masking it flips 62% of predictions, masking a random region "
                 "of the same size 4%. <b>not bold</b>")


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def spec_of(classes, n: int, seed: int = 0) -> dict:
    return {"model": {"source": "models/brain", "sha256": "ab" * 32, "description": "brain-tumor-cnn",
                      "classes": list(classes), "value_range": [0, 1], "test_accuracy": 0.875},
            "data": {"path": "data/Testing", "images": n, "classes": list(classes)}, "target": "predicted",
            "seed": seed, "methods": {"gradcam": {"layer": "auto", "relu": True}, "guided_backprop": {}},
            "device": "cpu", "versions": {"python": "3.11", "counterlens": "0.1.0", "torch": "2.13.0"}}


def make_run(root: Path, n: int = 12, *, size: int = 32, classes=CLASSES, n_cf: int = 4, failed: int = 1,
             evil: bool = False, extras: bool = True, seed: int = 0) -> Path:
    """A run directory of ``n`` explained cases (+ ``failed`` unreadable ones), ``n_cf`` of them with
    a counterfactual; ``evil`` names the first case and the second class with markup; ``extras``
    adds the metric files (and the counterfactuals' plausibility columns)."""
    classes = list(classes)
    if evil:
        classes[1] = EVIL_CLASS
    gen = generate("brain-mri", n, size=size, seed=seed, split="test")
    rng = np.random.default_rng(seed)
    prepare_run(root, spec_of(classes, n + failed, seed), compare=())
    with_cf, plain = [], []
    for i in range(n):
        label = int(gen.labels[i])
        pred = label if rng.random() < 0.75 else int((label + rng.integers(1, 4)) % 4)
        logits = rng.normal(size=4)
        logits[pred] = logits.max() + rng.uniform(0.05, 4)
        probs = _softmax(logits)
        image = gen.images[i]
        tumour = gen.masks["tumor"][i].astype(np.float32)
        if tumour.sum() == 0:
            tumour = np.zeros((size, size), np.float32)
            tumour[rng.integers(4, size - 4), rng.integers(4, size - 4)] = 1
        cam = gaussian_filter(tumour, size / 10) + 0.02 * rng.random((size, size))
        guided = gaussian_filter(image[0], 1.0) - gaussian_filter(image[0], 2.5) + 0.3 * cam / cam.max() * \
            rng.normal(size=(size, size))
        name = EVIL_NAME if evil and i == 0 else f"{classes[label]}/{gen.names[i]}.png"
        result = CaseResult(
            case=Case(id=name, file=f"/data/Testing/{name}", label=label, label_name=classes[label]),
            prediction=pred, prediction_name=classes[pred], probs=probs.tolist(), image=image,
            mask=gen.masks["tumor"][i].astype(bool),
            maps={"gradcam": cam.astype(np.float32), "guided_backprop": guided.astype(np.float32)},
            targets={"gradcam": pred, "guided_backprop": pred},
            seconds={"gradcam": 0.004 + 0.001 * rng.random(), "guided_backprop": 0.002})
        if len(with_cf) < n_cf:
            k = len(with_cf)
            target = (pred + 1) % 4
            valid = k % 3 != 2
            blob = gaussian_filter(tumour, 2)
            x = np.clip(image + 0.35 * blob[None] / max(blob.max(), 1e-6), 0, 1).astype(np.float32)
            after = probs[::-1].copy()
            after[target] = 0.8 if valid else 0.3
            after = after / after.sum()
            d = (x - image).ravel()
            plausible = extras and k != 1        # the second one has no plausibility values: shown without them
            result.counterfactual = {
                "target": target, "target_name": classes[target], "valid": valid,
                "reason": "" if valid else "target probability 0.30 < threshold 0.5", "lam": 0.1, "iterations": 60,
                "distance": {"l0": float((np.abs(d) > 1e-3).sum()), "l1": float(np.abs(d).sum()),
                             "l2": float(np.sqrt((d ** 2).sum())), "linf": float(np.abs(d).max())},
                "probs_before": probs.tolist(), "probs_after": after.tolist(), "seconds": 0.5, "x": x,
                "nearest_train_distance": float(rng.uniform(2, 6)) if plausible else None,
                "im1": float(rng.uniform(0.7, 1.3)) if plausible else None}
            with_cf.append(result)
        else:
            plain.append(result)
    broken = [CaseResult.failure(Case(id=f"{classes[0]}/broken{j}.png", file=f"/data/Testing/broken{j}.png", label=0,
                                      label_name=classes[0]),
                                 f"/data/Testing/broken{j}.png: cannot read the image (not a PNG file)")
              for j in range(failed)]
    with ShardWriter(root) as writer:     # a batch holds a counterfactual for every case or for none
        for batch in (with_cf, plain, broken):
            writer.write(batch)
    if extras:
        add_metric_files(root, seed=seed)
    return root


def add_metric_files(root: Path, seed: int = 0) -> None:
    """What the metrics step writes, with plausible values for every explained case and method."""
    rng = np.random.default_rng(seed + 1)
    run = open_run(root)
    pairs = list(run.attributions[["path", "method"]].itertuples(index=False, name=None))
    methods = sorted({m for _, m in pairs})
    first = pairs[0][0]
    rows = []
    for path, method in pairs:
        good = method == "gradcam"
        dele = rng.uniform(0.05, 0.3) if good else rng.uniform(0.3, 0.6)
        ins = rng.uniform(0.5, 0.9) if good else rng.uniform(0.2, 0.5)
        values = {"deletion_auc": dele, "insertion_auc": ins, "mufidelity": rng.uniform(-0.1, 0.6),
                  "pointing_game": float(rng.random() < 0.7), "relevance_mass": rng.uniform(0.1, 0.8),
                  "mass_lift": rng.uniform(0.8, 4), "sparseness": rng.uniform(0.3, 0.9),
                  "entropy": rng.uniform(4, 7),
                  # the first case's baseline already gives its class: insertion cannot judge it
                  "insertion_room": 0.02 if path == first else 0.8}
        rows += [(path, method, k, float(v)) for k, v in values.items()]
    with ShardWriter(root) as writer:
        writer.write_metrics(rows)
    x = np.linspace(0, 1, 21)
    curves = {m: {"deletion": {"x": x.tolist(), "y": (0.9 * np.exp(-(6 if m == "gradcam" else 2) * x)).tolist()},
                  "insertion": {"x": x.tolist(), "y": (0.2 + 0.7 * (1 - np.exp(-(6 if m == "gradcam" else 1.5) * x))).tolist()}}
              for m in methods}
    (root / "curves.json").write_text(json.dumps(curves))
    layers = ["classifier.3", "classifier.0", "features.6", "features.3", "features.0"]
    sanity = {m: {"layers": layers, "similarity": ([0.7, 0.45, 0.2, 0.1, 0.05] if m == "gradcam"
                                                   else [0.98, 0.95, 0.93, 0.9, 0.88]),
                  "passed": m == "gradcam", "threshold": 0.5, "random_logit": 0.3 if m == "gradcam" else 0.97,
                  "measure": "spearman", "n_images": 8} for m in methods}
    (root / "sanity.json").write_text(json.dumps(sanity))
    audit = {"relies_on_region": True, "region_flip_rate": 0.62, "random_flip_rate": 0.04, "verdict": AUDIT_VERDICT,
             "methods": {m: {"mass_lift": 3.1 if m == "gradcam" else 1.2, "confounder_sensitivity": 0.55}
                         for m in methods},
             "region": "marker", "n_images": 200, "per_class": {"normal": 0.58, "pneumonia": 0.66}}
    (root / "audit.json").write_text(json.dumps(audit))


def csp_of(html: str) -> str:
    return re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)


def assert_strict_csp(html: str) -> None:
    """The page allows nothing but itself: no network, data: images, and only its own inline
    script (by hash), if it has one."""
    csp = csp_of(html)
    assert "default-src 'none'" in csp and "img-src data:" in csp and "unsafe-eval" not in csp
    assert "base-uri 'none'" in csp and "form-action 'none'" in csp
    script_src = re.search(r"script-src ([^;]+)", csp).group(1).strip()
    assert "unsafe-inline" not in script_src
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.DOTALL)
    assert len(scripts) <= 1
    if scripts:
        digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
        assert script_src == f"'sha256-{digest}'"               # the CSP allows exactly this script
        assert "innerHTML" not in scripts[0] and "eval(" not in scripts[0]
        assert "fetch(" not in scripts[0] and "XMLHttpRequest" not in scripts[0]
    assert "http://" not in html and "https://" not in html and "src=\"//" not in html
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', html))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run", n=10, n_cf=4, failed=1)
    return run, write_report(run, figures=False).read_text()


def test_report_has_every_section_with_metric_files(full_run):
    _, html = full_run
    for section in ('id="summary"', 'id="look-first"', 'id="methods"', 'id="audit"', 'id="counterfactuals"',
                    'id="cases"'):
        assert section in html
    assert html.count('<template class="case-data"') == 11
    assert html.count("gradcam (target:") == 10 and html.count("guided_backprop (target:") == 10
    assert html.count('<figure class="cf">') == 4
    assert 'id="curves-plot"' in html and 'id="sanity-plot"' in html and 'id="cf-grid"' in html
    # method table: mean metrics per method, sanity verdict per method
    table = html.split('id="method-table"')[1].split("</table>")[0]
    assert "deletion_auc" in table and "insertion_auc" in table and "(n=10)" in table
    assert table.count("badge good") == 1 and table.count("badge bad") == 1
    # the same metrics per class and per outcome
    by_class = html.split('id="by-label"')[1].split("</table>")[0]
    assert by_class.count("<tr>") == 1 + 4 * 2 and "<td>meningioma</td><td>gradcam</td>" in by_class
    by_outcome = html.split('id="by-outcome"')[1].split("</table>")[0]
    assert "<td>correct</td><td>gradcam</td>" in by_outcome and "<td>incorrect</td><td>gradcam</td>" in by_outcome
    # badges per case and method: gradcam passes sanity and is faithful in this fixture
    assert html.count("sanity check passed") >= 10 and html.count("sanity check failed") >= 10
    assert html.count("faithfulness +") >= 9
    # insertion_room is a property of the image: a note on the one case where it is too small (its
    # badges fall back to MuFidelity), not a method-table column
    assert html.count("Insertion cannot separate the maps of this image") == 1 and "insertion_room 0.02" in html
    assert "insertion_room" not in table
    # audit: verdict escaped, per-method numbers, extra keys as text
    assert "relies on the region" in html and "&lt;b&gt;not bold&lt;/b&gt;" in html
    assert "confounder_sensitivity" in html and "per_class" in html and "0.62" in html
    # counterfactual extra columns: shown for the rows that have them
    assert html.count("distance to the nearest training image of the target class:") == 3 + 1   # + summary mean
    assert html.count("IM1 (autoencoder plausibility") == 3 + 1          # 3 rows + the summary mean
    assert "not valid (target probability 0.30 &lt; threshold 0.5)" in html
    # run summary
    assert "brain-tumor-cnn" in html and "ab" * 32 in html and "87.5%" in html
    assert "layer=auto, relu=True" in html and "s per image" in html and "torch 2.13.0" in html
    assert 'id="confusion"' in html and "failed to load" in html


def test_look_first_lists_point_at_the_right_cases(full_run):
    run, html = full_run
    cases = open_run(run).cases
    anchors = {f"case-{i + 1}": p for i, p in enumerate(cases["path"])}
    wrong = cases[(cases["label"] != cases["prediction"]) & (cases["status"] == "done")]
    lists = {key: re.findall(r'<a href="#(case-\d+)">([^<]*)</a>', html.split(f'id="lf-{key}"')[1].split("</table>")[0])
             for key in ("misclassified", "least-confident", "low-faithfulness", "outside-mask")}
    assert {anchors[a] for a, _ in lists["misclassified"]} == set(wrong["path"])
    confident = [float(cases.set_index("path").loc[anchors[a], "probability"]) for a, _ in lists["misclassified"]]
    assert confident == sorted(confident, reverse=True)                  # the most confident mistakes first
    least = [anchors[a] for a, _ in lists["least-confident"]]
    assert least == list(cases[cases["status"] == "done"].sort_values("probability")["path"])
    assert len(lists["low-faithfulness"]) == 20 and len(lists["outside-mask"]) == 20       # 10 cases x 2 methods
    for key in lists:                                                     # each link names its case
        assert all(anchors[a] == text for a, text in lists[key])
    # every anchor links to a case of the gallery
    ids = set(re.findall(r'<article class="case [a-z]+" id="(case-\d+)"', html))
    assert ids == set(anchors) and all(a in ids for v in lists.values() for a, _ in v)


def test_report_is_self_contained_with_a_strict_csp(full_run):
    _, html = full_run
    assert_strict_csp(html)
    assert len(re.findall(r"<script[^>]*>", html)) == 1


def test_sections_are_left_out_without_their_files(tmp_path):
    run = make_run(tmp_path / "run", n=4, n_cf=0, failed=0, extras=False)
    html = write_report(run, figures=False).read_text()
    for absent in ('id="methods"', 'id="audit"', 'id="counterfactuals"', "sanity check", "faithfulness",
                   'class="mtable"', "nearest training", 'id="f-show-cf"', 'id="cf-grid"', 'id="lf-low-faithfulness"'):
        assert absent not in html, absent
    assert html.count('<template class="case-data"') == 4 and 'id="summary"' in html
    # an unreadable JSON file becomes a note
    (run / "sanity.json").write_text("{not json")
    html = write_report(run, figures=False).read_text()
    assert "sanity.json could not be read" in html and 'id="sanity-plot"' not in html


def test_user_data_is_escaped(tmp_path):
    run = make_run(tmp_path / "run", n=6, n_cf=2, evil=True)
    html = write_report(run, figures=False).read_text()
    assert EVIL_NAME not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert re.findall(r"<script\b", html) == ['<script']      # only the report's own script element
    assert "onerror=alert" not in html.replace("&lt;img src=x onerror=alert(1)&gt;", "")


def test_figure_names_are_unique_and_filename_safe():
    paths = [EVIL_NAME, "glioma/x.png", "glioma_x.png", "glioma/x.nii.gz", "a/b/c.dcm", "../../etc/passwd", "",
             "ü/ß.png", "x" * 300 + ".png", "con.png", "glioma/x.PNG"]
    names = [figure_name(p) for p in paths]
    assert len(set(names)) == len(names)                      # glioma/x.png and glioma_x.png differ by their hash
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,90}_[0-9a-f]{8}\.png", n) for n in names), names
    assert figure_name("glioma/x.png").startswith("glioma_x_") and figure_name("glioma/x.png") == names[1]


def test_results_csv_merges_attributions_counterfactuals_and_metrics(full_run):
    run, _ = full_run
    with open(run / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = [r["row_type"] for r in rows]
    assert kinds.count("attribution") == 20 and kinds.count("counterfactual") == 4 and kinds.count("image") == 1
    r = open_run(run)
    stored = {(p, m, k): v for p, m, k, v in r.metrics.itertuples(index=False, name=None)}
    cf = r.counterfactuals.set_index("path")
    for row in rows:
        if row["row_type"] == "attribution":
            for metric in ("deletion_auc", "insertion_auc", "mass_lift", "insertion_room"):
                assert float(row[metric]) == stored[(row["path"], row["method"], metric)]
            assert row["label"] in CLASSES and float(row["seconds"]) > 0 and row["file"].startswith("/data/")
    cf_rows = [row for row in rows if row["row_type"] == "counterfactual"]
    order = list(r.cases["path"])
    assert [row["path"] for row in cf_rows] == sorted(cf.index, key=order.index)
    for row in cf_rows:
        assert float(row["l2"]) == cf.loc[row["path"], "l2"] and row["cf_target"] in CLASSES
        im1 = cf.loc[row["path"], "im1"]
        assert (row["im1"] == "") if np.isnan(im1) else float(row["im1"]) == im1
    assert sum(row["im1"] == "" for row in cf_rows) == 1
    assert {row["cf_valid"] for row in cf_rows} == {"0", "1"}
    failed = next(row for row in rows if row["row_type"] == "image")
    assert failed["status"] == "failed" and "not a PNG" in failed["error"] and failed["method"] == ""
    # rows follow the gallery: case by case, its maps then its counterfactuals
    positions = [order.index(row["path"]) for row in rows]
    assert positions == sorted(positions)


def test_results_csv_defuses_spreadsheet_formulas(tmp_path):
    run = tmp_path / "run"
    prepare_run(run, spec_of(CLASSES, 2), compare=())
    image = np.zeros((1, 8, 8), np.float32)
    with ShardWriter(run) as writer:
        writer.write([CaseResult(case=Case(id=name, file=f"/d/{name}", label=0, label_name="glioma"), prediction=0,
                                 prediction_name="glioma", probs=[0.7, 0.1, 0.1, 0.1], image=image,
                                 maps={"gradcam": image[0]}, targets={"gradcam": 0}, seconds={"gradcam": 0.01})
                      for name in ('=HYPERLINK("x")', "-2+3", "plain")])
    write_report(run, figures=False)
    with open(run / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["'-2+3", "'=HYPERLINK(\"x\")", "plain"]
    assert rows[0]["file"] == "/d/-2+3" and float(rows[0]["probability"]) == pytest.approx(0.7)


def test_case_figures_export(tmp_path):
    run = make_run(tmp_path / "run", n=3, n_cf=1, failed=1, evil=True, extras=False)
    html = write_report(run, figures=True).read_text()
    cases = open_run(run).cases
    done = list(cases.loc[cases["status"] == "done", "path"])
    files = {f.name for f in (run / "figures").glob("*.png")}
    assert files == {figure_name(p) for p in done}
    with_cf = open_run(run).counterfactuals["path"].iloc[0]
    plain = next(p for p in done if p != with_cf)
    big, small = Image.open(run / "figures" / figure_name(with_cf)), Image.open(run / "figures" / figure_name(plain))
    assert big.height > small.height * 1.5          # the counterfactual figure is stacked below
    assert small.width > 300 and html.count('figure (PNG)</a>') == 3 and "3 PNG figures" in html
    assert f'href="figures/{figure_name(EVIL_NAME)}"' in html


def test_web_images_keep_polarity_scale_and_transparency():
    img = np.zeros((1, 4, 4), np.float32)
    img[0, 1, 2] = 1.0
    grey = np.asarray(Image.open(io.BytesIO(grey_png(img, (0, 1)))))
    assert grey[1, 2] == 255 and grey[0, 0] == 0
    hu = np.full((1, 2, 2), -1000.0, np.float32)
    hu[0, 0, 0] = 0.0
    assert np.asarray(Image.open(io.BytesIO(grey_png(hu, (-1000, 1000)))))[0, 0] == 128
    amap = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    png, scale = map_png(amap, clip_percentile=0.0)
    assert scale["signed"] and scale["vmax"] == pytest.approx(1.0) and scale["cmap"] == "RdBu_r"
    decoded = Image.open(io.BytesIO(png))
    assert decoded.mode == "P"
    rgba = np.asarray(decoded.convert("RGBA"))
    assert rgba[0, 0, 3] == 255 and rgba[-1, -1, 3] == 255          # extremes opaque
    assert rgba[0, 0, 2] > rgba[0, 0, 0] and rgba[-1, -1, 0] > rgba[-1, -1, 2]   # negative blue, positive red
    assert rgba[3, 7, 3] < 10 and rgba[4, 0, 3] < 10                # near zero: the image shows through
    pos, scale = map_png(np.abs(amap), clip_percentile=10.0)
    assert not scale["signed"] and scale["vmax"] == pytest.approx(np.percentile(np.abs(amap), 90))
    assert np.asarray(Image.open(io.BytesIO(pos)).convert("RGBA"))[0, 0, 3] == 255   # clipped: full colour
    diff = np.zeros((4, 4), np.float32)
    diff[0, 0], diff[1, 1] = 0.5, -0.25
    dpng, vmax = difference_png(diff)
    d = np.asarray(Image.open(io.BytesIO(dpng)).convert("RGBA"))
    assert vmax == 0.5 and d[2, 2, 3] == 0 and d[0, 0, 3] == 255 and d[0, 0, 0] > d[0, 0, 2]
    assert 0 < d[1, 1, 3] < 255 and d[1, 1, 2] > d[1, 1, 0]
    vol = np.random.default_rng(0).random((1, 5, 6, 6)).astype(np.float32)   # a volume: middle slice
    assert np.asarray(Image.open(io.BytesIO(grey_png(vol, (0, 1))))).shape == (6, 6)


def test_curve_plots_render_and_refuse_empty_input():
    x = np.linspace(0, 1, 11).tolist()
    fig = curves_figure({"a": {"deletion": {"x": x, "y": [1 - v for v in x]}, "insertion": {"x": x, "y": x}},
                         "b": {"deletion": {"x": x, "y": [0.5] * 11}}})
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["a (AUC 0.500)", "b (AUC 0.500)"]
    assert figure_png(fig).startswith(b"\x89PNG")
    fig = randomisation_figure({"a": {"layers": ["fc", "conv"], "similarity": [0.4, None], "threshold": 0.5,
                                      "passed": True}, "bad": "not a dict"})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["fc", "conv"]
    assert figure_png(fig).startswith(b"\x89PNG")
    with pytest.raises(InputError):
        curves_figure({"a": {}})
    with pytest.raises(InputError):
        randomisation_figure({"a": {"similarity": []}})


def test_write_report_validates_arguments(tmp_path):
    run = make_run(tmp_path / "run", n=1, n_cf=0, failed=0, extras=False)
    with pytest.raises(InputError, match="clip_percentile"):
        write_report(run, clip_percentile=70)
    with pytest.raises(InputError, match="page_size"):
        write_report(run, page_size=0)
    with pytest.raises(InputError, match="single_file_max"):
        write_report(run, single_file_max=0)
    with pytest.raises(InputError, match="not a counterlens run directory"):
        write_report(tmp_path / "nowhere")
    out = write_report(run, out=tmp_path / "elsewhere.html", page_size=5, figures=False)
    assert out == tmp_path / "elsewhere.html" and 'data-page-size="5"' in out.read_text()


def test_volumes_large_images_and_a_run_without_run_yaml(tmp_path):
    """3D volumes show their middle slice, images above 256 px are shrunk for the page, and a run
    without run.yaml still renders (class indices as names)."""
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    vol = rng.random((1, 6, 16, 16)).astype(np.float32)
    x = vol.copy()
    x[0, 3, 4:8, 4:8] += 0.5
    big = rng.random((1, 600, 300)).astype(np.float32)
    with ShardWriter(run) as writer:
        writer.write([CaseResult(
            case=Case(id="a.nii", file="/v/a.nii"), prediction=1, prediction_name="1", probs=[0.2, 0.8], image=vol,
            maps={"saliency": rng.random((6, 16, 16)).astype(np.float32)}, targets={"saliency": 1},
            seconds={"saliency": 0.01},
            counterfactual={"target": 0, "target_name": None, "valid": True, "reason": "", "lam": 0.1,
                            "iterations": 5, "distance": {"l0": 16.0, "l1": 8.0, "l2": 2.0, "linf": 0.5},
                            "probs_before": [0.2, 0.8], "probs_after": [0.7, 0.3], "x": x})])
        writer.write([CaseResult(case=Case(id="big.png", file="/v/big.png"), prediction=0, prediction_name="0",
                                 probs=[0.6, 0.4], image=big, maps={"saliency": big[0]}, targets={"saliency": 0},
                                 seconds={"saliency": 0.01})])
    html = write_report(run, figures=True).read_text()
    assert "saliency (target: 1)" in html and "counterfactual towards 0: valid" in html
    assert len(list((run / "figures").glob("*.png"))) == 2 and 'id="cf-grid"' in html

    def size(alt):
        uri = re.search(rf'class="img main" alt="image {alt}" src="data:image/png;base64,([^"]+)"', html).group(1)
        return Image.open(io.BytesIO(base64.b64decode(uri))).size
    assert size("a.nii") == (16, 16) and size("big.png") == (128, 256)


# -- a run larger than single_file_max: report/ with an index and gallery pages -----------------------
def read_pages(folder: Path) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.html"))}


def links_of(html: str) -> list[str]:
    return [h.replace("&amp;", "&") for h in re.findall(r'href="([^"]*)"', html)]


@pytest.fixture(scope="module")
def paged_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("paged") / "run", n=30, n_cf=3, failed=2, evil=True)
    index = write_report(run, single_file_max=10, page_size=7)
    return run, index


def test_paged_layout_pages_and_cases(paged_run):
    run, index = paged_run
    assert index == run / "report" / "index.html"
    gallery = sorted((run / "report" / "gallery").glob("*.html"))
    assert [g.name for g in gallery] == [f"page-{i:05d}.html" for i in range(1, 6)]     # 32 cases, 7 a page
    paths = list(open_run(run).cases["path"])
    seen: dict[str, list[str]] = {}
    for i, page in enumerate(gallery):
        html = page.read_text()
        found = re.findall(r'<article class="case [a-z]+" id="(case-\d+)"[^>]*>\s*<h3>([^<]*)</h3>', html)
        assert len(found) == (7 if i < 4 else 4)
        for anchor, title in found:
            seen.setdefault(anchor, []).append(page.name)
            assert title == paths[int(anchor[5:]) - 1].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert f"Gallery page {i + 1} of 5" in html and "<template class" not in html
    assert sorted(seen, key=lambda a: int(a[5:])) == [f"case-{i}" for i in range(1, 33)]
    assert all(len(v) == 1 for v in seen.values())                   # every case on exactly one page
    # the index: run-level views, no case images, the way into the gallery
    html = index.read_text()
    for section in ('id="summary"', 'id="look-first"', 'id="methods"', 'id="by-label"', 'id="by-outcome"',
                    'id="audit"', 'id="counterfactuals"', 'id="curves-plot"', 'id="sanity-plot"', 'id="cf-grid"'):
        assert section in html, section
    assert '<article' not in html and "32 cases in run order on 5 pages of 7" in html
    assert 'href="gallery/page-00001.html"' in html and 'href="gallery/page-00005.html"' in html
    # the forwarding page keeps RUN/report.html working
    forward = (run / "report.html").read_text()
    assert 'http-equiv="refresh" content="0; url=report/index.html"' in forward
    assert 'href="report/index.html"' in forward


def test_paged_links_resolve_to_existing_files_and_cases(paged_run):
    run, _ = paged_run
    pages = read_pages(run / "report")
    pages[run / "report.html"] = (run / "report.html").read_text()
    ids = {p: set(re.findall(r'id="([^"]+)"', html)) for p, html in pages.items()}
    checked = 0
    for page, html in pages.items():
        for href in links_of(html):
            assert "://" not in href and not href.startswith("/"), href
            file, _, fragment = href.partition("#")
            target = (page.parent / file).resolve() if file else page
            assert target.is_file(), (page, href)
            if fragment:
                assert fragment in ids[target], (page, href)
            checked += 1
    assert checked > 100
    # look-first links and list rows land on the page that holds the case
    html = pages[run / "report" / "index.html"]
    wrong = re.findall(r'href="(gallery/page-\d+\.html#case-\d+)"', html.split('id="lf-misclassified"')[1].split("</table>")[0])
    assert wrong and all(int(h.split("#case-")[1]) in range(7 * (int(h[13:18]) - 1) + 1, 7 * int(h[13:18]) + 1)
                         for h in wrong)
    cells = re.findall(r'<a href="(lists/cell-\d+-\d+-00001\.html)">(\d+)</a>', html)
    assert cells and sum(int(n) for _, n in cells) == 30
    for href, n in cells:
        rows = re.findall(r'<td class="path"><a href="\.\./gallery/page-\d+\.html#case-\d+">', pages[run / "report" / href])
        assert len(rows) == int(n)
    failed = pages[run / "report" / "lists" / "failed-00001.html"]
    assert failed.count("cannot read the image (not a PNG file)") == 2


def test_paged_pages_escape_user_data_under_a_strict_csp(paged_run):
    run, _ = paged_run
    pages = read_pages(run / "report")
    pages[run / "report.html"] = (run / "report.html").read_text()
    assert len(pages) > 10
    for page, html in pages.items():
        assert_strict_csp(html)
        assert EVIL_NAME not in html and "<script>" not in html, page
        assert re.findall(r"<script\b", html) in ([], ["<script"]), page
        assert "onerror=alert" not in html.replace("&lt;img src=x onerror=alert(1)&gt;", ""), page
    index = pages[run / "report" / "index.html"]
    assert "&lt;script&gt;" in index and "&lt;img src=x onerror=alert(1)&gt;.png" in index   # confusion, look first
    first = pages[run / "report" / "gallery" / "page-00001.html"]
    assert "<h3>&lt;img src=x onerror=alert(1)&gt;.png</h3>" in first and "&lt;script&gt;" in first


def test_paged_rebuild_removes_stale_pages(tmp_path):
    run = make_run(tmp_path / "run", n=20, n_cf=0, failed=1, extras=False)
    write_report(run, single_file_max=5, page_size=3)
    gallery = run / "report" / "gallery"
    assert len(list(gallery.glob("page-*.html"))) == 7
    (run / "report" / "notes.txt").write_text("mine")               # not the report's: stays
    write_report(run, single_file_max=5, page_size=11)         # 21 cases: 2 pages
    assert sorted(p.name for p in gallery.iterdir()) == ["page-00001.html", "page-00002.html"]
    assert not list((run / "report").rglob("*.tmp"))
    html = (run / "report" / "index.html").read_text()
    assert "page-00003" not in html
    # back under the limit: one file again, the folder's pages gone
    single = write_report(run)
    assert single == run / "report.html" and "<template class=\"case-data\"" in single.read_text()
    assert not gallery.exists() and not (run / "report" / "index.html").exists()
    assert (run / "report" / "notes.txt").read_text() == "mine"


def test_page_links_keep_the_ends_and_the_neighbours():
    from counterlens.viz.report_pages import page_links
    assert page_links(1, 1) == [1]
    assert page_links(0, 3) == [1, 2, 3]
    assert page_links(0, 4167) == list(range(1, 11)) + [None, 4167]
    assert page_links(50, 4167) == [1, 2, None, 48, 49, 50, 51, 52, None, 4166, 4167]
    assert page_links(4167, 4167) == [1, 2, None, 4165, 4166, 4167]
