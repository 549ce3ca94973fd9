"""Faithfulness: does hiding what a map calls relevant change the model's output?

* :func:`deletion` / :func:`insertion` (Petsiuk et al. 2018, "RISE"; Samek et al. 2017 "pixel
  flipping"): pixels are replaced by a baseline (deletion) or copied from the image onto the
  baseline (insertion) in the map's order, ``steps`` times a ``1/steps`` share of the pixels; the
  curve is the score after each step and its area (AUC, trapezoid over the changed share 0..1)
  sums it up. Most-relevant-first (``order="morf"``): a faithful map gives a *low* deletion AUC and a
  *high* insertion AUC. Least-relevant-first (``order="lerf"``) reverses both.
* :func:`mufidelity` (Bhatt et al. 2020, "Evaluating and aggregating feature-based model
  explanations"): Pearson correlation, over random pixel subsets ``S`` of a fixed size, between the
  attribution mass in ``S`` and the score drop when ``S`` is replaced by the baseline.

**Score.** The softmax *probability* of the target class (``output="prob"``, the default), so curves
lie in [0, 1] and compare between images and models; ``output="logit"`` gives the target logit.

**Pixels.** A pixel is one spatial position: hiding it replaces every channel. Maps are ordered by
their signed value (pass ``absolute=True`` to order by magnitude); ties are broken by a seeded random
order, so a constant map is a random deletion, not a raster scan.

**Cost** (model evaluations, i.e. rows through the model; :func:`cost` gives the formula): a curve
takes ``n_images * (steps + 1)``, MuFidelity ``n_images * (n_subsets + 1)``. Every evaluation goes
through one :class:`~counterlens.attribution.base.Evaluator` (rows are (image, step) or
(image, subset), built inside each chunk), and the result reports ``evaluations`` and ``calls``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attribution.base import Evaluator, resolve_targets, target_score
from ..attribution.noise import counter_normal, row_keys
from ..attribution.perturbation import perturbation_baseline
from ..errors import InputError

BASELINES = ("blur", "zero", "mean")
ORDERS = ("morf", "lerf")
KINDS = ("deletion", "insertion")


@dataclass
class Curve:
    """A deletion or insertion curve for every image.

    ``x``: ``[steps + 1]`` share of pixels changed (0 .. 1); ``y``: ``[B, steps + 1]`` target score
    after each step; ``auc``: ``[B]`` trapezoid area under ``y`` over ``x``; ``evaluations``: model
    evaluations used (``B * (steps + 1)``); ``calls``: model calls (chunks).
    """

    kind: str
    order: str
    x: torch.Tensor
    y: torch.Tensor
    auc: torch.Tensor
    evaluations: int
    calls: int


@dataclass
class MuFidelity:
    """``value [B]``: Pearson correlation (NaN where either side is constant); ``mass`` and ``drop``
    ``[B, n_subsets]``: attribution sum of each subset and the score drop it causes."""

    value: torch.Tensor
    mass: torch.Tensor
    drop: torch.Tensor
    evaluations: int
    calls: int


def cost(metric: str, n_images: int, *, steps: int = 20, n_subsets: int = 32) -> int:
    """Model evaluations a metric needs for ``n_images`` images.

    ``"deletion"`` / ``"insertion"`` (one order): ``n_images * (steps + 1)``;
    ``"mufidelity"``: ``n_images * (n_subsets + 1)``.
    """
    if metric in KINDS:
        return int(n_images) * (int(steps) + 1)
    if metric == "mufidelity":
        return int(n_images) * (int(n_subsets) + 1)
    raise InputError(f"metric={metric!r}; pass 'deletion', 'insertion' or 'mufidelity'")


# -- shared checks --------------------------------------------------------------------------------
def _prepare(clf, x, maps, target, batch_size):
    """``(x [B, C, *S] on the device, maps [B, N] float64 on the device, targets [B])``."""
    x = clf.as_input(x)
    m = torch.as_tensor(maps).detach()
    if m.shape != (x.shape[0], *x.shape[2:]):
        hint = " (drop the channel axis: maps[:, 0])" if m.dim() == x.dim() else ""
        raise InputError(f"maps has shape {tuple(m.shape)}; expected [batch, *spatial] = "
                         f"{(x.shape[0], *x.shape[2:])} to match x {tuple(x.shape)}{hint}")
    if not torch.isfinite(m).all():
        raise InputError("maps contains NaN or infinite values; clean the maps before scoring them")
    tgt = resolve_targets(clf, x, target, batch_size=batch_size)
    return x, m.reshape(m.shape[0], -1).to(device=x.device, dtype=torch.float64), tgt


def _baseline(x: torch.Tensor, baseline, seed: int) -> torch.Tensor:
    if isinstance(baseline, str) and baseline in ("zero", "zeros"):
        return torch.zeros_like(x)
    if isinstance(baseline, str) and baseline not in BASELINES:
        raise InputError(f"baseline={baseline!r}; pass one of {', '.join(BASELINES)}, a number or a tensor")
    return perturbation_baseline(x, baseline, seed)


def _check_output(output: str) -> str:
    if output not in ("prob", "logit"):
        raise InputError(f"output={output!r}; pass 'prob' (target probability) or 'logit'")
    return output


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}={value!r}; pass a positive int")
    return value


def pixel_ranks(maps: torch.Tensor, order: str = "morf", seed: int = 0) -> torch.Tensor:
    """Position of every pixel in the perturbation order, ``LongTensor[B, N]`` (0 = first).

    ``maps``: ``[B, N]`` (flattened). ``"morf"``: highest value first; ``"lerf"``: lowest first. Ties
    are broken by seeded random keys (a pure function of seed, row and pixel).
    """
    if order not in ORDERS:
        raise InputError(f"order={order!r}; pass 'morf' (most relevant first) or 'lerf' (least relevant first)")
    b, n = maps.shape
    keys = counter_normal(seed, (row_keys(torch.arange(b, device=maps.device)),), n)
    shuffle = keys.argsort(dim=1, stable=True)
    values = maps.gather(1, shuffle)
    pos = (-values if order == "morf" else values).argsort(dim=1, stable=True)
    sequence = shuffle.gather(1, pos)                      # pixel indices, first to last
    ranks = torch.empty_like(sequence)
    ranks.scatter_(1, sequence, torch.arange(n, device=maps.device).expand(b, n).contiguous())
    return ranks


# -- deletion / insertion -------------------------------------------------------------------------
def perturbation_curve(clf, x, maps, target="predicted", *, kind: str = "deletion", order: str = "morf",
                       steps: int = 20, baseline="blur", absolute: bool = False, output: str = "prob",
                       batch_size: int = 64, seed: int = 0) -> Curve:
    """Deletion or insertion curve of every image, batched over (image, step) rows.

    Parameters
    ----------
    clf : Classifier
    x : ``[B, C, *S]`` data-space images.
    maps : ``[B, *S]`` attribution maps (one per image).
    target : "predicted", class name, int, or one per row: whose score is tracked.
    kind : ``"deletion"`` (image -> baseline) or ``"insertion"`` (baseline -> image).
    order : ``"morf"`` (most relevant first, default) or ``"lerf"`` (least relevant first).
    steps : 20. Step ``k`` changes ``round(k * N / steps)`` of the ``N`` pixels.
    baseline : ``"blur"`` (default), ``"zero"``, ``"mean"`` (per image and channel), a number or a
        tensor broadcastable to ``x``.
    absolute : order by ``|map|`` instead of the signed value.
    output : ``"prob"`` (target softmax probability, default) or ``"logit"``.

    Returns a :class:`Curve`; costs ``B * (steps + 1)`` model evaluations.
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}; pass 'deletion' or 'insertion'")
    steps = _positive_int("steps", steps)
    output = _check_output(output)
    x, flat, tgt = _prepare(clf, x, maps, target, batch_size)
    base = _baseline(x, baseline, seed)
    ranks = pixel_ranks(flat.abs() if absolute else flat, order, seed).int()    # int32: half the memory
    n_pixels, batch = flat.shape[1], x.shape[0]
    counts = torch.linspace(0, n_pixels, steps + 1, dtype=torch.float64).round().int().to(x.device)
    n_points = steps + 1
    y = torch.empty(batch * n_points, dtype=torch.float32, device=x.device)
    spatial_view = (-1, 1, *x.shape[2:])

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)
        img, k = rows // n_points, rows % n_points
        changed = (ranks[img] < counts[k, None]).view(spatial_view)
        start, end = (x, base) if kind == "deletion" else (base, x)
        xb = torch.where(changed, end[img], start[img])
        y[a:b] = target_score(clf.forward(xb), tgt[img], output, clf.multilabel).float()

    evaluator = Evaluator(clf, batch_size)
    with torch.no_grad(), clf.eval_mode():
        evaluator.run(batch * n_points, work)
    y = y.view(batch, n_points).cpu()
    share = (counts.double() / n_pixels).float().cpu()
    return Curve(kind, order, share, y, torch.trapezoid(y, share, dim=1), evaluator.rows, evaluator.calls)


