"""What the HTML report shows, read from a run directory into plain dicts for the template.

Optional inputs are read when present and left out when absent (the report then has no section
for them): the ``metrics`` table of ``results.sqlite``, ``curves.json``, ``sanity.json``,
``audit.json``, ``metrics_summary.csv`` and the ``nearest_train_distance`` / ``im1`` columns of
the ``counterfactuals`` table. A file that cannot be parsed becomes a note in the report instead
of stopping it.
"""
from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path

import numpy as np

from ..runs.store import RunStore
from .report_images import data_uri, difference_png, grey_png, map_png, scale_labels

METRIC_ORDER = ("deletion_auc", "insertion_auc", "mufidelity", "pointing_game", "relevance_mass", "relevance_rank",
                "mass_lift", "sparseness", "entropy", "ig_completeness_error")
CASE_METRICS = ("insertion_room",)   # properties of the image, the same for every method: shown per case
ROOM_MIN = 0.1                        # insertion_room below this: insertion AUC does not separate maps
METRIC_HINTS = {
    "deletion_auc": "area under the deletion curve (most relevant pixels removed first); lower is better",
    "insertion_auc": "area under the insertion curve (most relevant pixels inserted first); higher is better",
    "insertion_room": "target score of the image minus that of the baseline insertion starts from; near 0: the "
                      "baseline alone already gives the class (e.g. a class defined by absence, such as no tumour), "
                      "so insertion_auc cannot tell the maps apart there",
    "mufidelity": "correlation between attribution mass and output drop over random pixel subsets; higher is better",
    "pointing_game": "1 when the map's maximum lies in the ground-truth mask",
    "relevance_mass": "share of positive attribution inside the mask; higher is better",
    "relevance_rank": "share of the mask's pixels among the top-ranked pixels; higher is better",
    "mass_lift": "relevance mass divided by the mask's share of the image; above 1 means concentrated in the mask",
    "sparseness": "Gini index of |map|; higher means a more concentrated map",
    "entropy": "entropy of the normalised |map|; lower means a more concentrated map",
    "ig_completeness_error": "|sum of the map - (f(x) - f(baseline))| for integrated gradients; lower is better",
}
CF_EXTRA = ("nearest_train_distance", "im1")
CF_EXTRA_LABELS = {"nearest_train_distance": "distance to the nearest training image of the target class",
                   "im1": "IM1 (autoencoder plausibility; lower is more plausible)"}


