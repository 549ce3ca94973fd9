"""Exports next to the report, ready for a paper.

* ``RUN/results.csv``: one row per image x method (prediction, time, every metric from the
  ``metrics`` table) and one row per counterfactual (target, validity, distances, plausibility),
  plus one row per image that failed to load. ``metrics.csv`` and ``metrics_summary.csv`` belong
  to the metrics step and are never written here. Text cells that a spreadsheet would run as a
  formula (starting with ``= + - @``, tab or carriage return) get a leading ``'``.
* ``RUN/figures/<id>_<name>.png``: one figure per case: the image and one overlay per method with
  its colour bar (:func:`counterlens.viz.plots.case_figure`), and below it each counterfactual
  (:func:`counterlens.viz.counterfactual_plots.counterfactual_figure`). Matplotlib draws them,
  about 0.3 s per case here, so the report writes them only when asked (or for small runs).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ..runs.store import RunStore
from .report_data import class_names, counterfactual_columns, metric_names

BASE_COLUMNS = ["row_type", "image_id", "name", "path", "label", "prediction", "probability", "correct", "status",
                "error", "method", "target", "seconds"]
CF_COLUMNS = ["cf_target", "cf_valid", "cf_reason", "cf_p_target_before", "cf_p_target_after", "l0", "l1", "l2",
              "linf", "lam", "iterations", "cf_seconds"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value):
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else value


def write_results_csv(store: RunStore, metrics: dict, path: Path) -> Path:
    """``results.csv`` (see the module docstring); written through a temporary file."""
    metric_cols = metric_names(metrics, case_metrics=True)
    renamed = {m: (f"metric_{m}" if m in BASE_COLUMNS + CF_COLUMNS else m) for m in metric_cols}
    extra_cf = counterfactual_columns(store)
    header = BASE_COLUMNS + [renamed[m] for m in metric_cols] + CF_COLUMNS + extra_cf
    metric_methods: dict[int, list[str]] = {}
    for image_id, method in metrics:
        metric_methods.setdefault(image_id, []).append(method)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        for img in store.images():
            correct = None if img["label"] is None or img["prediction"] is None else int(img["label"] == img["prediction"])
            base = {"image_id": img["id"], "name": img["name"], "path": img["path"], "label": img["label_name"],
                    "prediction": img["prediction_name"], "probability": img["probability"], "correct": correct,
                    "status": img["status"], "error": img["error"]}
            atts = store.attributions(img["id"])
            methods = list(atts) + sorted(set(metric_methods.get(img["id"], [])) - set(atts))
            cfs = store.counterfactuals(img["id"])
            if not methods and not cfs:
                writer.writerow({k: _cell(v) for k, v in {"row_type": "image", **base}.items()})
            for method in methods:
                att = atts.get(method, {})
                row = {"row_type": "attribution", **base, "method": method, "target": att.get("target"),
                       "seconds": att.get("seconds")}
                row.update({renamed[m]: v for m, v in metrics.get((img["id"], method), {}).items()})
                writer.writerow({k: _cell(v) for k, v in row.items()})
            for cf in cfs:
                before = json.loads(cf["probs_before"]) if cf["probs_before"] else []
                after = json.loads(cf["probs_after"]) if cf["probs_after"] else []
                t = int(cf["target"])
                row = {"row_type": "counterfactual", **base, "cf_target": cf["target_name"] or t,
                       "cf_valid": int(bool(cf["valid"])), "cf_reason": cf["reason"],
                       "cf_p_target_before": before[t] if 0 <= t < len(before) else None,
                       "cf_p_target_after": after[t] if 0 <= t < len(after) else None,
                       "cf_seconds": cf["seconds"], **{k: cf[k] for k in ("l0", "l1", "l2", "linf", "lam", "iterations")},
                       **{k: cf[k] for k in extra_cf}}
                writer.writerow({k: _cell(v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def figure_name(image_id: int, name: str) -> str:
    """``00012_glioma_x.png``: the id keeps it unique, the name (made filename-safe) readable."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).with_suffix("").as_posix()).strip("._")[:80]
    return f"{int(image_id):05d}_{stem or 'case'}.png"


def mpl_text(text) -> str:
    """User text for a matplotlib label: ``$`` would start mathtext."""
    return str(text).replace("$", r"\$")


