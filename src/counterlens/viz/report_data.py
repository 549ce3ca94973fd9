"""What the report shows about a whole run, read through :func:`counterlens.runs.store.open_run`
into plain values for the templates: summary counts, confusion matrix, the method table, metric
tables per class and per outcome, the sanity, audit and counterfactual panels.

Optional inputs are shown when the run has them and left out when not (the report then has no
section for them): metrics (``Run.metrics``), ``curves.json``, ``sanity.json``, ``audit.json``
(``Run.json_file``), counterfactuals and their plausibility columns. A JSON file that cannot be
parsed becomes a note in the report instead of stopping it.

Everything here works on whole columns (pandas), so it costs about the same per case for 100
cases as for 100,000.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

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
OUTCOMES = ("correct", "incorrect", "unknown", "failed")
OUTCOME_TEXT = {"correct": "correct", "incorrect": "incorrect", "unknown": "no label", "failed": "failed"}


def fmt(value, digits: int = 3) -> str:
    """A number for the report: ``digits`` significant figures, ``-`` for missing."""
    if value is None or value is pd.NA:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if math.isnan(v) else f"{v:.{digits}g}"


def number(value) -> float | None:
    """A float, or None for missing and NaN."""
    if value is None or value is pd.NA:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def read_json(run, name: str, notes: list[str]):
    """``run.json_file(name)``, or None when absent or unreadable (then a note says why)."""
    try:
        data = run.json_file(name)
    except (OSError, ValueError) as exc:
        notes.append(f"{name} could not be read ({exc}); its section is left out")
        return None
    if data is not None and not isinstance(data, dict):
        notes.append(f"{name} does not hold a JSON object; its section is left out")
        return None
    return data


def class_names(classes, n: int) -> list[str]:
    classes = [str(c) for c in (classes or [])]
    return classes if len(classes) == n else [classes[i] if i < len(classes) else str(i) for i in range(n)]


# -- the tables of a run, as the report uses them --------------------------------------------------
def case_table(run) -> pd.DataFrame:
    """``run.cases`` with ``pos`` (0-based position: the gallery order), ``outcome`` (correct,
    incorrect, unknown (no label), failed) and ``probs`` (the ``prob_<class>`` column names)."""
    cases = run.cases.copy()
    cases["pos"] = np.arange(len(cases))
    done = (cases["status"] == "done").to_numpy()
    li, pi = cases["label_index"], cases["prediction_index"]
    labelled = (li.notna() & pi.notna()).to_numpy()
    correct = (li == pi).fillna(False).to_numpy(dtype=bool)
    if run.multilabel:           # labels and predictions are sets of findings (named in label / prediction)
        labelled = cases["label"].notna().to_numpy() & cases["prediction"].notna().to_numpy()
        correct = (cases["label"] == cases["prediction"]).fillna(False).to_numpy(dtype=bool)
    cases["outcome"] = np.where(~done, "failed", np.where(~labelled, "unknown",
                                                          np.where(correct, "correct", "incorrect")))
    return cases


def prob_columns(cases: pd.DataFrame) -> list[str]:
    """The ``prob_<class>`` columns in class order (between ``probability`` and ``status``)."""
    cols = list(cases.columns)
    return cols[cols.index("probability") + 1:cols.index("status")]


def pair_table(run, cases: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per case and method that has a map or metrics: ``pos, path, method, target,
    target_name, seconds`` and one column per metric; sorted by case position, then method in
    ``run.methods`` order. Also returns the metric names present, in display order."""
    att = run.attributions
    metrics = run.metrics
    if metrics is not None and len(metrics):
        keys = ["path", "method", "target"] if "target" in metrics else ["path", "method"]   # multi-label: per finding
        wide = metrics.pivot(index=keys, columns="metric", values="value")
        wide.columns = [str(c) for c in wide.columns]
        metric_cols = list(wide.columns)
        wide = wide.reset_index()
        if "target" in wide:
            wide["target"] = wide["target"].astype(int)
        pairs = att.merge(wide, on=keys, how="outer")
    else:
        pairs, metric_cols = att.copy(), []
    pairs = pairs.merge(cases[["path", "pos"]], on="path", how="inner")
    order = {m: i for i, m in enumerate(dict.fromkeys(list(run.methods) + sorted(set(pairs["method"]))))}
    pairs["_m"] = pairs["method"].map(order)
    pairs = pairs.sort_values(["pos", "_m"], kind="stable").drop(columns="_m").reset_index(drop=True)
    return pairs, metric_names(metric_cols, case_metrics=True)


def metric_names(names, *, case_metrics: bool = False) -> list[str]:
    """Metrics present, in display order; case-level ones (insertion_room, the same for every
    method) only with ``case_metrics``."""
    present = set(names)
    rest = present - set(CASE_METRICS)
    out = [m for m in METRIC_ORDER if m in rest] + sorted(rest - set(METRIC_ORDER))
    return out + [m for m in CASE_METRICS if m in present] if case_metrics else out