def deletion(clf, x, maps, target="predicted", **params) -> Curve:
    """Deletion curve: pixels replaced by the baseline in the map's order (see :func:`perturbation_curve`).

    Most relevant first (default): lower AUC = more faithful.
    """
    return perturbation_curve(clf, x, maps, target, kind="deletion", **params)


def insertion(clf, x, maps, target="predicted", **params) -> Curve:
    """Insertion curve: pixels copied from the image onto the baseline in the map's order.

    Most relevant first (default): higher AUC = more faithful.
    """
    return perturbation_curve(clf, x, maps, target, kind="insertion", **params)


# -- MuFidelity -----------------------------------------------------------------------------------
def mufidelity(clf, x, maps, target="predicted", *, n_subsets: int = 32, subset_fraction: float = 0.1,
               baseline="zero", output: str = "prob", batch_size: int = 64, seed: int = 0) -> MuFidelity:
    """MuFidelity: ``corr_S( sum_{i in S} map_i , f(x) - f(x with S replaced by the baseline) )``.

    Parameters
    ----------
    n_subsets : random subsets per image (32).
    subset_fraction : share of the pixels in each subset (0.1); every subset has
        ``max(1, round(fraction * N))`` pixels, drawn uniformly (a seeded pure function of
        ``(seed, image, subset)``, so the result does not depend on ``batch_size``).
    baseline : ``"zero"`` (default), ``"blur"``, ``"mean"``, a number or a tensor.
    output : ``"prob"`` (default) or ``"logit"``. With ``"logit"``, a linear model and the map
        ``w * (x - baseline)``, the correlation is exactly 1.

    Returns a :class:`MuFidelity`; costs ``B * (n_subsets + 1)`` model evaluations.
    """
    n_subsets = _positive_int("n_subsets", n_subsets)
    if n_subsets < 2:
        raise InputError(f"n_subsets={n_subsets}; a correlation needs at least 2 subsets (32 is a good start)")
    if not isinstance(subset_fraction, (int, float)) or not 0 < subset_fraction <= 1:
        raise InputError(f"subset_fraction={subset_fraction!r}; pass a share of the pixels in (0, 1]")
    output = _check_output(output)
    x, flat, tgt = _prepare(clf, x, maps, target, batch_size)
    base = _baseline(x, baseline, seed)
    batch, n_pixels = flat.shape
    size = max(1, round(subset_fraction * n_pixels))
    per_image = n_subsets + 1                     # row 0 of each image: the image itself
    scores = torch.empty(batch * per_image, dtype=torch.float64, device=x.device)
    mass = torch.zeros(batch * per_image, dtype=torch.float64, device=x.device)
    spatial_view = (-1, 1, *x.shape[2:])

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)
        img, s = rows // per_image, rows % per_image
        keys = counter_normal(seed, (row_keys(img), s), n_pixels)
        chosen = torch.zeros(b - a, n_pixels, dtype=torch.bool, device=x.device)
        chosen.scatter_(1, keys.topk(size, dim=1).indices, True)
        chosen &= (s > 0)[:, None]
        xb = torch.where(chosen.view(spatial_view), base[img], x[img])
        scores[a:b] = target_score(clf.forward(xb), tgt[img], output, clf.multilabel).double()
        mass[a:b] = (flat[img] * chosen).sum(dim=1)

    evaluator = Evaluator(clf, batch_size)
    with torch.no_grad(), clf.eval_mode():
        evaluator.run(batch * per_image, work)
    scores, mass = scores.view(batch, per_image).cpu(), mass.view(batch, per_image).cpu()
    drop = scores[:, :1] - scores[:, 1:]
    mass = mass[:, 1:]
    return MuFidelity(pearson(mass, drop).float(), mass.float(), drop.float(), evaluator.rows, evaluator.calls)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of ``[B, n]`` tensors; NaN where a row of either is constant."""
    def centred(t):
        t = t.double()
        c = t - t.mean(dim=1, keepdim=True)
        varies = c.abs().amax(dim=1) > 1e-12 * t.abs().amax(dim=1)
        return c, varies

    (a, va), (b, vb) = centred(a), centred(b)
    denom = (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-300)
    return torch.where(va & vb, (a * b).sum(dim=1) / denom, torch.full_like(denom, math.nan))
