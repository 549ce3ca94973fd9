"""What the report shows for each case, built page by page, and the cases to look at first.

:func:`case_pages` walks the cases in gallery order (``run.cases`` order) a page at a time and
builds each case's view: its image and one transparent map per method as small PNG data URIs,
badges, metrics, probabilities and counterfactuals. Only one page of PNGs is in memory at a
time, and each case costs the same whatever the size of the run (arrays come from
``Run.case_arrays``; the rows of a page are a slice of tables sorted by case position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .exports import figure_name
from .report_data import (
    CF_EXTRA_LABELS,
    METRIC_HINTS,
    OUTCOME_TEXT,
    ROOM_MIN,
    activation_view,
    class_names,
    faithfulness_badge,
    fmt,
    number,
    sanity_badge,
)
from .report_images import data_uri, difference_png, grey_png, map_png, scale_labels
from .report_verdict import mark_recommended

LOOK_FIRST = 25        # cases per "look first" list
THUMB = 256            # the largest side of an image in the report (shown 200 px wide); larger ones are shrunk


@dataclass
class CaseContext:
    """What every case view needs from the run as a whole."""

    classes: list[str]
    prob_columns: list[str]
    value_range: tuple | None
    clip_percentile: float
    metric_order: list[str]
    sanity: dict = field(default_factory=dict)
    cf_extra: list[str] = field(default_factory=list)
    figures: set = field(default_factory=set)            # names of the case figures in RUN/figures/
    multilabel: bool = False                             # classes are findings, each with its own sigmoid
    recommend: tuple = ((), "")                          # (methods best first, why): see report_verdict
    cmap: str | None = None                              # colour map of the maps (None: by sign), see OverlayStyle
    absolute: bool = False                               # maps shown as |map|


def anchor(pos: int) -> str:
    """The HTML id of the case at (0-based) position ``pos``."""
    return f"case-{pos + 1}"


class Records:
    """The rows of a table sorted by case position ``pos``, as dicts, a range of cases at a time
    (``DataFrame.to_dict`` costs about 2 ms a call; this, a few microseconds a row)."""

    def __init__(self, frame: pd.DataFrame | None):
        frame = frame if frame is not None else pd.DataFrame({"pos": []})
        self.columns = list(frame.columns)
        self.arrays = [frame[c].to_numpy() for c in self.columns]
        self.pos = frame["pos"].to_numpy()

    def rows(self, lo: int, hi: int) -> list[dict]:
        """The rows of the cases at positions ``lo <= pos < hi``."""
        a, b = np.searchsorted(self.pos, [lo, hi])
        return [dict(zip(self.columns, values)) for values in zip(*(arr[a:b].tolist() for arr in self.arrays))]

    def by_pos(self, lo: int, hi: int) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for r in self.rows(lo, hi):
            out.setdefault(int(r["pos"]), []).append(r)
        return out


def case_pages(run, cases: pd.DataFrame, pairs: pd.DataFrame, cf: pd.DataFrame | None, ctx: CaseContext,
               page_size: int):
    """Yield ``(page number from 1, [case view])`` for every page of ``page_size`` cases."""
    case_rows, pair_rows, cf_rows = Records(cases), Records(pairs), Records(cf)
    for number_, lo in enumerate(range(0, len(cases), page_size), start=1):
        hi = min(lo + page_size, len(cases))
        pairs_at, cfs_at = pair_rows.by_pos(lo, hi), cf_rows.by_pos(lo, hi)
        views = []
        for row in case_rows.rows(lo, hi):
            pos = int(row["pos"])
            arrays = run.case_arrays(row["path"]) if row["status"] == "done" else None
            views.append(build_case(row, arrays, pairs_at.get(pos, []), cfs_at.get(pos, []), ctx))
        yield number_, views


def build_case(row: dict, arrays: dict | None, pair_rows: list[dict], cf_rows: list[dict], ctx: CaseContext) -> dict:
    """Everything the gallery shows for one case (``row``: a row of the case table)."""
    pos = int(row["pos"])
    case = {"index": pos + 1, "anchor": anchor(pos), "path": row["path"], "label_name": _text(row["label"]),
            "prediction_name": _text(row["prediction"]), "outcome": row["outcome"],
            "outcome_text": OUTCOME_TEXT[row["outcome"]], "error": None, "overlays": [], "counterfactuals": [],
            "probs": [], "confidence": number(row["probability"]), "image_uri": None, "note": None,
            "figure": None, "volume": None, "recommend": None}
    name = figure_name(row["path"])
    case["figure"] = name if name in ctx.figures else None
    if row["status"] != "done":
        case["error"] = _text(row["error"]) or "failed"
        return case
    probs = [(col[len("prob_"):], number(row[col])) for col in ctx.prob_columns]
    case["probs"] = [{"name": n, "value": v} for n, v in probs if v is not None]
    names = [n for n, _ in probs] or list(ctx.classes)
    arrays = arrays or {"image": None, "maps": {}, "counterfactuals": {}}
    image = arrays["image"]
    if image is not None:
        case["image_uri"] = data_uri(grey_png(image, ctx.value_range, THUMB))
    by_target = arrays.get("target_maps") or {}
    volume_maps = {}                                    # what the slice viewer of a volume shows
    for pair in pair_rows:
        method = pair["method"]
        # the map of this row's target (multi-label: one per finding explained), else the method's one map
        amap = by_target.get((method, int(pair["target"]))) if number(pair.get("target")) is not None else None
        amap = amap if amap is not None else arrays["maps"].get(method)
        if amap is None:
            continue
        several = sum(p["method"] == method for p in pair_rows) > 1     # multi-label: one map per finding
        volume_maps[f"{method}: {pair.get('target_name')}" if several else method] = amap
        png, scale = map_png(amap, ctx.clip_percentile, THUMB, cmap=ctx.cmap, absolute=ctx.absolute)
        room = number(pair.get("insertion_room"))
        if case["note"] is None and room is not None and room < ROOM_MIN:
            case["note"] = ("Insertion cannot separate the maps of this image: the baseline insertion starts from "
                            "already gives the target class nearly as much probability as the image, or more "
                            f"(insertion_room {room:.2f}); read deletion here.")
        badges = [b for b in (sanity_badge(ctx.sanity.get(method)), faithfulness_badge(pair)) if b]
        case["overlays"].append({
            "method": method, "map_uri": data_uri(png), "signed": scale["signed"],
            "target": _text(pair.get("target_name")) or "?",
            "labels": scale_labels(scale["vmin"], scale["vmax"], scale["signed"]), "badges": badges,
            "metrics": [{"name": m, "value": fmt(pair[m]), "hint": METRIC_HINTS.get(m, "")}
                        for m in ctx.metric_order if number(pair.get(m)) is not None]})
    mark_recommended(case, list(ctx.recommend[0]), ctx.recommend[1])
    if ctx.multilabel and not case["overlays"] and pair_rows == [] and row["prediction"] == "none":
        case["note"] = "No finding reaches the probability that counts as present: no finding to explain."
    if image is not None and image.ndim == 4:         # a volume: the slice viewer (axial, coronal, sagittal)
        from .report_volumes import shown_spacing, volume_view
        case["volume"] = volume_view(image, volume_maps, ctx.value_range, ctx.clip_percentile,
                                     spacing=shown_spacing(row.get("file"), image.shape[1:]), cmap=ctx.cmap,
                                     absolute=ctx.absolute)
    if image is not None:
        for cf in cf_rows:
            x = arrays["counterfactuals"].get(int(cf["target"]))
            if x is not None:
                layers = (arrays.get("activations") or {}).get(int(cf["target"]))
                case["counterfactuals"].append(counterfactual_view(image, x, cf, names, ctx, layers))
    return case


def _text(value) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def counterfactual_view(image: np.ndarray, x: np.ndarray, cf: dict, names: list[str], ctx: CaseContext,
                        layers: dict | None = None) -> dict:
    """One stored counterfactual: original and counterfactual on one grey scale, the signed
    difference, the probabilities before and after, distances, (when stored) plausibility and the
    layer activation change (``layers``: the case's :meth:`~counterlens.runs.store.Run.activation_record`)."""
    if ctx.value_range is not None:
        lo, hi = (float(v) for v in ctx.value_range)
    else:
        lo, hi = float(min(image.min(), x.min())), float(max(image.max(), x.max()))
        hi = hi if hi > lo else lo + 1.0
    diff_png, vmax = difference_png((x - image).sum(axis=0), THUMB)
    before = list(cf["probs_before"] or [])
    after = list(cf["probs_after"] or [])
    names = class_names(names, len(before))
    target = int(cf["target"])
    extra = [{"name": k, "label": CF_EXTRA_LABELS.get(k, k), "value": fmt(cf[k])}
             for k in ctx.cf_extra if number(cf.get(k)) is not None]
    view = {}
    if ctx.multilabel and 0 <= target < len(before) and len(after) == len(before):
        # a finding switched off or on: its own probability before and after (the others are in the table)
        view = {"before_name": names[target], "before_p": float(before[target]), "after_name": names[target],
                "after_p": float(after[target]), "column": "finding"}
    return {
        "target": _text(cf.get("target_name")) or (names[target] if 0 <= target < len(names) else str(target)),
        "valid": bool(cf["valid"]), "reason": _text(cf.get("reason")) or "",
        "orig_uri": data_uri(grey_png(image, (lo, hi), THUMB)), "cf_uri": data_uri(grey_png(x, (lo, hi), THUMB)),
        "diff_uri": data_uri(diff_png), "diff_labels": scale_labels(-vmax, vmax, True),
        "before_name": names[int(np.argmax(before))] if before else "?",
        "before_p": float(max(before)) if before else None,
        "after_name": names[int(np.argmax(after))] if after else "?", "after_p": float(max(after)) if after else None,
        "probs": [{"name": n, "before": float(b), "after": float(a), "target": i == target}
                  for i, (n, b, a) in enumerate(zip(names, before, after))],
        "distances": [{"name": k.upper() if k != "linf" else "L\u221e", "value": fmt(cf.get(k))}
                      for k in ("l0", "l1", "l2", "linf") if number(cf.get(k)) is not None],
        "extra": extra, "column": "class", "layers": activation_view(layers), **view}


# -- what to look at first -------------------------------------------------------------------------
def look_first(cases: pd.DataFrame, pairs: pd.DataFrame, limit: int = LOOK_FIRST) -> list[dict]:
    """Short lists of the cases a reviewer should open first: misclassified (most confident
    first), least confident, lowest faithfulness (insertion - deletion AUC, or MuFidelity), most
    attribution mass outside the mask (1 - relevance_mass). Each ``{"key", "title", "note",
    "value_name", "total", "rows": [{"pos", "path", "label", "prediction", "confidence", "method",
    "value"}]}``; lists with no case are left out."""
    lists = []

    def rows_of(frame: pd.DataFrame, value_col: str | None = None) -> list[dict]:
        out = []
        for r in frame.to_dict("records"):
            out.append({"pos": int(r["pos"]), "anchor": anchor(int(r["pos"])), "path": r["path"],
                        "label": _text(r.get("label")), "prediction": _text(r.get("prediction")),
                        "confidence": number(r.get("probability")), "method": _text(r.get("method")),
                        "value": fmt(r[value_col]) if value_col else None})
        return out

    wrong = cases[cases["outcome"] == "incorrect"]
    if len(wrong):
        top = wrong.sort_values(["probability", "pos"], ascending=[False, True], kind="stable").head(limit)
        lists.append({"key": "misclassified", "title": "Misclassified", "total": len(wrong), "value_name": None,
                      "note": "label and prediction differ; the most confident mistakes first", "rows": rows_of(top)})
    done = cases[(cases["status"] == "done") & cases["probability"].notna()]
    if len(done):
        top = done.sort_values(["probability", "pos"], kind="stable").head(limit)
        lists.append({"key": "least-confident", "title": "Least confident", "total": len(done), "value_name": None,
                      "note": "the lowest probability of the predicted class", "rows": rows_of(top)})
    if len(pairs):
        info = cases[["pos", "label", "prediction", "probability"]]
        faith = faithfulness_values(pairs)
        if faith.notna().any():
            scored = pairs[["pos", "path", "method"]].assign(faith=faith).dropna(subset=["faith"])
            top = scored.sort_values(["faith", "pos"], kind="stable").head(limit).merge(info, on="pos", how="left")
            lists.append({"key": "low-faithfulness", "title": "Lowest faithfulness", "total": len(scored),
                          "value_name": "faithfulness",
                          "note": "insertion AUC - deletion AUC of a case's map (MuFidelity where insertion cannot "
                                  "separate maps or there are no curves); 0 or below: the map is no better than its "
                                  "reverse", "rows": rows_of(top, "faith")})
        if "relevance_mass" in pairs and pairs["relevance_mass"].notna().any():
            scored = pairs[["pos", "path", "method"]].assign(outside=1 - pairs["relevance_mass"]).dropna(subset=["outside"])
            top = scored.sort_values(["outside", "pos"], ascending=[False, True], kind="stable").head(limit)
            lists.append({"key": "outside-mask", "title": "Most attribution outside the mask",
                          "total": len(scored), "value_name": "outside the mask",
                          "note": "share of positive attribution outside the ground-truth mask (1 - relevance_mass; cases "
                                  "with a mask)",
                          "rows": rows_of(top.merge(info, on="pos", how="left"), "outside")})
    return lists


def faithfulness_values(pairs: pd.DataFrame) -> pd.Series:
    """:func:`~counterlens.viz.report_data.faithfulness` of every row at once (NaN where unknown)."""
    def col(name):
        return pairs[name].astype(float) if name in pairs else pd.Series(np.nan, index=pairs.index)
    ins, dele, room, mu = col("insertion_auc"), col("deletion_auc"), col("insertion_room"), col("mufidelity")
    curves = ins.notna() & dele.notna() & (room.isna() | (room >= ROOM_MIN))
    return (ins - dele).where(curves, mu)
