"""Score attribution maps: one table of metrics per image, method and metric.

:func:`evaluate` works on tensors in memory; :func:`counterlens.runs.evaluate.evaluate_run` on a run
directory (it writes the metric rows into the run's index and ``metrics.csv``, ``metrics_summary.csv``,
``curves.json`` and ``sanity.json`` next to it).

**Format: long.** One row per (image, method, metric) with columns ``image`` (the row of ``x``; the
case's ``path`` in ``evaluate_run``), ``method``, ``metric``, ``value``, ``target`` /
``target_name`` (the class the map explains), ``predicted`` / ``predicted_name``, ``label`` /
``label_name`` and ``correct`` (NA without labels). Long rows keep NaN scores (an empty mask, a
constant map) apart from missing ones and group with one ``groupby``; ``df.pivot_table(index=["image",
"method"], columns="metric", values="value")`` gives the wide form. :func:`summarize` groups them
(mean, std, n of the non-NaN values); :func:`per_method`, :func:`per_class` and
:func:`per_correctness` are the usual groupings.

The available metrics and what each costs are in :data:`METRICS`; ``metrics=None`` takes every one
that applies (localisation only with masks, the completeness gap only for integrated gradients).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from ..attribution.base import Evaluator, resolve_targets
from ..errors import InputError
from . import complexity, faithfulness, localization


@dataclass(frozen=True)
class MetricInfo:
    name: str
    kind: str            # "faithfulness", "complexity", "localisation", "axiomatic"
    summary: str
    better: str          # "higher", "lower" or "" (descriptive)
    cost: str            # model evaluations per image and method
    needs_masks: bool = False
    only_for: tuple[str, ...] = ()     # methods it applies to (empty: every method)


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("deletion_auc", "faithfulness", "area under the deletion curve, most relevant first", "lower", "steps + 1"),
    MetricInfo("insertion_auc", "faithfulness", "area under the insertion curve, most relevant first", "higher", "steps + 1"),
    MetricInfo("insertion_room", "faithfulness", "target score of the image minus that of the baseline: the room "
               "insertion has (near 0 or below: insertion_auc cannot tell maps apart)", "", "steps + 1 (0 with "
               "insertion_auc)"),
    MetricInfo("deletion_lerf_auc", "faithfulness", "area under the deletion curve, least relevant first", "higher",
               "steps + 1"),
    MetricInfo("mufidelity", "faithfulness", "correlation of subset attribution and output drop", "higher",
               "n_subsets + 1"),
    MetricInfo("sparseness", "complexity", "Gini index of |map|", "higher", "0"),
    MetricInfo("entropy", "complexity", "entropy of the normalised |map|", "lower", "0"),
    MetricInfo("ig_completeness_error", "axiomatic", "|sum(map) - (f(x) - f(baseline))| for the target logit",
               "lower", "2", only_for=("integrated_gradients",)),
    MetricInfo("pointing_game", "localisation", "the map's maximum lies in the mask", "higher", "0", True),
    MetricInfo("relevance_mass", "localisation", "share of positive relevance in the mask", "higher", "0", True),
    MetricInfo("relevance_rank", "localisation", "share of the top-|mask| pixels in the mask", "higher", "0", True),
    MetricInfo("mass_lift", "localisation", "relevance mass / mask share (uniform map = 1)", "higher", "0", True),
)}
CURVE_METRICS = {"deletion_auc": ("deletion", "deletion", "morf"), "insertion_auc": ("insertion", "insertion", "morf"),
                 "deletion_lerf_auc": ("deletion_lerf", "deletion", "lerf")}
LOCALISATION = {"pointing_game": localization.pointing_game, "relevance_mass": localization.relevance_mass,
                "relevance_rank": localization.relevance_rank, "mass_lift": localization.mass_lift}


def resolve_metrics(metrics: Sequence[str] | str | None, has_masks: bool) -> list[str]:
    """Metric names to compute: ``None`` -> every metric that applies; checks the names."""
    if metrics is None:
        return [m for m, info in METRICS.items() if has_masks or not info.needs_masks]
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise InputError(f"metrics {unknown} are unknown; available: {', '.join(METRICS)}")
    masked = [m for m in names if METRICS[m].needs_masks]
    if masked and not has_masks:
        raise InputError(f"metrics {masked} need ground-truth masks; pass masks=... (or --masks DIR)")
    return list(dict.fromkeys(names))


@dataclass
class Options:
    """Settings shared by every metric of one evaluation."""

    steps: int = 20
    baseline: object = "blur"
    n_subsets: int = 32
    batch_size: int = 64
    seed: int = 0


def method_metrics(clf, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None,
                   names: list[str], opts: Options, method: str = "",
                   method_params: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, dict[str, int]]:
    """Every metric of ``names`` for one method's maps ``[B, *S]``.

    Returns ``({metric: Tensor[B]}, {curve kind: Curve}, {metric: model evaluations})``.
    """
    values, curves, evaluations = {}, {}, {}
    common = {"batch_size": opts.batch_size, "seed": opts.seed}
    for name in names:
        info = METRICS[name]
        if info.only_for and method not in info.only_for:
            continue
        if info.needs_masks and masks is None:
            continue
        if name in CURVE_METRICS:
            key, kind, order = CURVE_METRICS[name]
            curve = faithfulness.perturbation_curve(clf, x, maps, target, kind=kind, order=order, steps=opts.steps,
                                                    baseline=opts.baseline, **common)
            curves[key], values[name], evaluations[name] = curve, curve.auc, curve.evaluations
        elif name == "insertion_room":      # the insertion curve's two ends (no model call when it exists)
            curve = curves.get("insertion")
            if curve is None:
                curve = faithfulness.perturbation_curve(clf, x, maps, target, kind="insertion", order="morf",
                                                        steps=opts.steps, baseline=opts.baseline, **common)
                evaluations[name] = curve.evaluations
            else:
                evaluations[name] = 0
            values[name] = curve.y[:, -1] - curve.y[:, 0]
        elif name == "mufidelity":
            result = faithfulness.mufidelity(clf, x, maps, target, n_subsets=opts.n_subsets, baseline=opts.baseline,
                                             **common)
            values[name], evaluations[name] = result.value, result.evaluations
        elif name in ("sparseness", "entropy"):
            values[name], evaluations[name] = getattr(complexity, name)(maps), 0
        elif name == "ig_completeness_error":
            p = method_params or {}
            gap = complexity.completeness_error(clf, x, maps, target, baseline=p.get("baseline", "zeros"),
                                                batch_size=opts.batch_size, seed=p.get("seed", opts.seed))
            values[name], evaluations[name] = gap.abs(), 2 * x.shape[0]
        else:
            values[name], evaluations[name] = LOCALISATION[name](maps, masks), 0
    return {k: v.detach().float().cpu() for k, v in values.items()}, curves, evaluations


def _as_masks(masks, x: torch.Tensor) -> torch.Tensor | None:
    if masks is None:
        return None
    k = torch.as_tensor(masks)
    if k.dim() == x.dim() and k.shape[1] == 1:
        raise InputError(f"masks has shape {tuple(k.shape)}; pass [batch, *spatial] (drop the channel axis: masks[:, 0])")
    if k.shape != (x.shape[0], *x.shape[2:]):
        raise InputError(f"masks has shape {tuple(k.shape)}; expected [batch, *spatial] = {(x.shape[0], *x.shape[2:])}")
    return (k > 0.5 if torch.is_floating_point(k) else k != 0).cpu()


def _name(names: list[str] | None, index) -> str | None:
    if index is None or pd.isna(index) or names is None or not 0 <= int(index) < len(names):
        return None
    return names[int(index)]


def evaluate(clf, x, maps: dict, target="predicted", masks=None, metrics=None, batch_size: int = 64,
             seed: int = 0, *, labels=None, steps: int = 20, baseline="blur", n_subsets: int = 32,
             method_params: dict | None = None) -> pd.DataFrame:
    """Score ``maps`` ``{method: Tensor[B, *S]}`` of the images ``x`` ``[B, C, *S]``.

    Parameters
    ----------
    clf : Classifier the maps explain.
    target : "predicted", class name, int, or one per row: the class the maps explain.
    masks : ``[B, *S]`` bool ground truth; enables the localisation metrics.
    metrics : names from :data:`METRICS`; None -> all that apply.
    batch_size, seed : rows per model call; seed of the random tie-breaks and subsets.
    labels : ``[B]`` true classes (optional): fills ``label`` and ``correct``.
    steps : deletion / insertion resolution.
    baseline : what hidden pixels become in every faithfulness metric ("blur", "zero", "mean", a number).
    n_subsets : MuFidelity subsets per image.
    method_params : ``{method: params}`` the maps were made with (the IG baseline for completeness).

    Returns the long DataFrame described in the module docstring, with ``df.attrs["curves"]``
    (``{method: {kind: {"x": [...], "y": [...]}}}``, means over images) and
    ``df.attrs["evaluations"]`` (``{method: {metric: model evaluations}}``).
    """
    if not isinstance(maps, dict) or not maps:
        raise InputError("maps must be a non-empty dict {method: Tensor[batch, *spatial]} (as cl.explain returns)")
    x = clf.as_input(x)
    logits = Evaluator(clf, batch_size).logits(x)
    tgt = resolve_targets(clf, x, target, logits=logits)
    predicted = logits.argmax(dim=1).cpu()
    mask_t = _as_masks(masks, x)
    names = resolve_metrics(metrics, mask_t is not None)
    opts = Options(steps, baseline, n_subsets, batch_size, seed)
    classes = clf.class_names(logits.shape[1])
    label_t = None if labels is None else torch.as_tensor(labels).long().view(-1).cpu()
    if label_t is not None and len(label_t) != x.shape[0]:
        raise InputError(f"labels has {len(label_t)} entries for {x.shape[0]} images; pass one per image")
    frames, curves, evaluations = [], {}, {}
    for method, m in maps.items():
        m = torch.as_tensor(m)
        if m.shape != (x.shape[0], *x.shape[2:]):
            raise InputError(f"maps[{method!r}] has shape {tuple(m.shape)}; expected {(x.shape[0], *x.shape[2:])}")
        values, method_curves, cost = method_metrics(clf, x, m, tgt, mask_t, names, opts, method,
                                                     (method_params or {}).get(method))
        curves[method] = curve_means({k: [c] for k, c in method_curves.items()})
        evaluations[method] = cost
        for metric, v in values.items():
            frames.append(pd.DataFrame({"image": range(x.shape[0]), "method": method, "metric": metric,
                                        "value": v.double().numpy()}))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image", "method", "metric", "value"])
    info = pd.DataFrame({"image": range(x.shape[0]), "target": tgt.cpu().numpy(),
                         "predicted": predicted.numpy(),
                         "label": pd.array(label_t.numpy() if label_t is not None else [pd.NA] * x.shape[0],
                                           dtype="Int64")})
    df = add_class_columns(df.merge(info, on="image", how="left"), classes)
    df.attrs["curves"], df.attrs["evaluations"] = curves, evaluations
    return df


def add_class_columns(df: pd.DataFrame, classes: list[str] | None) -> pd.DataFrame:
    """Add ``target_name``, ``predicted_name``, ``label_name`` and ``correct`` (NA without a label)."""
    for col in ("target", "predicted", "label"):
        if col in df:
            df[f"{col}_name"] = [_name(classes, v) for v in df[col]]
    label = df["label"].astype("Int64") if "label" in df else pd.Series(pd.NA, index=df.index, dtype="Int64")
    df["correct"] = (label == df["predicted"].astype("Int64")).astype("boolean")
    return df


def curve_means(curves: dict[str, list]) -> dict:
    """``{kind: [Curve, ...]}`` -> ``{kind: {"x": mean x, "y": mean y}}`` over every image of every curve."""
    out = {}
    for kind, parts in curves.items():
        xs = torch.cat([c.x.double().expand_as(c.y) for c in parts])
        ys = torch.cat([c.y.double() for c in parts])
        out[kind] = {"x": xs.mean(0).tolist(), "y": ys.mean(0).tolist(), "n": int(ys.shape[0])}
    return out


# -- grouping -------------------------------------------------------------------------------------
def summarize(df: pd.DataFrame, by: Sequence[str] | str = ()) -> pd.DataFrame:
    """Mean, std and n (non-NaN values) of ``value`` per ``(*by, method, metric)``; ``n_nan`` counts the rest."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in df]
    if missing:
        raise InputError(f"cannot group by {missing}; the table has columns {list(df.columns)}")
    keys = by + ["method", "metric"]
    grouped = df.groupby(keys, dropna=False, sort=False)["value"]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    out["n_nan"] = grouped.size().values - out["n"].values
    return out


