"""The HTML report and its exports, without a browser (tests/browser/ opens it in Chromium).

``make_run`` builds a run directory straight through ``RunStore`` (no model: synthetic brain-MRI
slices, maps shaped like what Grad-CAM and guided backprop give, seeded), and ``add_metric_files``
writes what the metrics step writes (the ``metrics`` table, curves.json, sanity.json, audit.json,
metrics.csv, metrics_summary.csv, the extra counterfactual columns) with plausible values.
"""
import base64
import csv
import hashlib
import io
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from counterlens.data.synthetic import generate
from counterlens.errors import InputError
from counterlens.runs.store import RunStore
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


def make_run(root: Path, n: int = 12, *, size: int = 32, classes=CLASSES, n_cf: int = 4, failed: int = 1,
             evil: bool = False, extras: bool = True, seed: int = 0) -> Path:
    """A run directory of ``n`` explained cases (+ ``failed`` unreadable ones), ``n_cf`` of them with
    a counterfactual; ``evil`` names the first case and the second class with markup; ``extras``
    adds the metric files."""
    classes = list(classes)
    if evil:
        classes[1] = EVIL_CLASS
    gen = generate("brain-mri", n, size=size, seed=seed, split="test")
    rng = np.random.default_rng(seed)
    store = RunStore(root)
    store.db.execute("PRAGMA synchronous = OFF")      # a test fixture; the real store keeps FULL
    store.write_spec({
        "model": {"source": "models/brain", "sha256": "ab" * 32, "description": "brain-tumor-cnn",
                  "classes": classes, "value_range": [0, 1], "test_accuracy": 0.875},
        "data": {"path": "data/Testing", "images": n + failed, "classes": classes}, "target": "predicted",
        "seed": seed, "methods": {"gradcam": {"layer": "auto", "relu": True}, "guided_backprop": {}},
        "device": "cpu", "versions": {"python": "3.11", "counterlens": "0.1.0", "torch": "2.13.0"}})
    cf_done = 0
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
        image_id = store.record_image(
            path=f"/data/Testing/{i}/{name}", name=name, label=label, label_name=classes[label], prediction=pred,
            prediction_name=classes[pred], probs=probs.tolist(), image=image, mask=gen.masks["tumor"][i],
            attributions={"gradcam": (cam, pred, 0.004 + 0.001 * rng.random()),
                          "guided_backprop": (guided.astype(np.float32), pred, 0.002)})
        if cf_done < n_cf:
            target = (pred + 1) % 4
            valid = cf_done % 3 != 2
            x = np.clip(image + 0.35 * gaussian_filter(tumour, 2)[None] / max(gaussian_filter(tumour, 2).max(), 1e-6),
                        0, 1).astype(np.float32)
            after = probs[::-1].copy()
            after[target] = 0.8 if valid else 0.3
            after = after / after.sum()
            d = (x - image).ravel()
            store.record_counterfactuals(image_id, [{
                "target": target, "target_name": classes[target], "valid": valid,
                "reason": "" if valid else "target probability 0.30 < threshold 0.5", "lam": 0.1, "iterations": 60,
                "distance": {"l0": float((np.abs(d) > 1e-3).sum()), "l1": float(np.abs(d).sum()),
                             "l2": float(np.sqrt((d ** 2).sum())), "linf": float(np.abs(d).max())},
                "probs_before": probs.tolist(), "probs_after": after.tolist(), "seconds": 0.5, "x": x}])
            cf_done += 1
    for j in range(failed):
        store.record_image(path=f"/data/Testing/broken{j}.png", name=f"{classes[0]}/broken{j}.png", label=0,
                           label_name=classes[0], status="failed",
                           error=f"/data/Testing/broken{j}.png: cannot read the image (not a PNG file)")
    store.db.commit()
    store.close()
    if extras:
        add_metric_files(root, seed=seed)
    return root