def counterfactual_table(run, cases: pd.DataFrame) -> pd.DataFrame | None:
    """``run.counterfactuals`` with ``pos``, sorted by case position and target (None when none)."""
    cf = run.counterfactuals
    if cf is None or not len(cf):
        return None
    cf = cf.merge(cases[["path", "pos"]], on="path", how="inner")
    return cf.sort_values(["pos", "target"], kind="stable").reset_index(drop=True)


def counterfactual_columns(cf: pd.DataFrame | None) -> list[str]:
    """The plausibility columns that hold a value for at least one counterfactual."""
    if cf is None:
        return []
    return [c for c in CF_EXTRA if c in cf and cf[c].notna().any()]


# -- badges ----------------------------------------------------------------------------------------
def faithfulness(values: dict) -> tuple[str, float] | None:
    """``("faithfulness", insertion AUC - deletion AUC)``, or ``("MuFidelity", value)`` when there
    are no curves or when the insertion baseline alone already gives the class (insertion_room
    below ROOM_MIN); None when neither is known."""
    ins, dele, room = number(values.get("insertion_auc")), number(values.get("deletion_auc")), \
        number(values.get("insertion_room"))
    if ins is not None and dele is not None and (room is None or room >= ROOM_MIN):
        return "faithfulness", ins - dele
    mu = number(values.get("mufidelity"))
    return ("MuFidelity", mu) if mu is not None else None


def faithfulness_badge(values: dict) -> dict | None:
    found = faithfulness(values)
    if found is None:
        return None
    kind, v = found
    if kind == "faithfulness":
        return {"good": v > 0, "text": f"faithfulness {v:+.2f}",
                "title": "insertion AUC - deletion AUC: above 0 when the pixels the map ranks first matter "
                         "more to the model than the others; 0 or below: the map is no better than its reverse"}
    return {"good": v > 0, "text": f"MuFidelity {v:+.2f}",
            "title": "correlation of attribution mass and output drop; above 0: the map tracks the model"}


def sanity_badge(entry) -> dict | None:
    if not isinstance(entry, dict) or entry.get("passed") is None:
        return None
    passed = bool(entry["passed"])
    return {"good": passed, "text": "sanity check passed" if passed else "sanity check failed",
            "title": entry.get("rule") or "model-parameter randomisation test: a method passes when its maps change as "
                     "the model's weights are randomised (similarity below the threshold)"}


# -- run level -------------------------------------------------------------------------------------
def confusion_matrix(cases: pd.DataFrame, classes: list[str]):
    labelled = cases[cases["outcome"].isin(["correct", "incorrect"])]
    labelled = labelled[labelled["label_index"].notna() & labelled["prediction_index"].notna()]  # not multi-label
    if not len(labelled) or not classes:
        return None
    n = len(classes)
    li = labelled["label_index"].to_numpy(dtype=np.int64)
    pi = labelled["prediction_index"].to_numpy(dtype=np.int64)
    ok = (li >= 0) & (li < n) & (pi >= 0) & (pi < n)
    return np.bincount(li[ok] * n + pi[ok], minlength=n * n).reshape(n, n).tolist()


def _stats(values: pd.Series) -> dict | None:
    v = values.dropna().to_numpy(dtype=float)
    if not v.size:
        return None
    sd = float(np.std(v, ddof=1)) if v.size > 1 else None
    return {"mean": fmt(float(v.mean())), "sd": fmt(sd, 2) if sd is not None else None, "n": int(v.size)}


def method_table(methods_spec: dict, seconds: dict, pairs: pd.DataFrame, metric_order: list[str],
                 sanity: dict) -> list[dict]:
    """One row per method: parameters, seconds per image, sanity verdict, mean metrics over images."""
    names = list(methods_spec) + [m for m in seconds if m not in methods_spec]
    names += sorted(set(pairs["method"]) - set(names))
    groups = dict(tuple(pairs.groupby("method", sort=False))) if len(pairs) else {}
    out = []
    for name in names:
        rows = groups.get(name)
        per_metric = [(_stats(rows[m]) if rows is not None and m in rows else None) for m in metric_order]
        params = methods_spec.get(name) or {}
        out.append({"name": name, "params": ", ".join(f"{k}={v}" for k, v in params.items()),
                    "seconds": seconds.get(name), "sanity": sanity_badge(sanity.get(name)), "metrics": per_metric})
    return out


