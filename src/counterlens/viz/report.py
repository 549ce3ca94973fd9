"""The HTML report: one self-contained file (images inlined as PNG data URIs), opens offline.

Everything that comes from user data (file names, class names, error messages) goes through
Jinja2's autoescaping, so a file named ``<script>.png`` shows as text and runs nothing.
"""
from __future__ import annotations

import base64
import json
from types import SimpleNamespace
import datetime as _dt
from pathlib import Path

import jinja2
import numpy as np

from ..runs.store import RunStore
from .plots import figure_png, image_png, overlay_png

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("counterlens.viz", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def counterfactual_panel(store: RunStore, image: np.ndarray, cf: dict, classes: list[str], value_range) -> dict:
    """One stored counterfactual as a figure (original, counterfactual, difference, probabilities)."""
    import torch
    from .counterfactual_plots import counterfactual_figure
    row = SimpleNamespace(
        x=torch.from_numpy(store.load_array(cf["array_file"]))[None], x_orig=torch.from_numpy(image)[None],
        target=torch.tensor([cf["target"]]), valid=torch.tensor([bool(cf["valid"])]),
        probs_before=torch.tensor([json.loads(cf["probs_before"])]),
        probs_after=torch.tensor([json.loads(cf["probs_after"])]), reason=[cf["reason"]],
        distance={k: torch.tensor([cf[k]]) for k in ("l1", "l2", "linf")})
    png = figure_png(counterfactual_figure(row, 0, classes or None, value_range))
    return {"png": _b64(png), "target": cf["target_name"], "valid": bool(cf["valid"]), "reason": cf["reason"],
            "l1": cf["l1"], "l2": cf["l2"]}


def build_cases(store: RunStore, classes: list[str], value_range, clip_percentile: float) -> list[dict]:
    cases = []
    for row in store.images():
        case = {"name": row["name"], "label_name": row["label_name"], "prediction_name": row["prediction_name"],
                "error": row["error"] if row["status"] != "done" else None}
        if row["status"] != "done":
            case.update(status_class="failed", status_text="failed")
            cases.append(case)
            continue
        correct = None if row["label"] is None else row["label"] == row["prediction"]
        case["status_class"] = {None: "unknown", True: "correct", False: "incorrect"}[correct]
        case["status_text"] = {None: "no label", True: "correct", False: "incorrect"}[correct]
        case["probability"] = row["probability"]
        probs = json.loads(row["probs"])
        case["probs"] = [{"name": c, "value": float(p)} for c, p in zip(classes, probs)]
        image = store.load_array(row["image_file"])
        case["image_png"] = _b64(image_png(image, value_range))
        case["overlays"] = []
        for method, att in store.attributions(row["id"]).items():
            amap = store.load_array(att["array_file"])
            png = overlay_png(image, amap, clip_percentile=clip_percentile, value_range=value_range)
            case["overlays"].append({"method": method, "png": _b64(png), "target": classes[att["target"]]})
        case["counterfactuals"] = [counterfactual_panel(store, image, cf, classes, value_range)
                                   for cf in store.counterfactuals(row["id"])]
        cases.append(case)
    return cases


def write_report(run_dir, *, clip_percentile: float = 0.5, out: str | Path | None = None) -> Path:
    """Render ``RUN/report.html`` from the run directory and return its path."""
    store = RunStore(run_dir, create=False)
    try:
        spec = store.read_spec()
        classes = spec.get("model", {}).get("classes") or []
        value_range = spec.get("model", {}).get("value_range")
        cases = build_cases(store, classes, value_range, clip_percentile)
        done = [c for c in store.images() if c["status"] == "done"]
        labelled = [c for c in done if c["label"] is not None]
        correct = sum(c["label"] == c["prediction"] for c in labelled)
        confusion = None
        if labelled and classes:
            confusion = np.zeros((len(classes), len(classes)), dtype=int)
            for c in labelled:
                confusion[c["label"], c["prediction"]] += 1
            confusion = confusion.tolist()
        seconds = store.method_seconds()
        methods = [{"name": m, "params": ", ".join(f"{k}={v}" for k, v in (p or {}).items()),
                    "seconds": seconds.get(m)} for m, p in spec.get("methods", {}).items()]
        html = _ENV.get_template("report.html").render(
            title=Path(run_dir).resolve().name, created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            version=spec.get("versions", {}).get("counterlens", "?"), clip_percentile=clip_percentile,
            model={"description": spec.get("model", {}).get("description", "?"),
                   "hash": spec.get("model", {}).get("sha256"),
                   "test_accuracy": spec.get("model", {}).get("test_accuracy")},
            data=spec.get("data", {}).get("path", "?"), classes=classes, methods=methods,
            counts={"total": len(done), "failed": len(store.images()) - len(done),
                    "labelled": len(labelled), "correct": correct},
            accuracy=(correct / len(labelled)) if labelled else None, confusion=confusion,
            device=spec.get("device", "?"), versions=spec.get("versions", {}), cases=cases)
    finally:
        store.close()
    path = Path(out) if out else Path(run_dir) / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
