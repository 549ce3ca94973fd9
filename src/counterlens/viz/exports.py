"""Exports next to the report, ready for a paper, read through :func:`~counterlens.runs.store.open_run`.

* ``RUN/results.csv``: one row per case x method (prediction, time, every metric) and one row
  per counterfactual (target, validity, distances, plausibility), plus one row per case with
  neither (e.g. a file that failed to load). The case is named by ``path`` (relative to the data
  root: its identity in the run) and ``file`` (as read). Text cells that a spreadsheet would run
  as a formula (starting with ``= + - @``, tab or carriage return) get a leading ``'``.
* ``RUN/figures/<name>_<hash>.png``: one figure per case: the image and one overlay per method
  with its colour bar (:func:`counterlens.viz.plots.case_figure`), and below it each
  counterfactual (:func:`counterlens.viz.counterfactual_plots.counterfactual_figure`).
  Matplotlib draws them, about 0.3 s per case here, so the report writes them only when asked.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from PIL import Image

from .report_data import class_names

BASE_COLUMNS = ["row_type", "path", "file", "label", "prediction", "probability", "correct", "status", "error",
                "method", "target", "seconds"]
CF_COLUMNS = ["cf_target", "cf_valid", "cf_reason", "cf_p_target_before", "cf_p_target_after", "l0", "l1", "l2",
              "linf", "lam", "iterations", "cf_seconds", "nearest_train_distance", "im1"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _defused(column: pd.Series) -> pd.Series:
    """Text cells a spreadsheet would run as a formula, with a leading ``'``."""
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return column
    text = column.map(lambda v: isinstance(v, str)).astype(bool)
    risky = text & column.where(text, "").astype(str).str.startswith(_FORMULA_START)
    return column.astype(object).where(~risky, "'" + column.where(risky, "").astype(str))


def write_results_csv(cases: pd.DataFrame, pairs: pd.DataFrame, metric_cols: list[str],
                      cf: pd.DataFrame | None, path: Path) -> Path:
    """``results.csv`` (see the module docstring) from the report's case, case x method and
    counterfactual tables (:mod:`.report_data`); written through a temporary file."""
    renamed = {m: (f"metric_{m}" if m in BASE_COLUMNS + CF_COLUMNS else m) for m in metric_cols}
    header = BASE_COLUMNS + [renamed[m] for m in metric_cols] + CF_COLUMNS
    correct = cases["outcome"].map({"correct": 1, "incorrect": 0}).astype("Int64")
    base = pd.DataFrame({"pos": cases["pos"], "path": cases["path"], "file": cases["file"], "label": cases["label"],
                         "prediction": cases["prediction"], "probability": cases["probability"], "correct": correct,
                         "status": cases["status"], "error": cases["error"]})
    parts = []
    if len(pairs):
        att = pairs[["pos", "method", "target", "seconds", *metric_cols]].rename(columns=renamed)
        parts.append(base.merge(att, on="pos").assign(row_type="attribution", _kind=0))
    if cf is not None and len(cf):
        before = [list(v or []) for v in cf["probs_before"]]
        after = [list(v or []) for v in cf["probs_after"]]
        t = cf["target"].astype(int).tolist()
        rows = pd.DataFrame({
            "pos": cf["pos"], "cf_target": [n if isinstance(n, str) and n else str(i) for n, i in zip(cf["target_name"], t)],
            "cf_valid": cf["valid"].astype(int), "cf_reason": cf["reason"],
            "cf_p_target_before": [b[i] if 0 <= i < len(b) else np.nan for b, i in zip(before, t)],
            "cf_p_target_after": [a[i] if 0 <= i < len(a) else np.nan for a, i in zip(after, t)],
            "cf_seconds": cf["seconds"],
            **{k: cf[k] for k in ("l0", "l1", "l2", "linf", "lam", "iterations", "nearest_train_distance", "im1")
               if k in cf}})
        parts.append(base.merge(rows, on="pos").assign(row_type="counterfactual", _kind=1))
    covered = set().union(*(set(p["pos"]) for p in parts)) if parts else set()
    alone = base[~base["pos"].isin(covered)]
    parts.append(alone.assign(row_type="image", _kind=-1))
    table = pd.concat(parts, ignore_index=True, sort=False)
    table = table.sort_values(["pos", "_kind"], kind="stable")
    table = table.reindex(columns=header)
    for col in ("correct", "target", "cf_valid", "iterations"):     # integers, blank where not applicable
        table[col] = pd.to_numeric(table[col]).round().astype("Int64")
    for col in table.columns:
        table[col] = _defused(table[col])
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False, lineterminator="\r\n")
    os.replace(tmp, path)
    return path


def figure_name(path: str) -> str:
    """``glioma_x_1a2b3c4d.png`` for the case ``glioma/x.png``: readable (the path made
    filename-safe, at most 80 characters) and unique (a hash of the whole path)."""
    without_suffix = re.sub(r"\.[^./]*$", "", str(path))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", without_suffix).strip("._-")[:80]
    digest = hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{stem or 'case'}_{digest}.png"


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