def fmt(value, digits: int = 3) -> str:
    """A number for the report: ``digits`` significant figures, ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if math.isnan(v) else f"{v:.{digits}g}"


def read_json(run_dir: Path, name: str, notes: list[str]):
    """``RUN/name`` parsed, or None when absent or unreadable (then a note says why)."""
    path = Path(run_dir) / name
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{name} could not be read ({exc}); its section is left out")
        return None
    if not isinstance(data, dict):
        notes.append(f"{name} does not hold a JSON object; its section is left out")
        return None
    return data


def read_metrics(store: RunStore) -> dict[tuple[int, str], dict[str, float]]:
    """``{(image_id, method): {metric: value}}`` from the ``metrics`` table ({} when there is none)."""
    if not _has_table(store.db, "metrics"):
        return {}
    out: dict[tuple[int, str], dict[str, float]] = {}
    for r in store.db.execute("SELECT image_id, method, metric, value FROM metrics ORDER BY image_id, method"):
        out.setdefault((int(r["image_id"]), str(r["method"])), {})[str(r["metric"])] = \
            None if r["value"] is None else float(r["value"])
    return out


def metric_names(metrics: dict, *, case_metrics: bool = False) -> list[str]:
    """Metrics present, in display order; case-level ones (insertion_room, the same for every
    method) only with ``case_metrics``."""
    present = {m for values in metrics.values() for m in values}
    names = present - set(CASE_METRICS)
    out = [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))
    return out + [m for m in CASE_METRICS if m in present] if case_metrics else out


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def class_names(classes, n: int) -> list[str]:
    classes = [str(c) for c in (classes or [])]
    return classes if len(classes) == n else [classes[i] if i < len(classes) else str(i) for i in range(n)]


# -- per case ---------------------------------------------------------------------------------------
def faithfulness_badge(values: dict) -> dict | None:
    """A badge from insertion - deletion AUC (or MuFidelity when there are no curves, or when the
    insertion baseline alone already gives the class: insertion_room below ROOM_MIN)."""
    ins, dele, room = values.get("insertion_auc"), values.get("deletion_auc"), values.get("insertion_room")
    roomy = room is None or math.isnan(room) or room >= ROOM_MIN
    if ins is not None and dele is not None and not (math.isnan(ins) or math.isnan(dele)) and roomy:
        d = ins - dele
        return {"good": d > 0, "text": f"faithfulness {d:+.2f}",
                "title": "insertion AUC - deletion AUC: above 0 when the pixels the map ranks first matter "
                         "more to the model than the others; 0 or below: the map is no better than its reverse"}
    mu = values.get("mufidelity")
    if mu is not None and not math.isnan(mu):
        return {"good": mu > 0, "text": f"MuFidelity {mu:+.2f}",
                "title": "correlation of attribution mass and output drop; above 0: the map tracks the model"}
    return None


def sanity_badge(entry) -> dict | None:
    if not isinstance(entry, dict) or entry.get("passed") is None:
        return None
    passed = bool(entry["passed"])
    return {"good": passed, "text": "sanity check passed" if passed else "sanity check failed",
            "title": "model-parameter randomisation test: a method passes when its maps change as the "
                     "model's weights are randomised (similarity below the threshold)"}


def build_case(store: RunStore, row: dict, *, classes, value_range, clip_percentile: float, metrics: dict,
               metric_order: list[str], sanity: dict, cf_extra: list[str]) -> dict:
    """Everything the gallery shows for one image."""
    case = {"id": int(row["id"]), "name": row["name"], "label_name": row["label_name"],
            "prediction_name": row["prediction_name"], "error": None, "overlays": [], "counterfactuals": [],
            "probs": [], "confidence": None, "image_uri": None, "figure": None, "note": None}
    if row["status"] != "done":
        case.update(outcome="failed", outcome_text="failed", error=row["error"] or "failed")
        return case
    correct = None if row["label"] is None or row["prediction"] is None else row["label"] == row["prediction"]
    case["outcome"] = {None: "unknown", True: "correct", False: "incorrect"}[correct]
    case["outcome_text"] = {None: "no label", True: "correct", False: "incorrect"}[correct]
    case["confidence"] = row["probability"]
    probs = json.loads(row["probs"]) if row["probs"] else []
    names = class_names(classes, len(probs))
    case["probs"] = [{"name": c, "value": float(p)} for c, p in zip(names, probs)]
    image = store.load_array(row["image_file"])
    if image is not None:
        case["image_uri"] = data_uri(grey_png(image, value_range))
    for method, att in store.attributions(row["id"]).items():
        png, scale = map_png(store.load_array(att["array_file"]), clip_percentile)
        values = metrics.get((case["id"], method), {})
        room = values.get("insertion_room")
        if case["note"] is None and room is not None and not math.isnan(room) and room < ROOM_MIN:
            case["note"] = ("Insertion cannot separate the maps of this image: the baseline insertion starts from "
                            "already gives the target class nearly as much probability as the image, or more "
                            f"(insertion_room {room:.2f}); read deletion here.")
        badges = [b for b in (sanity_badge(sanity.get(method)), faithfulness_badge(values)) if b]
        target = att["target"]
        case["overlays"].append({
            "method": method, "map_uri": data_uri(png), "signed": scale["signed"],
            "target": names[target] if 0 <= target < len(names) else str(target),
            "labels": scale_labels(scale["vmin"], scale["vmax"], scale["signed"]), "badges": badges,
            "metrics": [{"name": m, "value": fmt(values[m]), "hint": METRIC_HINTS.get(m, "")}
                        for m in metric_order if m in values]})
    if image is not None:
        for cf in store.counterfactuals(row["id"]):
            case["counterfactuals"].append(counterfactual_view(store, image, cf, names, value_range, cf_extra))
    return case


def counterfactual_view(store: RunStore, image: np.ndarray, cf: dict, names: list[str], value_range,
                        cf_extra: list[str]) -> dict:
    """One stored counterfactual: original and counterfactual on one grey scale, the signed
    difference, the probabilities before and after, distances and (when stored) plausibility."""
    x = store.load_array(cf["array_file"])
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
    else:
        lo, hi = float(min(image.min(), x.min())), float(max(image.max(), x.max()))
        hi = hi if hi > lo else lo + 1.0
    diff_png, vmax = difference_png((x - image).sum(axis=0))
    before = json.loads(cf["probs_before"]) if cf["probs_before"] else []
    after = json.loads(cf["probs_after"]) if cf["probs_after"] else []
    names = class_names(names, len(before))
    target = int(cf["target"])
    extra = [{"name": k, "label": CF_EXTRA_LABELS.get(k, k), "value": fmt(cf[k])}
             for k in cf_extra if cf.get(k) is not None]
    return {
        "target": cf["target_name"] or (names[target] if 0 <= target < len(names) else str(target)),
        "valid": bool(cf["valid"]), "reason": cf["reason"] or "",
        "orig_uri": data_uri(grey_png(image, (lo, hi))), "cf_uri": data_uri(grey_png(x, (lo, hi))),
        "diff_uri": data_uri(diff_png), "diff_labels": scale_labels(-vmax, vmax, True),
        "before_name": names[int(np.argmax(before))] if before else "?",
        "before_p": float(max(before)) if before else None,
        "after_name": names[int(np.argmax(after))] if after else "?", "after_p": float(max(after)) if after else None,
        "probs": [{"name": n, "before": float(b), "after": float(a), "target": i == target}
                  for i, (n, b, a) in enumerate(zip(names, before, after))],
        "distances": [{"name": k.upper() if k != "linf" else "L\u221e", "value": fmt(cf.get(k))}
                      for k in ("l0", "l1", "l2", "linf") if cf.get(k) is not None],
        "extra": extra}


def counterfactual_columns(store: RunStore) -> list[str]:
    cols = {r["name"] for r in store.db.execute("PRAGMA table_info(counterfactuals)")}
    return [c for c in CF_EXTRA if c in cols]


# -- run level --------------------------------------------------------------------------------------
def confusion_matrix(rows: list[dict], classes: list[str]):
    labelled = [r for r in rows if r["label"] is not None and r["prediction"] is not None]
    if not labelled or not classes:
        return None
    n = len(classes)
    m = np.zeros((n, n), dtype=int)
    for r in labelled:
        if 0 <= r["label"] < n and 0 <= r["prediction"] < n:
            m[r["label"], r["prediction"]] += 1
    return m.tolist()


def method_table(methods_spec: dict, seconds: dict, metrics: dict, metric_order: list[str], sanity: dict) -> list[dict]:
    """One row per method: parameters, seconds per image, sanity verdict, mean metrics over images."""
    names = list(methods_spec) + [m for m in seconds if m not in methods_spec]
    names += sorted({m for (_, m) in metrics} - set(names))
    out = []
    for name in names:
        per_metric = []
        for metric in metric_order:
            vals = [v[metric] for (_, m), v in metrics.items() if m == name and v.get(metric) is not None]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
                per_metric.append({"mean": fmt(float(np.mean(vals))), "sd": fmt(sd, 2) if sd is not None else None,
                                   "n": len(vals)})
            else:
                per_metric.append(None)
        params = methods_spec.get(name) or {}
        out.append({"name": name, "params": ", ".join(f"{k}={v}" for k, v in params.items()),
                    "seconds": seconds.get(name), "sanity": sanity_badge(sanity.get(name)), "metrics": per_metric})
    return out


def sanity_rows(sanity: dict) -> list[dict]:
    rows = []
    for method, v in sanity.items():
        if not isinstance(v, dict):
            continue
        sim = [s for s in (v.get("similarity") or []) if s is not None]
        rows.append({"method": method, "badge": sanity_badge(v), "threshold": fmt(v.get("threshold")),
                     "final": fmt(sim[-1]) if sim else "-", "random_logit": fmt(v.get("random_logit")),
                     "layers": len(v.get("layers") or []), "measure": str(v.get("measure") or "")})
    return rows


AUDIT_KNOWN = ("relies_on_region", "region_flip_rate", "random_flip_rate", "verdict", "methods")


def audit_view(audit: dict) -> dict:
    """The shortcut audit: verdict, flip rates, per-method numbers and any further keys as text."""
    methods = audit.get("methods") if isinstance(audit.get("methods"), dict) else {}
    columns: list[str] = []
    for values in methods.values():
        for k in (values or {}) if isinstance(values, dict) else {}:
            if k not in columns:
                columns.append(k)
    rows = [{"method": m, "values": [fmt(v.get(k)) if isinstance(v, dict) else "-" for k in columns]}
            for m, v in methods.items()]
    extra = [{"key": k, "value": v if isinstance(v, str) else fmt(v) if isinstance(v, (int, float)) or v is None
              else json.dumps(v, ensure_ascii=False, default=str)}
             for k, v in audit.items() if k not in AUDIT_KNOWN]
    relies = audit.get("relies_on_region")
    return {"verdict": str(audit.get("verdict") or ""), "relies": None if relies is None else bool(relies),
            "region_flip_rate": fmt(audit.get("region_flip_rate")), "random_flip_rate": fmt(audit.get("random_flip_rate")),
            "has_rates": audit.get("region_flip_rate") is not None or audit.get("random_flip_rate") is not None,
            "columns": columns, "rows": rows, "extra": extra}


def read_csv_table(path: Path, notes: list[str], max_rows: int = 200) -> dict | None:
    """A CSV file as ``{"header": [...], "rows": [[...]], "more": n}`` (None when absent)."""
    if not path.exists():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        notes.append(f"{path.name} could not be read ({exc})")
        return None
    if not rows:
        return None
    body = rows[1:]
    return {"header": rows[0], "rows": body[:max_rows], "more": max(0, len(body) - max_rows)}


def counterfactual_summary(store: RunStore, cf_extra: list[str]) -> dict | None:
    rows = [dict(r) for r in store.db.execute("SELECT * FROM counterfactuals")]
    if not rows:
        return None
    valid = [r for r in rows if r["valid"]]

    def mean(key, among):
        vals = [r[key] for r in among if r.get(key) is not None]
        return fmt(float(np.mean(vals))) if vals else None

    stats = [{"label": "Mean L1 of the valid ones", "value": mean("l1", valid)},
             {"label": "Mean L2 of the valid ones", "value": mean("l2", valid)}]
    stats += [{"label": f"Mean {CF_EXTRA_LABELS[k]}", "value": mean(k, rows)} for k in cf_extra]
    return {"n": len(rows), "valid": len(valid), "stats": [s for s in stats if s["value"] is not None]}
