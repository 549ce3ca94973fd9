"""The HTML report: one self-contained file that opens offline in any browser.

``write_report(RUN)`` reads the run directory (:mod:`.report_data`) and renders
``templates/report.html``. Images are inlined as PNG data URIs; the page allows nothing else
(Content-Security-Policy: no network, inline style, data: images, and only the one inline script
whose SHA-256 it names). The gallery keeps each case in an inert ``<template>``: its images are
decoded only when the page that shows it is opened (24 cases a page), so a run of 1,000 cases
stays responsive.

Everything that comes from user data (file names, class names, error messages, metric names, the
audit's verdict) goes through Jinja2's autoescaping, and the script only compares strings and sets
``textContent``, so a file named ``<script>.png`` shows as text and runs nothing.

Next to the report, ``RUN/results.csv`` (all metrics, one row per image x method and per
counterfactual) and, when asked, ``RUN/figures/*.png`` (one figure per case): see :mod:`.exports`.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import os
from pathlib import Path

import jinja2
from markupsafe import Markup

from ..errors import InputError
from ..runs.store import RunStore
from . import report_data as rd
from .exports import (
    counterfactual_grid_png,
    figure_name,
    write_case_figures,
    write_results_csv,
)
from .plots import curves_figure, figure_png, randomisation_figure
from .report_images import css_gradient, data_uri

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("counterlens.viz", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined)
_ENV.filters["fmt"] = rd.fmt

PAGE_SIZE = 24


def _static(name: str) -> str:
    return (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")


def csp_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


def _plot_uri(make, data, notes: list[str], what: str):
    try:
        return data_uri(figure_png(make(data), dpi=90))
    except (InputError, TypeError, ValueError, KeyError) as exc:
        notes.append(f"the {what} could not be drawn ({exc})")
        return None


def build_context(run_dir: Path, store: RunStore, *, clip_percentile: float, page_size: int) -> dict:
    """Everything the template shows, as plain values."""
    notes: list[str] = []
    spec = store.read_spec()
    model = spec.get("model", {}) or {}
    classes = [str(c) for c in (model.get("classes") or spec.get("data", {}).get("classes") or [])]
    value_range = model.get("value_range")
    metrics = rd.read_metrics(store)
    metric_order = rd.metric_names(metrics)
    sanity = rd.read_json(run_dir, "sanity.json", notes) or {}
    curves = rd.read_json(run_dir, "curves.json", notes)
    audit = rd.read_json(run_dir, "audit.json", notes)
    cf_extra = rd.counterfactual_columns(store)
    images = store.images()
    cases = [rd.build_case(store, row, classes=classes, value_range=value_range, clip_percentile=clip_percentile,
                           metrics=metrics, metric_order=metric_order, sanity=sanity, cf_extra=cf_extra)
             for row in images]
    done = [r for r in images if r["status"] == "done"]
    labelled = [r for r in done if r["label"] is not None and r["prediction"] is not None]
    correct = sum(r["label"] == r["prediction"] for r in labelled)
    methods_spec = spec.get("methods") or {}
    method_names = list(dict.fromkeys(list(methods_spec) + [o["method"] for c in cases for o in c["overlays"]]))
    grid = counterfactual_grid_png(store, spec)
    return {
        "title": Path(run_dir).resolve().name, "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": (spec.get("versions") or {}).get("counterlens", "?"), "clip_percentile": clip_percentile,
        "model": {"description": model.get("description", "?"), "hash": model.get("sha256"),
                  "source": model.get("source"), "test_accuracy": model.get("test_accuracy"),
                  "value_range": value_range},
        "data": (spec.get("data") or {}).get("path", "?"), "classes": classes, "seed": spec.get("seed"),
        "target": spec.get("target"), "device": spec.get("device", "?"), "versions": spec.get("versions") or {},
        "counterfactual_settings": spec.get("counterfactual") or {},
        "counts": {"total": len(done), "failed": len(images) - len(done), "labelled": len(labelled),
                   "correct": correct},
        "accuracy": (correct / len(labelled)) if labelled else None,
        "confusion": rd.confusion_matrix(labelled, classes),
        "metric_order": metric_order, "metric_hints": rd.METRIC_HINTS,
        "methods": rd.method_table(methods_spec, store.method_seconds(), metrics, metric_order, sanity),
        "method_names": method_names,
        "metrics_summary": None if metrics else rd.read_csv_table(run_dir / "metrics_summary.csv", notes),
        "curves_uri": _plot_uri(curves_figure, curves, notes, "deletion / insertion curves") if curves else None,
        "sanity_uri": _plot_uri(randomisation_figure, sanity, notes, "randomisation curves") if sanity else None,
        "sanity_rows": rd.sanity_rows(sanity),
        "audit": rd.audit_view(audit) if audit else None,
        "cf_summary": rd.counterfactual_summary(store, cf_extra),
        "cf_grid_uri": data_uri(grid[0]) if grid else None, "cf_grid_names": grid[1] if grid else [],
        "cases": cases, "page_size": page_size, "notes": notes,
        "filter_classes": list(dict.fromkeys(classes + sorted({n for c in cases for n in (c["label_name"], c["prediction_name"])
                                                               if n is not None} - set(classes)))),
        "outcomes": {o: sum(c["outcome"] == o for c in cases) for o in ("correct", "incorrect", "unknown", "failed")},
        "gradients": {"signed": css_gradient("RdBu_r"), "positive": css_gradient("inferno")},
    }


def write_report(run_dir, *, clip_percentile: float = 0.5, out: str | Path | None = None,
                 figures: bool = False, page_size: int = PAGE_SIZE) -> Path:
    """Render ``RUN/report.html`` (or ``out``) from a run directory and return its path.

    Also writes ``RUN/results.csv``. ``figures``: also write ``RUN/figures/<id>_<name>.png``, one
    matplotlib figure per case (off by default: about 0.5 s per case, 1 s with a counterfactual,
    on these CPUs, against about 10 ms per case for the report itself). ``page_size``: cases per
    page of the gallery.
    """
    if not 0 <= clip_percentile < 50:
        raise InputError(f"clip_percentile={clip_percentile}; pass a percentage in [0, 50), e.g. 0.5")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise InputError(f"page_size={page_size!r}; pass a positive number of cases per page")
    run_dir = Path(run_dir)
    with RunStore(run_dir, create=False) as store:
        context = build_context(run_dir, store, clip_percentile=clip_percentile, page_size=page_size)
        write_results_csv(store, rd.read_metrics(store), run_dir / "results.csv")
        if figures:
            write_case_figures(store, store.read_spec(), run_dir / "figures", clip_percentile=clip_percentile)
    figure_dir = run_dir / "figures"
    for case in context["cases"]:       # link the figures there are (from this call or an earlier one)
        name = figure_name(case["id"], case["name"])
        case["figure"] = name if (figure_dir / name).exists() else None
    context["files"] = [name for name in ("results.csv", "metrics.csv", "metrics_summary.csv", "curves.json",
                                          "sanity.json", "audit.json") if (run_dir / name).exists()]
    context["n_figures"] = sum(c["figure"] is not None for c in context["cases"])
    script = _static("report.js")
    if "</script" in script.lower():
        raise RuntimeError("report.js must not contain a closing script tag")
    html = _ENV.get_template("report.html").render(
        **context, script=Markup(script), script_hash=Markup(csp_hash(script)), css=Markup(_static("report.css")))
    path = Path(out) if out else run_dir / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path