def _cf_result(xs, origs, cfs: list[dict]) -> SimpleNamespace:
    import torch
    return SimpleNamespace(
        x=torch.from_numpy(np.stack(xs)), x_orig=torch.from_numpy(np.stack(origs)),
        target=torch.tensor([int(c["target"]) for c in cfs]), valid=torch.tensor([bool(c["valid"]) for c in cfs]),
        probs_before=torch.tensor([list(c["probs_before"]) for c in cfs]),
        probs_after=torch.tensor([list(c["probs_after"]) for c in cfs]),
        reason=[mpl_text(c["reason"] or "") for c in cfs],
        distance={k: torch.tensor([float(c[k]) for c in cfs]) for k in ("l0", "l1", "l2", "linf")
                  if all(c.get(k) is not None and not pd.isna(c.get(k)) for c in cfs)})


def write_case_figures(run, cases: pd.DataFrame, cf: pd.DataFrame | None, out_dir: Path, *,
                       clip_percentile: float = 0.5, dpi: int = 110, cmap: str | None = None, alpha: float = 0.75,
                       absolute: bool = False) -> dict[str, str]:
    """One PNG per explained case under ``out_dir``; returns ``{case path: file name}``.
    ``cmap``, ``alpha``, ``absolute``, ``clip_percentile``: how maps are drawn (:class:`~.plots.OverlayStyle`)."""
    from .counterfactual_plots import counterfactual_figure
    from .plots import OverlayStyle, case_figure, figure_png

    style = OverlayStyle(cmap, alpha, absolute, clip_percentile)

    classes = run.classes
    value_range = (run.spec.get("model") or {}).get("value_range")
    cf_rows: dict[str, list[dict]] = {}
    for r in (cf.to_dict("records") if cf is not None else []):
        cf_rows.setdefault(r["path"], []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for row in cases.to_dict("records"):
        if row["status"] != "done":
            continue
        arrays = run.case_arrays(row["path"])
        image, maps = arrays["image"], {m: arrays["maps"][m] for m in run.methods if m in arrays["maps"]}
        if run.multilabel:                   # every finding explained: "gradcam (effusion)"
            maps = {f"{m} ({classes[t] if 0 <= t < len(classes) else t})": a
                    for (m, t), a in arrays["target_maps"].items()}
        cfs = [c for c in cf_rows.get(row["path"], []) if int(c["target"]) in arrays["counterfactuals"]]
        if image is None or (not maps and not cfs):
            continue
        pngs = []
        case = mpl_text(row["path"])
        if maps:
            fig = case_figure(image, maps, title="image", value_range=value_range, **style.kwargs())
            p = row["probability"]
            fig.suptitle(f"{case}: label {mpl_text(row['label'] if isinstance(row['label'], str) else 'unknown')}, "
                         f"prediction {mpl_text(row['prediction'])}" + ("" if pd.isna(p) else f" ({p:.2f})") +
                         f"\ncolour scales: {style.description()}", fontsize=9)
            fig.tight_layout(rect=(0, 0, 1, 0.93))
            pngs.append(figure_png(fig, dpi=dpi))
        for c in cfs:
            result = _cf_result([arrays["counterfactuals"][int(c["target"])]], [image], [c])
            names = [mpl_text(n) for n in class_names(classes, len(c["probs_before"]))]
            fig = counterfactual_figure(result, 0, names, value_range)
            title = fig.get_suptitle()
            if title.startswith("case 0:"):           # name the case instead of its row in a batch of one
                fig.suptitle(f"{case}:" + title[len("case 0:"):], fontsize=9)
            pngs.append(figure_png(fig, dpi=dpi))
        name = figure_name(row["path"])
        tmp = out_dir / (name + ".tmp")
        _stack_png(pngs).save(tmp, format="PNG")
        os.replace(tmp, out_dir / name)
        written[row["path"]] = name
    return written


def counterfactual_grid_png(run, cf: pd.DataFrame | None, max_rows: int = 8) -> tuple[bytes, list[str]] | None:
    """The first ``max_rows`` counterfactuals of the run in one grid figure (original,
    counterfactual, signed difference per row) and the case path of each row; None when the run
    has none."""
    from .counterfactual_plots import counterfactual_grid
    from .plots import figure_png

    if cf is None:
        return None
    rows, xs, origs = [], [], []
    for c in cf.to_dict("records"):
        arrays = run.case_arrays(c["path"])
        x = arrays["counterfactuals"].get(int(c["target"]))
        if x is None or arrays["image"] is None:
            continue
        if xs and (x.shape != xs[0].shape or arrays["image"].shape != xs[0].shape):
            continue                                   # mixed sizes cannot share a grid: keep the first size
        rows.append(c)
        xs.append(x)
        origs.append(arrays["image"])
        if len(rows) == max_rows:
            break
    if not rows:
        return None
    names = [mpl_text(n) for n in class_names(run.classes, len(rows[0]["probs_before"]))]
    png = figure_png(counterfactual_grid(_cf_result(xs, origs, rows), names, max_rows=max_rows,
                                         value_range=(run.spec.get("model") or {}).get("value_range")))
    return png, [r["path"] for r in rows]
