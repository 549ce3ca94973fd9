"""The HTML report of a run directory, read through :func:`counterlens.runs.store.open_run`.

``write_report(RUN)`` writes, for a run of up to ``single_file_max`` cases (default 2,000), one
self-contained ``RUN/report.html``; beyond that a folder ``RUN/report/`` (:mod:`.report_pages`):
``index.html`` with the run-level views and the cases to look at first, and a gallery of
``page_size`` cases per file (``gallery/page-00001.html`` ...) that a reader opens page by page,
offline, by plain links (``RUN/report.html`` then forwards to the index). Building costs the
same per case at any size and holds one page of images in memory at a time.

Every page allows nothing but itself: images are inlined as PNG data URIs and the
Content-Security-Policy allows no network, inline style, data: images and only the one inline
script whose SHA-256 it names. In the one-file report the gallery keeps each case in an inert
``<template>``: its images are decoded only when the page that shows it is opened (24 cases a page).

Everything that comes from user data (file names, class names, error messages, metric names, the
audit's verdict) goes through Jinja2's autoescaping, and the script only compares strings and sets
``textContent``, so a file named ``<script>.png`` shows as text and runs nothing.

Next to the report, ``RUN/results.csv`` (all metrics, one row per case x method and per
counterfactual) and, when asked, ``RUN/figures/*.png`` (one figure per case): see :mod:`.exports`.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..runs.store import open_run, write_spec
from . import report_data as rd
from . import report_verdict as rv
from .exports import counterfactual_grid_png, figure_name, write_case_figures, write_results_csv
from .plots import OverlayStyle, curves_figure, figure_png, randomisation_figure
from .report_cases import LOOK_FIRST, CaseContext, anchor, case_pages, look_first
from .report_images import data_uri
from .report_pages import remove_paged, write_paged
from .report_render import page_assets, render_to

PAGE_SIZE = 24
SINGLE_FILE_MAX = 2000


def _plot_uri(make, data, notes: list[str], what: str):
    try:
        return data_uri(figure_png(make(data), dpi=90))
    except (InputError, TypeError, ValueError, KeyError) as exc:
        notes.append(f"the {what} could not be drawn ({exc})")
        return None


@dataclass
class Tables:
    """The run as the report reads it: cases, case x method rows, counterfactuals (see :mod:`.report_data`)."""

    cases: pd.DataFrame
    pairs: pd.DataFrame
    metric_cols: list[str]          # every metric present (case-level ones last)
    metric_order: list[str]         # the per-method ones, in display order
    cf: pd.DataFrame | None
    cf_extra: list[str]


def read_tables(run) -> Tables:
    cases = rd.case_table(run)
    pairs, metric_cols = rd.pair_table(run, cases)
    cf = rd.counterfactual_table(run, cases)
    return Tables(cases, pairs, metric_cols, rd.metric_names(metric_cols), cf, rd.counterfactual_columns(cf))


def run_context(run, t: Tables, *, overlay: OverlayStyle, case_href, notes: list[str], files: list[str],
                n_figures: int) -> dict:
    """Everything the run-level panels show, as plain values."""
    spec = run.spec
    model = spec.get("model", {}) or {}
    classes = run.classes
    sanity = rv.checked_sanity(rd.read_json(run, "sanity.json", notes) or {})   # verdicts as their numbers give them
    curves = rd.read_json(run, "curves.json", notes)
    audit = rd.read_json(run, "audit.json", notes)
    cases = t.cases
    done = int((cases["status"] == "done").sum())
    labelled = int(cases["outcome"].isin(["correct", "incorrect"]).sum())
    correct = int((cases["outcome"] == "correct").sum())
    methods_spec = spec.get("methods") or {}
    method_names = list(dict.fromkeys(list(run.methods) + list(dict.fromkeys(t.pairs["method"]))))
    grid = counterfactual_grid_png(run, t.cf)
    pos_of = dict(zip(cases["path"], cases["pos"]))
    names = [n for n in list(cases["label"].dropna()) + list(cases["prediction"].dropna())]
    verdicts = rv.method_verdicts(method_names, sanity, t.pairs)
    lists = look_first(cases, t.pairs)
    first = rv.first_screen(rv.accuracy_verdict(cases, classes, run.multilabel),
                            rv.audit_verdict(audit) if audit else None, verdicts, lists)
    return {
        "first": first, "recommend": (verdicts["ranked"], verdicts["reason"]),
        "title": Path(run.root).resolve().name, "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": (spec.get("versions") or {}).get("counterlens", "?"), "clip_percentile": overlay.clip_percentile,
        "model": {"description": model.get("description", "?"), "hash": model.get("sha256"),
                  "source": model.get("source"), "test_accuracy": model.get("test_accuracy"),
                  "value_range": model.get("value_range")},
        "data": (spec.get("data") or {}).get("path", "?"), "classes": classes, "seed": spec.get("seed"),
        "loading": rd.loading_view(spec),
        "target": spec.get("target"), "device": spec.get("device", "?"), "versions": spec.get("versions") or {},
        "counterfactual_settings": spec.get("counterfactual") or {},
        "counts": {"total": done, "failed": len(cases) - done, "labelled": labelled, "correct": correct},
        "accuracy": (correct / labelled) if labelled else None,
        "confusion": rd.confusion_matrix(cases, classes),
        "metric_order": t.metric_order, "metric_hints": rd.METRIC_HINTS,
        "methods": rd.method_table(methods_spec, run.method_seconds(), t.pairs, t.metric_order, sanity),
        "skipped": run.skipped,
        "group_tables": rd.group_tables(cases, t.pairs, t.metric_order, classes, by_finding=run.multilabel),
        "multilabel": run.multilabel,
        "method_names": method_names,
        "curves_uri": _plot_uri(curves_figure, curves, notes, "deletion / insertion curves") if curves else None,
        "sanity_uri": _plot_uri(randomisation_figure, sanity, notes, "randomisation curves") if sanity else None,
        "sanity_rows": rd.sanity_rows(sanity), "sanity": sanity,
        "audit": rd.audit_view(audit) if audit else None,
        "cf_summary": rd.counterfactual_summary(t.cf, t.cf_extra),
        "cf_grid_uri": data_uri(grid[0]) if grid else None,
        "cf_grid_rows": [{"path": p, "pos": int(pos_of[p])} for p in grid[1]] if grid else [],
        "look_first": lists, "look_first_limit": LOOK_FIRST, "case_href": case_href,
        "notes": notes, "n_cases": len(cases),
        "filter_classes": list(dict.fromkeys(classes + sorted(set(map(str, names)) - set(classes)))),
        "outcomes": {o: int((cases["outcome"] == o).sum()) for o in rd.OUTCOMES},
        "files": files + [n for n, d in (("curves.json", curves), ("sanity.json", sanity or None),
                                         ("audit.json", audit)) if d is not None],
        "n_figures": n_figures, "failed_href": None, "paged": False, "root": "",
    }


DISPLAY_KEYS = {"cmap": "colormap", "alpha": "alpha", "absolute": "absolute", "clip_percentile": "clip_percentile"}


def display_style(recorded: dict | None, *, cmap=None, alpha=None, absolute=None, clip_percentile=None) -> OverlayStyle:
    """How a run's report draws its maps: each setting given here, else the one ``recorded`` by the
    run's last report (``RUN/run.yaml``'s ``report: {colormap, alpha, absolute, clip_percentile}``),
    else the default (:class:`~.plots.OverlayStyle`). ``cmap="auto"`` asks for the default colour
    map even when another one was recorded. Checked (one-line InputErrors)."""
    recorded = recorded if isinstance(recorded, dict) else {}
    given = {"cmap": cmap, "alpha": alpha, "absolute": absolute, "clip_percentile": clip_percentile}
    chosen = {k: v if v is not None else recorded.get(DISPLAY_KEYS[k]) for k, v in given.items()}
    if chosen["cmap"] == "auto":
        chosen["cmap"] = None
    defaults = OverlayStyle()
    return OverlayStyle(**{k: getattr(defaults, k) if v is None and k != "cmap" else v for k, v in chosen.items()})


def _record_display(run_dir: Path, spec: dict, overlay: OverlayStyle) -> None:
    """Keep the settings the report was drawn with in ``RUN/run.yaml`` (``spec``: as read) under
    ``report:``, so the next command that re-writes the report (evaluate, audit, counterfactual,
    report) draws it the same way and ``counterlens run RUN/run.yaml`` makes the new run's report alike."""
    if not spec:
        return
    wanted = {DISPLAY_KEYS[k]: v for k, v in overlay.kwargs().items()}
    if spec.get("report") != wanted:
        write_spec(run_dir, {**spec, "report": wanted})