def add_metric_files(root: Path, seed: int = 0) -> None:
    """What the metrics step writes, with plausible values for every explained case and method."""
    rng = np.random.default_rng(seed + 1)
    with sqlite3.connect(root / "results.sqlite") as db:
        pairs = db.execute("SELECT image_id, method FROM attributions ORDER BY image_id, method").fetchall()
        methods = sorted({m for _, m in pairs})
        db.execute("CREATE TABLE IF NOT EXISTS metrics (image_id INTEGER, method TEXT, metric TEXT, value REAL, "
                   "PRIMARY KEY (image_id, method, metric))")
        rows = []
        for image_id, method in pairs:
            good = method == "gradcam"
            dele = rng.uniform(0.05, 0.3) if good else rng.uniform(0.3, 0.6)
            ins = rng.uniform(0.5, 0.9) if good else rng.uniform(0.2, 0.5)
            values = {"deletion_auc": dele, "insertion_auc": ins, "mufidelity": rng.uniform(-0.1, 0.6),
                      "pointing_game": float(rng.random() < 0.7), "relevance_mass": rng.uniform(0.1, 0.8),
                      "mass_lift": rng.uniform(0.8, 4), "sparseness": rng.uniform(0.3, 0.9),
                      "entropy": rng.uniform(4, 7),
                      # the first image's baseline already gives its class: insertion cannot judge it
                      "insertion_room": 0.02 if image_id == pairs[0][0] else 0.8}
            rows += [(image_id, method, k, float(v)) for k, v in values.items()]
        db.executemany("INSERT OR REPLACE INTO metrics VALUES (?,?,?,?)", rows)
        cf_cols = {r[1] for r in db.execute("PRAGMA table_info(counterfactuals)")}
        for col in ("nearest_train_distance", "im1"):
            if col not in cf_cols:
                db.execute(f"ALTER TABLE counterfactuals ADD COLUMN {col} REAL")
        cf_ids = [r[0] for r in db.execute("SELECT image_id FROM counterfactuals ORDER BY image_id")]
        for k, image_id in enumerate(cf_ids):
            if k != 1:       # the second one has no values: shown without them
                db.execute("UPDATE counterfactuals SET nearest_train_distance = ?, im1 = ? WHERE image_id = ?",
                           (float(rng.uniform(2, 6)), float(rng.uniform(0.7, 1.3)), image_id))
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
    (root / "metrics.csv").write_text("image_id,method,metric,value\n1,gradcam,deletion_auc,0.2\n")
    (root / "metrics_summary.csv").write_text("method,metric,mean\ngradcam,deletion_auc,0.2\n")


def csp_of(html: str) -> str:
    return re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run", n=10, n_cf=4, failed=1)
    return run, write_report(run, figures=False).read_text()


def test_report_has_every_section_with_metric_files(full_run):
    _, html = full_run
    for section in ('id="summary"', 'id="methods"', 'id="audit"', 'id="counterfactuals"', 'id="cases"'):
        assert section in html
    assert html.count('<template class="case-data"') == 11
    assert html.count("gradcam (target:") == 10 and html.count("guided_backprop (target:") == 10
    assert html.count('<figure class="cf">') == 4
    assert 'id="curves-plot"' in html and 'id="sanity-plot"' in html and 'id="cf-grid"' in html
    # method table: mean metrics per method, sanity verdict per method
    table = html.split('id="method-table"')[1].split("</table>")[0]
    assert "deletion_auc" in table and "insertion_auc" in table and "(n=10)" in table
    assert table.count("badge good") == 1 and table.count("badge bad") == 1
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


def test_report_is_self_contained_with_a_strict_csp(full_run):
    _, html = full_run
    csp = csp_of(html)
    assert "default-src 'none'" in csp and "img-src data:" in csp and "unsafe-eval" not in csp
    script_src = re.search(r"script-src ([^;]+)", csp).group(1).strip()
    assert script_src.startswith("'sha256-") and "unsafe-inline" not in script_src
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert script_src == f"'sha256-{digest}'"               # the CSP allows exactly this script
    assert "http://" not in html and "https://" not in html and "src=\"//" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "innerHTML" not in scripts[0] and "eval(" not in scripts[0]


def test_sections_are_left_out_without_their_files(tmp_path):
    run = make_run(tmp_path / "run", n=4, n_cf=0, failed=0, extras=False)
    html = write_report(run, figures=False).read_text()
    for absent in ('id="methods"', 'id="audit"', 'id="counterfactuals"', "sanity check", "faithfulness",
                   'class="mtable"', "nearest training", 'id="f-show-cf"', 'id="cf-grid"'):
        assert absent not in html, absent
    assert html.count('<template class="case-data"') == 4 and 'id="summary"' in html
    # only a summary CSV and an unreadable JSON: the CSV is shown, the JSON becomes a note
    (run / "metrics_summary.csv").write_text("method,metric,mean\ngradcam,deletion_auc,0.25\n")
    (run / "sanity.json").write_text("{not json")
    html = write_report(run, figures=False).read_text()
    assert 'id="metrics-summary"' in html and "0.25" in html
    assert "sanity.json could not be read" in html and 'id="sanity-plot"' not in html


def test_user_data_is_escaped(tmp_path):
    run = make_run(tmp_path / "run", n=6, n_cf=2, evil=True)
    html = write_report(run, figures=False).read_text()
    assert EVIL_NAME not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert re.findall(r"<script\b", html) == ['<script']      # only the report's own script element
    assert "onerror=alert" not in html.replace("&lt;img src=x onerror=alert(1)&gt;", "")
    # the case's figure file name is filesystem- and URL-safe
    name = figure_name(1, EVIL_NAME)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and name.startswith("00001_")


