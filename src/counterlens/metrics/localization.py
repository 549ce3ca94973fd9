"""Localisation of attribution maps against ground-truth masks.

All functions take ``maps: Tensor[B, *S]`` (float, any number of spatial axes, one map per row;
numpy arrays are accepted) and ``masks: Tensor[B, *S]`` (bool; integer masks count non-zero
pixels, float masks pixels above 0.5; a single ``[*S]`` mask is shared by every row). They return
one score per row, ``Tensor[B]`` float32 on the CPU.

* :func:`pointing_game` (Zhang et al. 2016): 1 if the map's maximum lies in the mask, dilated by
  ``tolerance`` pixels (Euclidean ball).
* :func:`relevance_mass` (Arras et al. 2022, "relevance mass accuracy"): share of the positive
  relevance that falls inside the mask.
* :func:`relevance_rank` (Arras et al. 2022, "relevance rank accuracy"): share of the K most
  relevant pixels that lie in the mask, K = mask size.
* :func:`mass_lift`: ``relevance_mass / (mask pixels / image pixels)``: how many times more mass the
  mask gets than a uniform map would give it (uniform -> 1; a map equal to the mask -> 1 / share).

Conventions:

* **Empty mask** (no pixel in the row's mask): there is nothing to localise, every score is NaN.
* **No positive relevance** (an all-zero or all-negative map): it puts no mass anywhere, so
  ``relevance_mass`` and ``mass_lift`` are NaN. Average with ``torch.nanmean`` and report how many
  rows were NaN.
* **Ties** in ``pointing_game`` and ``relevance_rank`` are broken at random *in expectation*: the
  score is the expected hit rate over all tie-breaks, so a constant map scores the mask's share
  (chance level) instead of depending on pixel order.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["mass_lift", "pointing_game", "relevance_mass", "relevance_rank"]


def _check(maps, masks) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Validated ``(maps [B, N] float64, masks [B, N] bool, spatial shape)`` on the CPU."""
    if maps is None or masks is None:
        raise InputError("maps and masks are both required: maps Tensor[B, *spatial], masks Tensor[B, *spatial]")
    m = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).detach().cpu()
    k = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).detach().cpu()
    if m.dim() < 2:
        raise InputError(f"maps has shape {tuple(m.shape)}; expected [batch, *spatial] "
                         "(add the batch axis with maps[None])")
    if not (torch.is_floating_point(m) or m.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)):
        raise InputError(f"maps has dtype {m.dtype}; pass float relevance maps")
    m = m.double()
    if not torch.isfinite(m).all():
        raise InputError("maps contains NaN or infinite values; clean the maps before scoring them")
    if k.shape == m.shape[1:]:
        k = k.unsqueeze(0).expand_as(m)
    if k.shape != m.shape:
        raise InputError(f"masks has shape {tuple(k.shape)} but maps has {tuple(m.shape)}; pass one mask per "
                         "map with the same spatial shape (or one [*spatial] mask for all); a map with a "
                         "channel axis [B, 1, *S] wants maps[:, 0]")
    if k.dtype != torch.bool:
        k = k > 0.5 if torch.is_floating_point(k) else k != 0
    return m.reshape(m.shape[0], -1), k.reshape(k.shape[0], -1), tuple(m.shape[1:])