def group_tables(cases: pd.DataFrame, pairs: pd.DataFrame, metric_order: list[str], classes: list[str],
                 by_finding: bool = False) -> list[dict]:
    """Mean metrics per method within each class (by label) and within each outcome (correct,
    incorrect, ...): ``[{"title", "key", "rows": [{"group", "method", "n", "values"}]}]``.
    ``by_finding`` (multi-label runs): per finding explained (each map's target) instead of per label."""
    if not metric_order or not len(pairs):
        return []
    joined = pairs.merge(cases[["path", "label", "outcome"]], on="path", how="left")
    tables = []
    first = ("target_name", "By finding (the finding each map explains)", classes) if by_finding else \
        ("label", "By class (label)", classes)
    for key, title, order in (first, ("outcome", "By outcome", list(OUTCOMES))):
        col = joined[key].astype(object).where(joined[key].notna(), None)
        rows = []
        grouped = joined.assign(_g=col.fillna("(none)")).groupby(["_g", "method"], sort=False)
        means = grouped[metric_order].mean()
        counts = grouped.size()
        rank = {g: i for i, g in enumerate(order)}
        methods = list(dict.fromkeys(pairs["method"]))
        keys = sorted(means.index, key=lambda gm: (rank.get(gm[0], len(rank)), str(gm[0]), methods.index(gm[1])))
        for g, m in keys:
            label = OUTCOME_TEXT.get(g, g) if key == "outcome" else g
            rows.append({"group": label, "method": m, "n": int(counts[(g, m)]),
                         "values": [fmt(means.loc[(g, m), metric]) if not pd.isna(means.loc[(g, m), metric]) else "-"
                                    for metric in metric_order]})
        tables.append({"title": title, "key": key, "rows": rows})
    return tables


def sanity_rows(sanity: dict) -> list[dict]:
    rows = []
    for method, v in sanity.items():
        if not isinstance(v, dict):
            continue
        sim = [s for s in (v.get("similarity") or []) if s is not None]
        rows.append({"method": method, "badge": sanity_badge(v), "threshold": fmt(v.get("threshold")),
                     "final": fmt(sim[-1]) if sim else "-", "random_logit": fmt(v.get("random_logit")),
                     "layers": len(v.get("layers") or []), "measure": str(v.get("measure") or ""),
                     "cascade": fmt(v.get("cascade_mean") if v.get("cascade_mean") is not None
                                    else (float(np.mean(sim)) if sim else None)), "rule": str(v.get("rule") or "")})
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


def counterfactual_summary(cf: pd.DataFrame | None, cf_extra: list[str]) -> dict | None:
    if cf is None or not len(cf):
        return None
    valid = cf[cf["valid"]]

    def mean(key, among):
        vals = among[key].dropna() if key in among else []
        return fmt(float(np.mean(vals))) if len(vals) else None

    stats = [{"label": "Mean L1 of the valid ones", "value": mean("l1", valid)},
             {"label": "Mean L2 of the valid ones", "value": mean("l2", valid)}]
    stats += [{"label": f"Mean {CF_EXTRA_LABELS[k]}", "value": mean(k, cf)} for k in cf_extra]
    return {"n": len(cf), "valid": len(valid), "stats": [s for s in stats if s["value"] is not None]}


def loading_view(spec: dict) -> dict | None:
    """What the loader did to the images (run.yaml ``data_info.loading``) and the model's input as the
    command line described it (``model.overrides``), for the run summary; None when not recorded."""
    loading = (spec.get("data_info") or {}).get("loading") or {}
    overrides = (spec.get("model") or {}).get("overrides") or {}
    if not loading and not overrides:
        return None
    from ..runs.diagnose import flag_text
    described = [flag_text(k, v) for k, v in overrides.items()]
    return {"lines": [str(line) for line in loading.get("lines") or []], "warnings": list(loading.get("warnings") or []),
            "described": described, "notes": [str(n) for n in loading.get("model_input") or []]}


ACTIVATION_NOTE = ("Relative change: how far each layer's output a moved from the original to the counterfactual, "
                   "||a_cf \u2212 a|| / ||a|| (0.1: by a tenth of its size); mean |change| in the layer's own "
                   "units; top channels: those that moved most (channel: mean |change|).")


def activation_view(record: dict | None) -> dict | None:
    """The counterfactual panel's layer table from a case's stored activation record
    (:meth:`~counterlens.runs.store.Run.activation_record`): a row per layer with a bar of its
    relative change (the case's largest is full width; inf is full width too); None when the
    run recorded none (a run from before they were stored)."""
    if record is None:
        return None
    if record.get("skipped"):
        return {"skipped": str(record["skipped"]), "rows": [], "note": ACTIVATION_NOTE, "selection": ""}
    layers = record.get("layers") or []
    finite = [float(c["relative_change"]) for c in layers if math.isfinite(float(c["relative_change"]))]
    top = max(finite, default=0.0)
    rows = []
    for c in layers:
        rel = float(c["relative_change"])
        share = 1.0 if not math.isfinite(rel) else (rel / top if top > 0 else 0.0)
        rows.append({"name": str(c["name"]), "module": str(c.get("module") or ""),
                     "shape": "\u00d7".join(str(int(s)) for s in c.get("shape") or []),
                     "relative": "inf" if not math.isfinite(rel) else fmt(rel), "bar": round(80 * share, 1),
                     "mean_abs": fmt(c.get("mean_abs_change")),
                     "channels": ", ".join(f"{int(i)}: {fmt(v, 2)}" for i, v in c.get("top_channels") or [] if v > 0)})
    return {"skipped": None, "rows": rows, "note": ACTIVATION_NOTE, "selection": str(record.get("selection") or "")}