def test_results_csv_merges_attributions_counterfactuals_and_metrics(full_run):
    run, _ = full_run
    assert (run / "metrics.csv").read_text() == "image_id,method,metric,value\n1,gradcam,deletion_auc,0.2\n"
    with open(run / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = [r["row_type"] for r in rows]
    assert kinds.count("attribution") == 20 and kinds.count("counterfactual") == 4 and kinds.count("image") == 1
    with sqlite3.connect(run / "results.sqlite") as db:
        stored = {(i, m, k): v for i, m, k, v in db.execute("SELECT image_id, method, metric, value FROM metrics")}
        cf = db.execute("SELECT image_id, l2, im1 FROM counterfactuals ORDER BY image_id").fetchall()
    for r in rows:
        if r["row_type"] == "attribution":
            for metric in ("deletion_auc", "insertion_auc", "mass_lift", "insertion_room"):
                assert float(r[metric]) == stored[(int(r["image_id"]), r["method"], metric)]
            assert r["label"] in CLASSES and float(r["seconds"]) > 0
    cf_rows = [r for r in rows if r["row_type"] == "counterfactual"]
    assert [(int(r["image_id"]), float(r["l2"])) for r in cf_rows] == [(i, l2) for i, l2, _ in cf]
    assert [r["im1"] for r in cf_rows][1] == "" and float(cf_rows[0]["im1"]) == cf[0][2]
    assert {r["cf_valid"] for r in cf_rows} == {"0", "1"}
    failed = next(r for r in rows if r["row_type"] == "image")
    assert failed["status"] == "failed" and "not a PNG" in failed["error"]


def test_results_csv_defuses_spreadsheet_formulas(tmp_path):
    run = make_run(tmp_path / "run", n=2, n_cf=0, failed=0, extras=False)
    with sqlite3.connect(run / "results.sqlite") as db:
        db.execute("UPDATE images SET name = '=HYPERLINK(\"x\")' WHERE id = 1")
    write_report(run, figures=False)
    with open(run / "results.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert names[0] == "'=HYPERLINK(\"x\")"


def test_case_figures_export(tmp_path):
    run = make_run(tmp_path / "run", n=3, n_cf=1, failed=1, evil=True, extras=False)
    html = write_report(run, figures=True).read_text()
    files = sorted((run / "figures").glob("*.png"))
    assert len(files) == 3 and all(re.fullmatch(r"\d{5}_[A-Za-z0-9._-]+\.png", f.name) for f in files)
    with_cf, plain = Image.open(files[0]), Image.open(files[1])
    assert with_cf.height > plain.height * 1.5          # the counterfactual figure is stacked below
    assert plain.width > 300 and html.count('figure (PNG)</a>') == 3 and "3 PNG figures" in html


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
    with pytest.raises(InputError, match="not a counterlens run directory"):
        write_report(tmp_path / "nowhere")
    out = write_report(run, out=tmp_path / "elsewhere.html", page_size=5, figures=False)
    assert out == tmp_path / "elsewhere.html" and 'data-page-size="5"' in out.read_text()


def test_volumes_and_a_run_without_run_yaml(tmp_path):
    """3D volumes show their middle slice; a run without run.yaml still renders (class indices as names)."""
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    with RunStore(run) as store:
        vol = rng.random((1, 6, 16, 16)).astype(np.float32)
        image_id = store.record_image(path="/v/a.nii", name="a.nii", label=1, label_name=None, prediction=1,
                                      prediction_name="1", probs=[0.2, 0.8], image=vol,
                                      attributions={"saliency": (rng.random((6, 16, 16)), 1, 0.01)})
        x = vol.copy()
        x[0, 3, 4:8, 4:8] += 0.5
        store.record_counterfactuals(image_id, [{
            "target": 0, "target_name": None, "valid": True, "reason": "", "lam": 0.1, "iterations": 5,
            "distance": {"l0": 16.0, "l1": 8.0, "l2": 2.0, "linf": 0.5}, "probs_before": [0.2, 0.8],
            "probs_after": [0.7, 0.3], "x": x}])
    html = write_report(run, figures=True).read_text()
    assert "saliency (target: 1)" in html and "counterfactual towards 0: valid" in html
    assert len(list((run / "figures").glob("*.png"))) == 1 and 'id="cf-grid"' in html
    uri = re.search(r'class="img main" alt="image a.nii" src="data:image/png;base64,([^"]+)"', html).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).size == (16, 16)
