"""The report's first screen: the verdict before the tables.

Plain sentences, each with the rule and the numbers it rests on:

* **is the model right**: accuracy over the labelled images and per class (by label); per finding
  in a multi-label run; a run without labels says so;
* **does it rely on a shortcut**: the audit's verdict in one sentence with its flip rates;
* **which maps to trust**: per method, the sanity (cascading model-parameter randomisation) verdict
  and the faithfulness test, and the methods that pass both;
* **the recommended map** of every case: the most faithful method that passed the sanity check,
  with a stated fallback when none passed or nothing was measured.

**Sanity rule** (:mod:`counterlens.metrics.sanity`): passed when the similarity after randomising
*all* layers is below the threshold *and* the similarity averaged over the cascade is below it too.
A map can end at 0.09 and still fail: it survived the randomisation of the top layers and changed
only when the lowest ones went. The verdict is recomputed here from the stored numbers so that the
badge, the table and the plotted curve always agree; a stored verdict that disagrees is named.

**Faithfulness test**: insertion AUC - deletion AUC averaged over the run's maps is above 0 (pixels
ranked first by the map matter more to the model than the pixels ranked last: the map beats its own
reverse order), on the maps where insertion can separate maps (``insertion_room`` >= ``ROOM_MIN``);
without deletion/insertion curves, mean MuFidelity above 0 (attribution mass tracks the output drop
over random pixel subsets). The same statistic ranks the methods ("most faithful").
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .report_data import ROOM_MIN, number

EVALUATE = "counterlens evaluate RUN"


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.0f}%" if n else "-"


# -- is the model right --------------------------------------------------------------------------
def accuracy_verdict(cases: pd.DataFrame, classes: list[str], multilabel: bool = False) -> dict:
    """``{"overall": sentence, "lines": [one sentence per class or finding], "labelled": n}``."""
    done = cases[cases["status"] == "done"]
    labelled = done[done["outcome"].isin(["correct", "incorrect"])]
    unlabelled = int((done["outcome"] == "unknown").sum())
    if not len(labelled):
        return {"labelled": 0, "lines": [],
                "overall": f"These {len(done):,} images have no labels, so whether the model is right cannot be "
                           "measured here; the predictions are shown as the model made them."}
    correct = int((labelled["outcome"] == "correct").sum())
    n = len(labelled)
    what = "with every finding right" if multilabel else "right"
    overall = f"The model is {what} on {correct:,} of {n:,} labelled images ({_pct(correct, n)})"
    overall += f"; {unlabelled:,} more have no label." if unlabelled else "."
    lines = _finding_lines(labelled, classes) if multilabel else _class_lines(labelled, classes)
    return {"overall": overall, "lines": lines, "labelled": n}


def _class_lines(labelled: pd.DataFrame, classes: list[str]) -> list[str]:
    lines = []
    order = {c: i for i, c in enumerate(classes)}
    for label, group in sorted(labelled.groupby("label", sort=False), key=lambda kv: (order.get(kv[0], len(order)),
                                                                                     str(kv[0]))):
        k, n = int((group["outcome"] == "correct").sum()), len(group)
        line = f"{label}: {k:,} of {n:,} right ({_pct(k, n)})"
        wrong = group.loc[group["outcome"] == "incorrect", "prediction"].value_counts()
        if len(wrong):
            line += "; the others predicted " + ", ".join(f"{p} ({int(c)})" for p, c in wrong.items())
        lines.append(line + ".")
    return lines


def _finding_lines(labelled: pd.DataFrame, findings: list[str]) -> list[str]:
    lines = []
    for f in findings:
        lab, pred = f"label_{f}", f"pred_{f}"
        if lab not in labelled or pred not in labelled:
            continue
        rows = labelled[labelled[lab].notna() & labelled[pred].notna()]
        y, p = rows[lab].astype(int).to_numpy(), rows[pred].astype(int).to_numpy()
        if not len(y):
            continue
        pos, neg = y == 1, y == 0
        line = f"{f}: right on {int((y == p).sum()):,} of {len(y):,} images ({_pct(int((y == p).sum()), len(y))})"
        if pos.any():
            line += f"; found in {int(p[pos].sum()):,} of the {int(pos.sum()):,} that have it"
        if neg.any():
            line += f", flagged in {int(p[neg].sum()):,} of the {int(neg.sum()):,} that do not"
        lines.append(line + ".")
    return lines


# -- the audit -----------------------------------------------------------------------------------
def audit_verdict(audit: dict | None) -> dict | None:
    """One sentence: relies on the region or not, with the flip rates and the rule."""
    if not audit:
        return None
    relies = audit.get("relies_on_region")
    region, rand = number(audit.get("region_flip_rate")), number(audit.get("random_flip_rate"))
    rule = (audit.get("decision_rule") or {}).get("text") if isinstance(audit.get("decision_rule"), dict) else None
    if relies is None or region is None or rand is None:
        text = str(audit.get("verdict") or "").split(". ")[0].strip().rstrip(".")
        return {"relies": None if relies is None else bool(relies), "text": (text + ".") if text else
                "The audit ran but its file holds no verdict.", "rule": rule}
    head = "The model relies on the audited region" if relies else "The model does not rely on the audited region"
    n = audit.get("n_images")
    text = (f"{head}: {100 * region:.0f}% of decisions change when it is removed, {100 * rand:.0f}% when a random "
            f"region of the same size is" + (f" ({int(n):,} images)." if isinstance(n, (int, float)) else "."))
    return {"relies": bool(relies), "text": text,
            "rule": rule or "relies when the region flip rate is at least 0.1, twice the random flip rate and 0.1 above it"}


# -- the sanity check ----------------------------------------------------------------------------
def sanity_verdict(entry) -> dict | None:
    """``{"passed", "text", "final", "cascade", "threshold", "stored"}`` of one ``sanity.json`` entry,
    with the verdict recomputed from its numbers by the documented rule; None when absent."""
    if not isinstance(entry, dict):
        return None
    if entry.get("error"):
        return {"passed": None, "text": f"could not run: {entry['error']}", "detail": f"could not run: {entry['error']}",
                "final": None, "cascade": None,
                "threshold": number(entry.get("threshold")), "stored": entry.get("passed")}
    sims = [number(s) for s in (entry.get("similarity") or [])]
    finite = [s for s in sims if s is not None]
    t = number(entry.get("threshold"))
    stored = entry["passed_in_file"] if "passed_in_file" in entry else entry.get("passed")
    if not finite or t is None or sims[-1] is None:
        detail = "sanity.json holds no similarities"
        text = {True: "passed", False: "failed"}.get(stored, "no verdict") + f" ({detail})"
        return {"passed": None if stored is None else bool(stored), "text": text, "detail": detail, "final": None,
                "cascade": None,
                "threshold": t, "stored": stored}
    final = sims[-1]
    cascade = number(entry.get("cascade_mean"))
    cascade = float(np.mean(finite)) if cascade is None else cascade
    layers = len(entry.get("layers") or sims)
    after = f"similarity after randomising all {layers} layers {final:.2f}"
    mean = f"its mean over the cascade {cascade:.2f}"
    passed = final < t and cascade < t
    if passed:
        detail = f"{after} < {t:g} and {mean} < {t:g}"
    elif final >= t:
        detail = f"{after} \u2265 {t:g}: the map barely changes when the model's weights are destroyed"
    else:
        detail = (f"{after} < {t:g}, but {mean} \u2265 {t:g}: the map survived the randomisation of the "
                  "top layers and changed only when the lowest ones went")
    if stored is not None and bool(stored) != passed:
        detail += f" (sanity.json says {'passed' if stored else 'failed'}; this is the rule applied to its numbers)"
    return {"passed": passed, "text": f"{'passed' if passed else 'failed'}: {detail}", "detail": detail,
            "final": final, "cascade": cascade, "threshold": t, "stored": stored}


def checked_sanity(sanity: dict) -> dict:
    """``sanity.json`` with each method's ``passed`` set by :func:`sanity_verdict` and its ``rule``
    text added, so every badge of the report shows the verdict its numbers give."""
    out = {}
    for method, entry in (sanity or {}).items():
        v = sanity_verdict(entry)
        out[method] = {**entry, "passed": v["passed"], "rule": v["text"],
                       "passed_in_file": entry.get("passed_in_file", entry.get("passed"))} if v else entry
    return out


# -- the faithfulness test -----------------------------------------------------------------------
def faithfulness_statistic(pairs: pd.DataFrame) -> tuple[str | None, pd.Series]:
    """The run's faithfulness statistic and its value per row (NaN where unknown): ``"curves"``
    (insertion - deletion AUC where ``insertion_room`` >= ROOM_MIN) when any row has it, else
    ``"mufidelity"``, else ``(None, NaN)``."""
    def col(name):
        return pairs[name].astype(float) if name in pairs else pd.Series(np.nan, index=pairs.index, dtype=float)
    ins, dele, room, mu = col("insertion_auc"), col("deletion_auc"), col("insertion_room"), col("mufidelity")
    curves = (ins - dele).where(ins.notna() & dele.notna() & (room.isna() | (room >= ROOM_MIN)))
    if curves.notna().any():
        return "curves", curves
    if mu.notna().any():
        return "mufidelity", mu
    return None, pd.Series(np.nan, index=pairs.index, dtype=float)


def faithfulness_verdicts(pairs: pd.DataFrame) -> dict[str, dict]:
    """``{method: {"passed", "score", "text"}}`` by the faithfulness test (module docstring)."""
    kind, values = faithfulness_statistic(pairs)
    if kind is None:
        return {}
    out = {}
    for method, v in values.groupby(pairs["method"], sort=False):
        v = v.dropna()
        if not len(v):
            continue
        score, above = float(v.mean()), int((v > 0).sum())
        what = "insertion AUC \u2212 deletion AUC" if kind == "curves" else "MuFidelity"
        passed = score > 0
        cmp = ">" if passed else "\u2264"
        detail = f"{what} {score:+.2f} {cmp} 0 (mean over {len(v):,} maps, {above:,} above 0)"
        if not passed:
            detail += (": ranking pixels by this map is no better than its reverse" if kind == "curves"
                       else ": its attribution mass does not track the output drop")
        out[method] = {"passed": passed, "score": score, "text": f"{'passed' if passed else 'failed'}: {detail}",
                       "detail": detail}
    return out


# -- which maps to trust, and the recommended one -------------------------------------------------
def method_verdicts(methods: list[str], sanity: dict, pairs: pd.DataFrame) -> dict:
    """Per method the two verdicts, the trusted ones, and the recommended map with its reason.

    Returns ``{"rows": [{"method", "sanity", "faith", "trusted"}], "trusted": [...], "has_sanity",
    "has_faith", "ranked": [methods, best first], "reason": why the first is recommended}``.
    """
    faith = faithfulness_verdicts(pairs)
    with_maps = list(dict.fromkeys(m for m in methods if m in set(pairs["method"]))) if len(pairs) else []
    rows = []
    for m in with_maps:
        s = sanity_verdict(sanity.get(m)) if sanity else None
        f = faith.get(m)
        rows.append({"method": m, "sanity": s, "faith": f,
                     "trusted": bool(s and s["passed"] and f and f["passed"])})
    has_sanity = any(r["sanity"] and r["sanity"]["passed"] is not None for r in rows)
    ranked, reason = _recommend(rows, has_sanity, bool(faith))
    return {"rows": rows, "trusted": [r["method"] for r in rows if r["trusted"]], "has_sanity": has_sanity,
            "has_faith": bool(faith), "ranked": ranked, "reason": reason}


def _score(row) -> float:
    return row["faith"]["score"] if row["faith"] else -math.inf


def _recommend(rows: list[dict], has_sanity: bool, has_faith: bool) -> tuple[list[str], str]:
    if not rows:
        return [], ""
    by_faith = sorted(rows, key=_score, reverse=True)            # stable: run order among equals
    sane = [r for r in by_faith if r["sanity"] and r["sanity"]["passed"]]
    if sane:
        best = sane[0]
        ranked = [r["method"] for r in sane] + [r["method"] for r in by_faith if r not in sane]
        if not has_faith:
            return ranked, f"{best['method']} passed the sanity check (no faithfulness metrics to rank the methods)"
        if best["faith"] and best["faith"]["passed"]:
            return ranked, f"{best['method']}: the most faithful method that passed the sanity check"
        return ranked, (f"{best['method']}: the most faithful method that passed the sanity check, though it "
                        "failed the faithfulness test; read it with care")
    if has_faith:
        why = "no method passed the sanity check on this model" if has_sanity else \
            f"the sanity check was not computed ({EVALUATE})"
        return [r["method"] for r in by_faith], f"{by_faith[0]['method']}: the most faithful method; {why}"
    if has_sanity:
        return [r["method"] for r in rows], (f"{rows[0]['method']}: the run's first method; no method passed the "
                                             "sanity check and no faithfulness metrics rank them")
    return [r["method"] for r in rows], (f"{rows[0]['method']}: the run's first method; no trust metrics yet "
                                         f"(`{EVALUATE}` measures which maps to trust)")


def mark_recommended(case: dict, ranked: list[str], reason: str) -> None:
    """Order ``case["overlays"]`` with the recommended method's maps first (``recommended`` True)
    and set ``case["recommend"]``: the reason, or why this case shows another method."""
    if not case["overlays"] or not ranked:
        case["recommend"] = None
        return
    have = {ov["method"] for ov in case["overlays"]}
    best = next((m for m in ranked if m in have), None)
    if best is None:
        case["recommend"] = None
        return
    for ov in case["overlays"]:
        ov["recommended"] = ov["method"] == best
    case["overlays"].sort(key=lambda ov: not ov["recommended"])       # stable: the others keep their order
    case["recommend"] = reason if best == ranked[0] else \
        f"{best}: {ranked[0]} (recommended for this run) has no map for this case"


def first_screen(acc: dict, audit: dict | None, verdicts: dict, look_first: list[dict]) -> dict:
    """What the verdict panel shows (plain values; the template escapes them)."""
    trusted = verdicts["trusted"]
    if not verdicts["rows"]:
        trust = "No attribution maps in this run."
    elif not verdicts["has_sanity"] and not verdicts["has_faith"]:
        trust = ("Which maps to trust is not measured yet: " f"`{EVALUATE}` runs the randomisation (sanity) test "
                 "and the deletion/insertion metrics and re-writes this report with the verdicts.")
    elif trusted:
        trust = (f"Trust the maps of {', '.join(trusted)}: "
                 f"{'it passes' if len(trusted) == 1 else 'they pass'} both the sanity check and the faithfulness test "
                 "on this model.")
    else:
        trust = "No method passes both the sanity check and the faithfulness test on this model: read its maps as " \
                "hypotheses, not evidence."
    missing = []
    if verdicts["rows"] and verdicts["has_faith"] and not verdicts["has_sanity"]:
        missing.append(f"the sanity check was not computed: `{EVALUATE}` (with sanity images) adds it")
    if verdicts["rows"] and verdicts["has_sanity"] and not verdicts["has_faith"]:
        missing.append(f"no faithfulness metrics: `{EVALUATE}` adds deletion/insertion AUC and MuFidelity")
    look = [{"key": lst["key"], "title": lst["title"], "total": lst["total"]} for lst in look_first]
    return {"accuracy": acc, "audit": audit, "trust": trust, "missing": missing, "rows": verdicts["rows"],
            "show_table": verdicts["has_sanity"] or verdicts["has_faith"], "recommended": verdicts["reason"],
            "look": look}