def _finish(score: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    score = score.clone()
    score[masks.sum(1) == 0] = math.nan
    return score.float()


# -- dilation by a Euclidean ball, any number of axes ---------------------------------------------
def _shift(x: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Shift ``x`` by ``k`` along ``axis`` with zero fill."""
    if k == 0:
        return x
    n = x.shape[axis]
    if abs(k) >= n:
        return torch.zeros_like(x)
    out = torch.zeros_like(x)
    src = x.narrow(axis, 0, n - k) if k > 0 else x.narrow(axis, -k, n + k)
    out.narrow(axis, k, n - k).copy_(src) if k > 0 else out.narrow(axis, 0, n + k).copy_(src)
    return out


def _dilate_line(x: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    """Max over a window of ``2r + 1`` along ``axis`` (a 1D ball)."""
    if r == 0:
        return x
    moved = x.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    out = F.max_pool1d(flat, kernel_size=2 * r + 1, stride=1, padding=r)
    return out.reshape(moved.shape).movedim(-1, axis)


def _dilate_ball(x: torch.Tensor, axes: list[int], budget: int) -> torch.Tensor:
    """Dilate float 0/1 ``x`` over ``axes`` by all offsets with squared length <= ``budget``."""
    if len(axes) == 1:
        return _dilate_line(x, axes[0], math.isqrt(budget))
    first, rest = axes[0], axes[1:]
    reach = math.isqrt(budget)
    out = torch.zeros_like(x)
    for a in range(reach + 1):
        inner = _dilate_ball(x, rest, budget - a * a)
        out = torch.maximum(out, _shift(inner, first, a))
        if a:
            out = torch.maximum(out, _shift(inner, first, -a))
    return out


def _dilate(masks, tolerance: int) -> torch.Tensor:
    """Masks ``[B, *S]`` (bool) dilated by a Euclidean ball of radius ``tolerance`` pixels."""
    x = masks.double()
    return _dilate_ball(x, list(range(1, x.dim())), int(tolerance) ** 2) > 0.5


def expected_in_top(m: torch.Tensor, k: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Expected number of mask pixels among the ``count`` highest values of each row.

    ``m [B, N]`` values, ``k [B, N]`` bool, ``count [B]`` ints in 0..N (0 gives 0). Values tied at
    the ``count``-th place share the remaining slots in proportion (random tie-break, in expectation).
    """
    count = count.to(torch.long).clamp(0, m.shape[1])
    kth = m.sort(dim=1, descending=True).values.gather(1, (count - 1).clamp(min=0).view(-1, 1))
    greater = m > kth
    tied = m == kth
    slots = (count - greater.sum(1)).double()
    inside = (greater & k).sum(1).double() + slots * (tied & k).sum(1).double() / tied.sum(1).double()
    return torch.where(count > 0, inside, torch.zeros_like(inside))


# -- the metrics ----------------------------------------------------------------------------------
def pointing_game(maps, masks, tolerance: int = 0) -> torch.Tensor:
    """1.0 where the map's maximum lies in the mask dilated by ``tolerance`` pixels, else 0.0.

    Parameters
    ----------
    maps : Tensor ``[B, *S]`` float.
    masks : Tensor ``[B, *S]`` bool.
    tolerance : int, default 0
        Radius in pixels (Euclidean) by which the mask is grown before the test; Zhang et al. used 15
        on 224-pixel images.

    Returns ``Tensor[B]``: 1.0 / 0.0; with several tied maxima, the share of them inside the (dilated)
    mask (the expected hit under a random tie-break); NaN for an empty mask.
    """
    if not isinstance(tolerance, (int, np.integer)) or isinstance(tolerance, bool) or tolerance < 0:
        raise InputError(f"tolerance={tolerance!r}; pass a non-negative whole number of pixels")
    m, k, spatial = _check(maps, masks)
    hit_region = k
    if tolerance > 0:
        hit_region = _dilate(k.reshape(-1, *spatial), tolerance).reshape(k.shape)
    top = m == m.max(dim=1, keepdim=True).values
    score = (top & hit_region).sum(1).double() / top.sum(1).double()
    return _finish(score, k)


def _mass(m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Share of positive relevance inside the mask per row (NaN without positive relevance)."""
    pos = m.clamp(min=0)
    total = pos.sum(1)
    return torch.where(total > 0, (pos * k).sum(1) / total.clamp(min=1e-300), torch.full_like(total, math.nan))


def relevance_mass(maps, masks) -> torch.Tensor:
    """Share of the positive relevance inside the mask: ``sum(R+ in mask) / sum(R+)``.

    Relevance mass accuracy (Arras, Osman & Samek 2022). Negative relevance is ignored.
    Returns ``Tensor[B]`` in [0, 1]; NaN for an empty mask or a map with no positive relevance.
    """
    m, k, _ = _check(maps, masks)
    return _finish(_mass(m, k), k)


def relevance_rank(maps, masks) -> torch.Tensor:
    """Share of the K highest-relevance pixels inside the mask, K = the mask's pixel count.

    Relevance rank accuracy (Arras, Osman & Samek 2022), on the signed map. Ties at the K-th value
    count in expectation (a constant map scores the mask's share of the image).
    Returns ``Tensor[B]`` in [0, 1]; NaN for an empty mask.
    """
    m, k, _ = _check(maps, masks)
    size = k.sum(1)
    score = expected_in_top(m, k, size) / size.clamp(min=1).double()
    return _finish(score, k)


def mass_lift(maps, masks) -> torch.Tensor:
    """``relevance_mass / mask share``: 1 for a uniform map, ``1 / share`` for a map equal to the mask.

    Above 1: the map concentrates relevance in the mask; below 1: it avoids it. Unlike relevance mass
    it is comparable between small masks (a marker) and large ones (a lung).
    Returns ``Tensor[B]``; NaN for an empty mask or a map with no positive relevance.
    """
    m, k, _ = _check(maps, masks)
    share = k.sum(1).double() / k.shape[1]
    return _finish(_mass(m, k) / share.clamp(min=1e-300), k)
