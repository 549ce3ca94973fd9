"""Counterfactual figures: original, counterfactual, what changed, and what the model said.

Original and counterfactual are drawn in grey with the data's polarity (higher value = brighter)
and the *same* display range, so a brighter patch in the counterfactual is a real increase. The
signed difference ``counterfactual - original`` (summed over channels) uses a diverging scale
centred on zero with symmetric limits (red: brighter in the counterfactual, blue: darker), drawn
over a faint copy of the original so the edit can be placed in the anatomy. 3D volumes are shown
by their middle slice along the first spatial axis.

A result is anything with the fields of :class:`counterlens.counterfactual.CounterfactualResult`:
``x``, ``x_orig``, ``target``, ``valid``, ``probs_before``, ``probs_after`` (``distance`` and
``reason`` are used when present).
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize as ColorNormalize
from matplotlib.ticker import FormatStrFormatter

from ..errors import InputError
from .plots import _np, display_image, display_map, plt

DIFF_CMAP = "RdBu_r"
VALID_COLOUR = "#1a7f37"
INVALID_COLOUR = "#c62828"
BEFORE_COLOUR = "#9e9e9e"
AFTER_COLOUR = "#1565c0"
TARGET_COLOUR = "#e65100"


def _names(classes, n_classes: int, result=None) -> list[str]:
    if classes is None:
        classes = getattr(result, "classes", None)
    if classes is None:
        return [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    if len(classes) != n_classes:
        raise InputError(f"classes has {len(classes)} names but the result has {n_classes} class "
                         f"probabilities; pass one name per class")
    return classes


def _row(result, index: int) -> dict:
    """Everything drawn for one case, as numpy."""
    n = len(_np(result.x))
    if not isinstance(index, (int, np.integer)) or not -n <= index < n:
        raise InputError(f"index={index!r}; the result has {n} rows (0..{n - 1})")
    orig, cf = _np(result.x_orig)[index].astype(np.float32), _np(result.x)[index].astype(np.float32)
    reason = getattr(result, "reason", None)
    distance = getattr(result, "distance", None) or {}
    return {
        "orig": orig, "cf": cf, "diff": (cf - orig).sum(axis=0),
        "target": int(_np(result.target)[index]), "valid": bool(_np(result.valid)[index]),
        "before": _np(result.probs_before)[index].astype(np.float64),
        "after": _np(result.probs_after)[index].astype(np.float64),
        "reason": reason[index] if reason is not None else "",
        "distance": {k: float(_np(v)[index]) for k, v in distance.items()},
    }


def _shared_range(row: dict, value_range) -> tuple[float, float]:
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise InputError(f"value_range={value_range!r}; pass (low, high) with low < high")
        return lo, hi
    lo = float(min(row["orig"].min(), row["cf"].min()))
    hi = float(max(row["orig"].max(), row["cf"].max()))
    return lo, (hi if hi > lo else lo + 1.0)


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _show(ax, image, value_range) -> None:
    img = display_image(image, value_range)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _blank(ax)


def _show_difference(ax, row: dict, value_range, colorbar: bool = True, label: bool = True):
    """Signed difference over a faint original; symmetric limits; returns the AxesImage."""
    diff = display_map(row["diff"])
    vmax = float(np.abs(diff).max()) or 1.0
    norm = ColorNormalize(-vmax, vmax)
    base = display_image(row["orig"], value_range)
    base = base.mean(axis=-1) if base.ndim == 3 else base
    ax.imshow(base, cmap="gray", vmin=0, vmax=1, alpha=0.45, interpolation="nearest")
    alpha = np.clip(0.15 + np.abs(diff) / vmax, 0, 1) * (diff != 0)
    im = ax.imshow(diff, cmap=colormaps[DIFF_CMAP], norm=norm, alpha=alpha, interpolation="nearest")
    _blank(ax)
    if colorbar:
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        if label:
            bar.set_label("counterfactual \u2212 original", fontsize=7)
    return im


def _marker(ax, valid: bool) -> None:
    colour = VALID_COLOUR if valid else INVALID_COLOUR
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def _prob_bars(ax, row: dict, names: list[str]) -> None:
    k = len(names)
    pos = np.arange(k)
    h = 0.38
    ax.barh(pos - h / 2, row["before"], height=h, color=BEFORE_COLOUR, label="original")
    ax.barh(pos + h / 2, row["after"], height=h, color=AFTER_COLOUR, label="counterfactual")
    ax.axhspan(row["target"] - 0.5, row["target"] + 0.5, color=TARGET_COLOUR, alpha=0.13, lw=0)
    sep = "\n" if k <= 4 else " "
    ax.set_yticks(pos, [f"{n}{sep}(target)" if i == row["target"] else n for i, n in enumerate(names)], fontsize=8)
    ax.get_yticklabels()[row["target"]].set_color(TARGET_COLOUR)
    ax.get_yticklabels()[row["target"]].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    small = 6.5 if k <= 4 else 5.5
    for p, b, a in zip(pos, row["before"], row["after"], strict=True):
        for value, y, colour in ((b, p - h / 2, "#424242"), (a, p + h / 2, "#0d1b2a")):
            if value >= 0.01 or k <= 4:
                inside = value > 0.84          # no room right of the bar: write inside it, in white
                ax.text(value - 0.015 if inside else value + 0.015, y, f"{value:.2f}", va="center",
                        ha="right" if inside else "left", fontsize=small, color="white" if inside else colour)
    ax.set_title("probability per class\ngrey: original, blue: counterfactual", fontsize=9)


def _distance_text(name: str, value: float, n_elements: int) -> str:
    if name == "l0":
        return f"{int(round(value))} of {n_elements} values changed (L0)"
    label = {"l1": "L1", "l2": "L2", "linf": "max |change| (L\u221e)"}.get(name, name)
    return f"{label} {value:.3g}"


def _case_title(row: dict, names: list[str], index: int) -> str:
    before, after = int(row["before"].argmax()), int(row["after"].argmax())
    head = f"case {index}: model says {names[before]} ({row['before'][before]:.2f}); " \
           f"counterfactual aims at {names[row['target']]}"
    status = "VALID" if row["valid"] else f"NOT VALID: {row['reason'] or 'target not reached'}"
    dist = " \u00b7 ".join(_distance_text(k, v, row["orig"].size) for k, v in row["distance"].items())
    return f"{head} \u2014 {status}" + (f"\nedit size: {dist}" if dist else "") + \
        (f"\ncounterfactual predicted as {names[after]} ({row['after'][after]:.2f})" if after != row["target"] else "")


def counterfactual_figure(result, index: int = 0, classes=None, value_range=None):
    """One case in four panels: original, counterfactual, signed difference, probability bars.

    ``result``: a counterfactual result; ``index``: its row; ``classes``: class names in logit
    order (default ``result.classes``, else ``"0"``, ``"1"``, ...); ``value_range``: ``(low, high)``
    shown black to white for both images (default: the range of the two images together). Returns a matplotlib Figure.
    """
    row = _row(result, index)
    names = _names(classes, len(row["before"]), result)
    vr = _shared_range(row, value_range)
    fig, axes = plt.subplots(1, 4, figsize=(12.4, 3.7), gridspec_kw={"width_ratios": [1, 1, 1.22, 1.3]})
    b_cls, a_cls = int(row["before"].argmax()), int(row["after"].argmax())
    _show(axes[0], row["orig"], vr)
    axes[0].set_title(f"original\n{names[b_cls]} (p={row['before'][b_cls]:.2f})", fontsize=9)
    _show(axes[1], row["cf"], vr)
    _marker(axes[1], row["valid"])
    mark = "\u2713 valid" if row["valid"] else "\u2717 not valid"
    axes[1].set_title(f"counterfactual ({mark})\n{names[a_cls]} (p={row['after'][a_cls]:.2f})", fontsize=9,
                      color=VALID_COLOUR if row["valid"] else INVALID_COLOUR)
    _show_difference(axes[2], row, vr)
    axes[2].set_title("what changed\n(red brighter, blue darker)", fontsize=9)
    _prob_bars(axes[3], row, names)
    if row["orig"].ndim == 4:
        fig.text(0.01, 0.01, f"3D volume: middle slice {row['orig'].shape[1] // 2} of {row['orig'].shape[1]}",
                 fontsize=7)
    fig.suptitle(_case_title(row, names, index), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def counterfactual_grid(result, classes=None, max_rows: int = 16, value_range=None):
    """Many cases: one row each (original, counterfactual, signed difference) with a valid marker.

    The counterfactual's frame is green when valid, red when not; titles give the class and
    probability before and after. Each row's difference has its own symmetric scale and colour bar.
    At most ``max_rows`` rows (the first ones). Returns a matplotlib Figure.
    """
    n = len(_np(result.x))
    if n == 0:
        raise InputError("the result has no rows to draw")
    if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
        raise InputError(f"max_rows={max_rows!r}; pass a positive number of rows")
    rows = min(n, int(max_rows))
    names = _names(classes, _np(result.probs_before).shape[1], result)
    fig, axes = plt.subplots(rows, 3, figsize=(8.4, 2.6 * rows + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.22]}, layout="constrained")
    n_valid = int(_np(result.valid).sum())
    for r in range(rows):
        row = _row(result, r)
        vr = _shared_range(row, value_range)
        b_cls, a_cls = int(row["before"].argmax()), int(row["after"].argmax())
        _show(axes[r, 0], row["orig"], vr)
        axes[r, 0].set_title(f"#{r} original: {names[b_cls]} ({row['before'][b_cls]:.2f})", fontsize=8)
        _show(axes[r, 1], row["cf"], vr)
        _marker(axes[r, 1], row["valid"])
        mark = "\u2713" if row["valid"] else "\u2717"
        p_t = row["after"][row["target"]]
        axes[r, 1].set_title(f"{mark} \u2192 {names[row['target']]} ({p_t:.2f})"
                             + ("" if a_cls == row["target"] else f", says {names[a_cls]}"),
                             fontsize=8, color=VALID_COLOUR if row["valid"] else INVALID_COLOUR)
        _show_difference(axes[r, 2], row, vr, label=False)
        if r == 0:
            axes[r, 2].set_title("what changed (red brighter)", fontsize=8)
    shown = f"first {rows} of {n}" if rows < n else f"{n}"
    depth = _np(result.x).shape[2] if _np(result.x).ndim == 5 else None
    note = f"\n3D volumes: middle slice {depth // 2} of {depth}" if depth else ""
    fig.suptitle(f"counterfactuals ({shown}): {n_valid} of {n} valid; green frame = valid, red = not valid{note}",
                 fontsize=10)
    return fig
