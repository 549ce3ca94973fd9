"""Plausible tabular counterfactuals: rows that sit among reference rows of their class.

A counterfactual of class ``t`` is *plausible* when at least ``share`` of its ``n`` nearest
reference rows (usually the training table; MAD-L1 distance) are put in class ``t`` by the model:
the requirement behind the yNN measure. With it, :func:`~counterlens.counterfactual.tabular.
tabular_counterfactual` gets candidates from two sources:

- ``reach``: minimal valid search points pushed further along their own edit (factors 1.5 to 10)
  until they are plausible, then pulled back and pruned while they stay so;
- ``seeds``: the nearest reference rows of the goal class, projected onto the query's constraints
  (immutable features reset, monotone and range limits applied, categories kept valid), then with
  every change reverted or shrunk that is not needed to stay valid and plausible.

Both keep a row only when the model and the neighbours confirm it, so they never return an
implausible row as plausible; the constraints hold because every point is hard-projected.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .tabular_box import Box, Neighbours  # noqa: F401  (Neighbours re-exported)
from .tabular_refine import REACH_FACTORS, check, repair, shrink, sparsify
from .tabular_search import Goal

SHRINK_POINTS = 4   # grid per bisection round when pulling plausible changes back
SHRINK_LEVELS = 1   # rounds (precision 1/5 of each change: every trial costs a neighbour search)


def reach(probs_fn, box: Box, goal: Goal, cand: Tensor, valid: Tensor, sparse: bool = True):
    """Valid rows made plausible too (``goal.near``): pushed further along their own edit until
    they are, then (``sparse``) pulled back and pruned as far as they stay so. ``(x, plausible)``."""
    ok = valid & check(probs_fn, goal, cand) if bool(valid.any()) else valid
    if bool((valid & ~ok).any()):
        cand, ok = repair(probs_fn, box, goal, cand, ok | ~valid, factors=REACH_FACTORS)
        ok = ok & valid
        if sparse:
            cand = shrink(probs_fn, box, goal, cand, ok, points=SHRINK_POINTS, levels=SHRINK_LEVELS)
            cand = sparsify(probs_fn, box, goal, cand, ok)
    return cand, ok


def seeds(probs_fn, box: Box, goal: Goal, q: Tensor, n: int, sparse: bool = True):
    """``n`` candidates per query in ``q`` that start from the reference rows of the goal class nearest
    to it (projected onto its constraints), kept where valid and plausible, then (``sparse``) with
    every change reverted or pulled back that they stay so without. ``(x [Q * n, D], ok [Q * n])``."""
    near, x0 = goal.near, box.x0[q]
    d = torch.cdist(x0 * near.unit, near.ref, p=1)                             # [Q, M]
    g = goal.rows(q)
    t = g.target[:, None]
    fits = torch.where(t >= 0, near.ref_class[None, :] == t, near.ref_class[None, :] != g.orig[:, None])
    d = d.masked_fill(~fits, math.inf)
    dist, idx = d.topk(min(n, d.shape[1]), dim=1, largest=False)
    if idx.shape[1] < n:                                                       # fewer reference rows than n
        pad = n - idx.shape[1]
        idx = torch.cat([idx, idx[:, :1].expand(-1, pad)], 1)
        dist = torch.cat([dist, dist.new_full((len(q), pad), math.inf)], 1)
    rows = q.repeat_interleave(n)
    rbox, rgoal = box.rows(rows), goal.rows(rows)
    x = rbox.project(near.raw[idx.flatten()], hard=True)
    ok = torch.isfinite(dist.flatten()) & check(probs_fn, rgoal, x)
    if sparse and bool(ok.any()):
        x = sparsify(probs_fn, rbox, rgoal, x, ok, bulk=True)
        x = shrink(probs_fn, rbox, rgoal, x, ok, points=SHRINK_POINTS, levels=SHRINK_LEVELS)
        x = sparsify(probs_fn, rbox, rgoal, x, ok)
    return x, ok
