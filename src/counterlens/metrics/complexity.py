"""Complexity of a map, and the completeness check of integrated gradients.

* :func:`sparseness`: Gini index of ``|map|`` (Chalasani et al. 2020, after Hurley & Rickard 2009):
  0 for a constant map, ``1 - 1/N`` for a map with a single non-zero pixel. Higher = sparser.
* :func:`entropy`: Shannon entropy (natural log) of ``p = |map| / sum |map|`` (Bhatt et al. 2020
  "complexity"): ``log N`` for a constant map, 0 for a single pixel. Lower = simpler.
* :func:`completeness_error`: ``sum(IG map) - (f(x) - f(baseline))`` for the target *logit*, the gap
  integrated gradients should close (Sundararajan et al. 2017); reported with every IG map.

Maps are ``[B, *S]`` (any number of spatial axes, flattened); an all-zero map has no
distribution, so both complexity scores are NaN for it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..attribution.base import Evaluator, resolve_targets
from ..attribution.gradients import make_baseline
from ..errors import InputError


def _flat_abs(maps) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).detach().cpu()
    if m.dim() < 2:
        raise InputError(f"maps has shape {tuple(m.shape)}; expected [batch, *spatial] (add the batch axis with maps[None])")
    if not torch.isfinite(m).all():
        raise InputError("maps contains NaN or infinite values; clean the maps before scoring them")
    return m.reshape(m.shape[0], -1).double().abs()


def sparseness(maps) -> torch.Tensor:
    """Gini index of ``|map|`` per row, ``Tensor[B]`` in [0, 1 - 1/N]; NaN for an all-zero map.

    ``G = sum_i (2 i - N - 1) a_(i) / (N sum_i a_i)`` with ``a_(1) <= ... <= a_(N)`` sorted.
    """
    a = _flat_abs(maps).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=torch.float64)
    total = a.sum(dim=1)
    gini = ((2 * i - n - 1) * a).sum(dim=1) / (n * total.clamp(min=1e-300))
    return torch.where(total > 0, gini, torch.full_like(total, math.nan)).float()


def entropy(maps) -> torch.Tensor:
    """Entropy (nats) of the normalised ``|map|`` per row, ``Tensor[B]`` in [0, log N]; NaN for an all-zero map."""
    a = _flat_abs(maps)
    total = a.sum(dim=1, keepdim=True)
    p = a / total.clamp(min=1e-300)
    h = -torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p)).sum(dim=1)
    return torch.where(total[:, 0] > 0, h, torch.full_like(h, math.nan)).float()


def completeness_error(clf, x, maps, target="predicted", *, baseline="zeros", batch_size: int = 64,
                       seed: int = 0, relative: bool = False) -> torch.Tensor:
    """Completeness gap of integrated-gradients maps, ``Tensor[B]``.

    ``sum(map) - (logit_t(x) - logit_t(baseline))`` for the target class ``t``: 0 for exact IG;
    a quadrature with too few ``steps`` leaves a gap. ``baseline`` must be the one the maps were
    computed with (``"zeros"``, ``"blur"``, ``"uniform"`` with the same ``seed``, a number or a
    tensor). ``relative=True`` divides ``|gap|`` by ``|logit_t(x) - logit_t(baseline)|`` (NaN when
    that is 0). Costs ``2 B`` model evaluations.
    """
    x = clf.as_input(x)
    m = torch.as_tensor(maps).detach()
    if m.shape != (x.shape[0], *x.shape[2:]):
        raise InputError(f"maps has shape {tuple(m.shape)}; expected [batch, *spatial] = {(x.shape[0], *x.shape[2:])}")
    tgt = resolve_targets(clf, x, target, batch_size=batch_size)
    base = make_baseline(x, baseline, seed)
    ends = Evaluator(clf, batch_size).scores(torch.cat([x, base]), torch.cat([tgt, tgt])).double().cpu()
    expected = ends[: x.shape[0]] - ends[x.shape[0]:]
    gap = m.reshape(m.shape[0], -1).double().sum(dim=1).cpu() - expected
    if not relative:
        return gap.float()
    return torch.where(expected != 0, gap.abs() / expected.abs().clamp(min=1e-300),
                       torch.full_like(gap, math.nan)).float()
