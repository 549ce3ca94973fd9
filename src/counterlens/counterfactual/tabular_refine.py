"""From search points to returned counterfactuals: hard, valid, sparse, close, diverse.

Every step is batched over rows (each a model call on all rows still concerned) and only keeps a
change that the model confirms valid, so it never turns a valid row invalid:

- ``repair``: a row that is not valid once made hard (one category per block, integers) is pushed
  further along its own edit, ``x0 + a (x - x0)`` for growing ``a``, and keeps the first valid one;
- ``sparsify``: every changed feature, cheapest first, is set back to its original value when the
  row stays valid without it (so no returned change is redundant on its own);
- ``shrink``: every remaining numeric change, largest first, is pulled towards its original
  value (a grid of fractions, refined) for the smallest change that stays valid;
- ``select``: per query, ``k`` distinct valid rows: the cheapest first (MAD-L1 plus a cost per
  changed feature), then rows whose set of changed features differs from every row already
  taken, each minimising its cost minus ``diversity`` times its distance to the nearest row taken;
  near copies of a row taken (same features, values within a quarter of the change) are dropped.

When the goal carries a plausibility requirement (``Goal.near``), "valid" in every step means
valid and plausible.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .tabular_box import Box
from .tabular_search import Goal

REPAIR_FACTORS = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
SAME_SET_GAP = 0.25   # same features changed and closer than this share of the smaller change: a near copy
REACH_FACTORS = (1.5, 2.5, 5.0, 10.0)   # coarse: the shrink pass that follows pulls each change back


def check(probs_fn, goal: Goal, x: Tensor) -> Tensor:
    """``[R]`` valid (and plausible, when the goal asks for it)."""
    ok, cls, _ = goal.check(probs_fn(x))
    if goal.near is not None and bool(ok.any()):
        idx = ok.nonzero().squeeze(1)                  # neighbours only where the model already agrees
        ok = ok.clone()
        ok[idx] = goal.near(x[idx], cls[idx])
    return ok


def repair(probs_fn, box: Box, goal: Goal, x: Tensor, valid: Tensor,
           factors=REPAIR_FACTORS) -> tuple[Tensor, Tensor]:
    """Invalid rows pushed further along their edit (hard); ``(x, valid)``."""
    idx = (~valid).nonzero().squeeze(1)
    if idx.numel() == 0:
        return x, valid
    x, valid = x.clone(), valid.clone()
    x0, edit = box.x0[idx], x[idx] - box.x0[idx]
    moved = edit.abs().amax(dim=1) > 0
    idx, x0, edit = idx[moved], x0[moved], edit[moved]
    if idx.numel() == 0:
        return x, valid
    n_f = len(factors)
    factors = torch.tensor(factors, dtype=x.dtype, device=x.device)
    rows = idx.repeat_interleave(n_f)
    trial = x0.repeat_interleave(n_f, dim=0) + factors.repeat(idx.numel())[:, None] * edit.repeat_interleave(n_f, dim=0)
    trial = box.project(trial, rows, hard=True)
    ok = check(probs_fn, goal.rows(rows), trial).view(-1, n_f)
    first = torch.where(ok, torch.arange(n_f, device=x.device), n_f).amin(dim=1)
    hit = first < n_f
    pick = torch.arange(idx.numel(), device=x.device) * n_f + first.clamp(max=n_f - 1)
    x[idx[hit]] = trial[pick[hit]]
    valid[idx[hit]] = True
    return x, valid


def sparsify(probs_fn, box: Box, goal: Goal, x: Tensor, valid: Tensor, passes: int = 3, bulk: bool = False) -> Tensor:
    """Valid rows with every change that is not needed for validity reverted, cheapest first; again
    while a pass reverts something (on a non-monotone model, a revert can free another).
    ``bulk``: first revert, per row, the longest run of its cheapest changes that can go together
    (found by bisection: a few model calls instead of one per change, for rows with many changes)."""
    idx = valid.nonzero().squeeze(1)
    cur = x[idx].clone()
    if bulk and idx.numel():
        cur = _revert_cheapest(probs_fn, box, goal, cur, idx)
    for _ in range(passes):
        if idx.numel() == 0:
            break
        delta = box.feature_delta(cur, idx)
        changed = delta > 1e-6
        order = delta.masked_fill(~changed, math.inf).argsort(dim=1)
        n_changed = changed.sum(dim=1)
        reverted = torch.zeros(idx.numel(), dtype=torch.bool, device=x.device)
        for s in range(int(n_changed.max())):
            act = (s < n_changed).nonzero().squeeze(1)
            trial = box.revert(cur[act], order[act, s], idx[act])
            ok = check(probs_fn, goal.rows(idx[act]), trial)
            cur[act] = torch.where(ok[:, None], trial, cur[act])
            reverted[act] |= ok
        if not bool(reverted.any()):
            break
    out = x.clone()
    out[idx] = cur
    return out


def _revert_cheapest(probs_fn, box: Box, goal: Goal, cur: Tensor, idx: Tensor) -> Tensor:
    """``cur`` (rows ``idx``, valid) with its ``p`` cheapest changes reverted, ``p`` per row the largest
    found by bisection for which the row stays valid."""
    delta = box.feature_delta(cur, idx)
    changed = delta > 1e-6
    rank = delta.masked_fill(~changed, math.inf).argsort(dim=1).argsort(dim=1)     # 0 = cheapest change
    x0 = box.x0[idx]
    lo = torch.zeros(idx.numel(), dtype=torch.long, device=cur.device)
    hi = changed.sum(dim=1) - 1          # at least one change stays
    g = goal.rows(idx)
    while True:
        act = (lo < hi).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        mid = (lo[act] + hi[act] + 1) // 2
        mask = (rank[act] < mid[:, None])[:, box.col_feat]
        ok = check(probs_fn, g.rows(act), torch.where(mask, x0[act], cur[act]))
        lo[act] = torch.where(ok, mid, lo[act])
        hi[act] = torch.where(ok, hi[act], mid - 1)
    mask = (rank < lo[:, None])[:, box.col_feat]
    return torch.where(mask, x0, cur)


def shrink(probs_fn, box: Box, goal: Goal, x: Tensor, valid: Tensor, points: int = 8, levels: int = 2) -> Tensor:
    """Valid rows with each numeric change pulled towards the original (largest change first): per
    feature, ``levels`` rounds of a grid of ``points`` fractions of the change, each round in one
    model call, keep the smallest valid fraction (precision ``(points + 1) ** -levels``)."""
    idx = valid.nonzero().squeeze(1)
    if idx.numel() == 0 or levels <= 0:
        return x
    cur = x[idx].clone()
    delta = box.feature_delta(cur, idx)
    numeric_feature = torch.zeros(box.n_features, dtype=torch.bool, device=x.device)
    numeric_feature[box.col_feat[box.numeric]] = True
    changed = (delta > 1e-6) & numeric_feature
    order = delta.masked_fill(~changed, -1.0).argsort(dim=1, descending=True)
    n_changed = changed.sum(dim=1)
    grid = torch.arange(1, points + 1, dtype=x.dtype, device=x.device) / (points + 1)
    for s in range(int(n_changed.max())):
        act = (s < n_changed).nonzero().squeeze(1)
        rows = idx[act]
        n = rows.numel()
        cols = box.col_feat[None, :] == order[act, s][:, None]
        x0, start = box.x0[rows], cur[act]
        lo = torch.zeros(n, dtype=x.dtype, device=x.device)
        hi = torch.ones_like(lo)
        best = start.clone()
        g = goal.rows(rows.repeat_interleave(points))
        for _ in range(levels):
            frac = (lo[:, None] + grid[None, :] * (hi - lo)[:, None]).flatten()      # [n * points]
            r = torch.arange(n, device=x.device).repeat_interleave(points)
            trial = torch.where(cols[r], x0[r] + frac[:, None] * (start[r] - x0[r]), start[r])
            trial = box.project(trial, rows[r], hard=True)
            ok = check(probs_fn, g, trial).view(n, points)
            first = torch.where(ok, torch.arange(points, device=x.device), points).amin(dim=1)
            hit = first < points
            pick = torch.arange(n, device=x.device) * points + first.clamp(max=points - 1)
            best = torch.where(hit[:, None], trial[pick], best)
            f = frac.view(n, points)
            new_hi = torch.where(hit, f.gather(1, first.clamp(max=points - 1)[:, None]).squeeze(1), hi)
            prev = torch.where(first > 0, f.gather(1, (first - 1).clamp(min=0)[:, None]).squeeze(1), lo)
            lo = torch.where(hit, prev, f[:, -1])
            hi = new_hi
        cur[act] = best
    out = x.clone()
    out[idx] = cur
    return out


def select(box: Box, x: Tensor, valid: Tensor, k: int, l0_weight: float = 0.0,
           diversity: float = 0.0, prefer: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(chosen [B, k] row indices into M, present [B, k])`` from ``x [B, M, D]``, ``valid [B, M]``
    (box rows: query ``b`` candidate ``m`` is row ``b * M + m``); the cost of a row is its MAD-L1
    distance plus ``l0_weight`` per changed feature. The first pick is the cheapest row; each next
    one minimises its cost minus ``diversity`` times its distance (same measure) to the nearest row
    already taken, among rows whose set of changed features is new when there are any; valid rows
    outside ``prefer [B, M]`` (e.g. not plausible) only when no preferred one is left. A row that
    changes the same features as one taken and lies within ``SAME_SET_GAP`` of the smaller change
    of the two (MAD-L1) is a near copy and never taken: a query may get fewer than ``k``."""
    b, m, d = x.shape
    dev = x.device
    flat = x.reshape(b * m, d)
    delta = box.feature_delta(flat).view(b, m, -1)
    changed = (delta > 1e-6).to(torch.float64)
    cost = delta.sum(dim=2) + l0_weight * changed.sum(dim=2)
    # exact duplicates (a later one of the same point is dropped)
    same = (x[:, :, None, :] - x[:, None, :, :]).abs().amax(dim=3) <= 1e-6 * (1 + x.abs().amax(dim=2))[:, :, None]
    key = torch.where(valid, cost, math.inf)
    rank = key.argsort(dim=1).argsort(dim=1)
    earlier = rank[:, None, :] < rank[:, :, None]         # [B, i, j]: j comes before i
    dup = (same & earlier & valid[:, None, :]).any(dim=2)
    usable = valid & ~dup
    same_set = (changed[:, :, None, :] == changed[:, None, :, :]).all(dim=3)   # [B, i, j]
    l1, n_diff = _pair_cost(box, x)                                         # [B, i, j]
    pair = l1 + l0_weight * n_diff
    # near copies: the same features changed, and less than SAME_SET_GAP of the smaller change apart
    l1_cost = delta.sum(dim=2)
    near_copy = same_set & (l1 < SAME_SET_GAP * torch.minimum(l1_cost[:, :, None], l1_cost[:, None, :]))
    nearest = torch.full((b, m), math.inf, dtype=x.dtype, device=dev)
    chosen = torch.zeros(b, k, dtype=torch.long, device=dev)
    present = torch.zeros(b, k, dtype=torch.bool, device=dev)
    taken = torch.zeros(b, m, dtype=torch.bool, device=dev)
    ar = torch.arange(b, device=dev)
    for slot in range(k):
        repeat_set = (same_set & taken[:, None, :]).any(dim=2)
        score = cost + torch.where(repeat_set, 1e6, 0.0)
        if prefer is not None:
            score = score + torch.where(prefer, 0.0, 1e8)
        if diversity and slot:
            score = score - diversity * nearest
        copy = (near_copy & taken[:, None, :]).any(dim=2)
        score = torch.where(usable & ~taken & ~copy, score, math.inf)
        best = score.argmin(dim=1)
        ok = torch.isfinite(score.gather(1, best[:, None]).squeeze(1))
        chosen[:, slot], present[:, slot] = best, ok
        taken[ar[ok], best[ok]] = True
        nearest = torch.where(ok[:, None], torch.minimum(nearest, pair[ar, best]), nearest)
    return chosen, present


def _pair_cost(box: Box, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(l1 [B, M, M], n_diff [B, M, M])`` between the rows of each query: MAD-L1 distance and the
    number of features that differ, in memory-bounded groups of queries."""
    b, m, d = x.shape
    l1 = torch.empty(b, m, m, dtype=x.dtype, device=x.device)
    n_diff = torch.empty_like(l1)
    step = max(1, 2 ** 24 // max(1, m * m * d))
    for a in range(0, b, step):
        per_feat = box.feature_gap(x[a:a + step, :, None, :], x[a:a + step, None, :, :])
        l1[a:a + step] = per_feat.sum(dim=3)
        n_diff[a:a + step] = (per_feat > 1e-6).sum(dim=3)
    return l1, n_diff