def write_report(run_dir, *, clip_percentile: float | None = None, cmap: str | None = None, alpha: float | None = None,
                 absolute: bool | None = None, out: str | Path | None = None, figures: bool = False,
                 page_size: int = PAGE_SIZE, single_file_max: int = SINGLE_FILE_MAX) -> Path:
    """Write the report of a run directory and return the path of the page to open.

    Up to ``single_file_max`` cases: one self-contained ``RUN/report.html`` (or ``out``), returned.
    More: ``RUN/report/index.html`` (returned) with gallery pages of ``page_size`` cases under
    ``RUN/report/gallery/`` and case lists under ``RUN/report/lists/``; ``RUN/report.html`` (or
    ``out``) becomes a small page that forwards to the index. Files of an earlier build that this
    one does not write (a gallery that had more pages, a one-file report's folder) are removed.

    Also writes ``RUN/results.csv``. ``figures``: also write ``RUN/figures/<name>_<hash>.png``, one
    matplotlib figure per case (off by default: about 0.5 s per case, 1 s with a counterfactual,
    on these CPUs, against about 2 ms per case for the report itself). ``page_size``: cases per
    page of the gallery.

    How maps are shown (:class:`~.plots.OverlayStyle`, stated in the run summary): ``cmap`` (a
    matplotlib colour map name; ``"auto"``: ``RdBu_r`` centred on zero for signed maps, ``inferno``
    for non-negative ones), ``alpha`` (where ``|map|`` reaches the clip: the start of the page's
    opacity sliders), ``absolute`` (show ``|map|``), ``clip_percentile``. The case figures use the same.
    A setting left at None is the one this run's report was last drawn with (kept in ``RUN/run.yaml``
    under ``report:``), else the default (:func:`display_style`); the settings used are kept there.
    """
    given = {"cmap": cmap, "alpha": alpha, "absolute": absolute, "clip_percentile": clip_percentile}
    display_style(None, **given)                         # every given setting checked before the run is opened
    for name, value in (("page_size", page_size), ("single_file_max", single_file_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name}={value!r}; pass a positive number of cases")
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    overlay = display_style(run.spec.get("report"), **given)
    t = read_tables(run)
    write_results_csv(t.cases, t.pairs, t.metric_cols, t.cf, run_dir / "results.csv")
    figure_dir = run_dir / "figures"
    if figures:
        write_case_figures(run, t.cases, t.cf, figure_dir, **overlay.kwargs())
    present = {p.name for p in figure_dir.glob("*.png")} if figure_dir.is_dir() else set()
    notes: list[str] = []
    if run.spec.get("data", {}).get("read", {}).get("slice_index", "middle") is None:   # volumes: slice viewers
        from .report_volumes import volume_case_limit
        single_file_max = min(single_file_max, volume_case_limit(run.spec.get("model", {}).get("input_size")))
    paged = len(t.cases) > single_file_max
    case_href = (lambda pos: f"gallery/page-{pos // page_size + 1:05d}.html#{anchor(pos)}") if paged \
        else (lambda pos: f"#{anchor(pos)}")
    context = run_context(run, t, overlay=overlay, case_href=case_href, notes=notes,
                          files=["results.csv"], n_figures=0)
    ctx = CaseContext(classes=context["classes"], prob_columns=rd.prob_columns(t.cases),
                      value_range=context["model"]["value_range"], clip_percentile=overlay.clip_percentile,
                      cmap=overlay.cmap, absolute=overlay.absolute,
                      metric_order=t.metric_order, sanity=context.pop("sanity"), cf_extra=t.cf_extra, figures=present,
                      multilabel=run.multilabel, recommend=context.pop("recommend"))
    context["n_figures"] = sum(figure_name(p) in present for p in t.cases["path"]) if present else 0
    context.update(page_assets(overlay))
    path = Path(out) if out else run_dir / "report.html"
    _record_display(run_dir, run.spec, overlay)
    if paged:
        return write_paged(run, t, ctx, context, run_dir=run_dir, redirect=path, page_size=page_size,
                           single_file_max=single_file_max)
    pages = (views for _, views in case_pages(run, t.cases, t.pairs, t.cf, ctx, page_size))
    render_to(path, "report.html", {**context, "pages": pages, "page_size": page_size})
    if path.resolve() == (run_dir / "report.html").resolve():      # the one-file report replaces a folder one
        remove_paged(run_dir / "report")
    return path