def per_method(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`summarize` per method and metric."""
    return summarize(df)


def per_class(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`summarize` per true class (``label_name``), or per predicted class without labels."""
    column = "label_name" if "label_name" in df and df["label_name"].notna().any() else "predicted_name"
    return summarize(df, column)


def per_correctness(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`summarize` for correctly and incorrectly classified images (needs labels)."""
    if "correct" not in df or df["correct"].isna().all():
        raise InputError("no labels: per_correctness needs labels=... (or a run with class folders)")
    return summarize(df[df["correct"].notna()], "correct")


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """The three groupings stacked, as in ``metrics_summary.csv``: columns ``group_by`` ("all", "class",
    "correct"), ``group`` ("all", a class name, "correct" / "incorrect"), ``method``, ``metric``, ``mean``,
    ``std``, ``n``, ``n_nan``."""
    parts = [per_method(df).assign(group_by="all", group="all")]
    cls = per_class(df)
    parts.append(cls.rename(columns={cls.columns[0]: "group"}).assign(group_by="class"))
    if "correct" in df and df["correct"].notna().any():
        cor = per_correctness(df)
        cor["group"] = cor["correct"].map({True: "correct", False: "incorrect"})
        parts.append(cor.drop(columns="correct").assign(group_by="correct"))
    out = pd.concat(parts, ignore_index=True)
    return out[["group_by", "group", "method", "metric", "mean", "std", "n", "n_nan"]]