def _stack_png(pngs: list[bytes]) -> Image.Image:
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for img in images:
        out.paste(img, ((out.width - img.width) // 2, y))
        y += img.height
    return out


def write_case_figures(store: RunStore, spec: dict, out_dir: Path, *, clip_percentile: float = 0.5,
                       dpi: int = 110) -> dict[int, str]:
    """One PNG per explained case under ``out_dir``; returns ``{image_id: file name}``."""
    import torch

    from .counterfactual_plots import counterfactual_figure
    from .plots import case_figure, figure_png

    classes = spec.get("model", {}).get("classes") or []
    value_range = spec.get("model", {}).get("value_range")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for img in store.images():
        if img["status"] != "done" or img["image_file"] is None:
            continue
        image = store.load_array(img["image_file"])
        maps = {m: store.load_array(a["array_file"]) for m, a in store.attributions(img["id"]).items()}
        cfs = store.counterfactuals(img["id"])
        if not maps and not cfs:
            continue
        pngs = []
        case = mpl_text(img["name"])
        if maps:
            fig = case_figure(image, maps, title="image", clip_percentile=clip_percentile, value_range=value_range)
            fig.suptitle(f"{case}: label {mpl_text(img['label_name'] or 'unknown')}, prediction "
                         f"{mpl_text(img['prediction_name'])} ({img['probability']:.2f})\n"
                         f"colour scales clipped at the {100 - clip_percentile:g}th percentile of |map|", fontsize=9)
            fig.tight_layout(rect=(0, 0, 1, 0.93))
            pngs.append(figure_png(fig, dpi=dpi))
        for cf in cfs:
            before = json.loads(cf["probs_before"])
            row = SimpleNamespace(
                x=torch.from_numpy(store.load_array(cf["array_file"]))[None], x_orig=torch.from_numpy(image)[None],
                target=torch.tensor([cf["target"]]), valid=torch.tensor([bool(cf["valid"])]),
                probs_before=torch.tensor([before]), probs_after=torch.tensor([json.loads(cf["probs_after"])]),
                reason=[mpl_text(cf["reason"] or "")],
                distance={k: torch.tensor([cf[k]]) for k in ("l0", "l1", "l2", "linf") if cf[k] is not None})
            names = [mpl_text(n) for n in class_names(classes, len(before))]
            fig = counterfactual_figure(row, 0, names, value_range)
            title = fig.get_suptitle()
            if title.startswith("case 0:"):           # name the case instead of its row in a batch of one
                fig.suptitle(f"{case}:" + title[len("case 0:"):], fontsize=9)
            pngs.append(figure_png(fig, dpi=dpi))
        name = figure_name(img["id"], img["name"])
        tmp = out_dir / (name + ".tmp")
        _stack_png(pngs).save(tmp, format="PNG")
        os.replace(tmp, out_dir / name)
        written[int(img["id"])] = name
    return written


def counterfactual_grid_png(store: RunStore, spec: dict, max_rows: int = 8) -> tuple[bytes, list[str]] | None:
    """The first ``max_rows`` counterfactuals of the run in one grid figure (original,
    counterfactual, signed difference per row) and the case name of each row; None when the run
    has none."""
    import torch

    from .counterfactual_plots import counterfactual_grid
    from .plots import figure_png

    rows = [dict(r) for r in store.db.execute(
        "SELECT c.*, i.name AS case_name, i.image_file FROM counterfactuals c JOIN images i ON i.id = c.image_id "
        "WHERE i.image_file IS NOT NULL ORDER BY c.image_id, c.target LIMIT ?", (int(max_rows),))]
    if not rows:
        return None
    xs, origs = [], []
    for r in rows:
        xs.append(store.load_array(r["array_file"]))
        origs.append(store.load_array(r["image_file"]))
    if len({x.shape for x in xs + origs}) != 1:      # mixed sizes cannot share a batch: keep the first size
        keep = [i for i in range(len(rows)) if xs[i].shape == xs[0].shape and origs[i].shape == xs[0].shape]
        rows, xs, origs = [rows[i] for i in keep], [xs[i] for i in keep], [origs[i] for i in keep]
    before = [json.loads(r["probs_before"]) for r in rows]
    result = SimpleNamespace(
        x=torch.from_numpy(np.stack(xs)), x_orig=torch.from_numpy(np.stack(origs)),
        target=torch.tensor([r["target"] for r in rows]), valid=torch.tensor([bool(r["valid"]) for r in rows]),
        probs_before=torch.tensor(before), probs_after=torch.tensor([json.loads(r["probs_after"]) for r in rows]),
        reason=[mpl_text(r["reason"] or "") for r in rows])
    names = [mpl_text(n) for n in class_names(spec.get("model", {}).get("classes"), len(before[0]))]
    png = figure_png(counterfactual_grid(result, names, max_rows=max_rows,
                                         value_range=spec.get("model", {}).get("value_range")))
    return png, [r["case_name"] for r in rows]
