"""The two tabular searches: gradient steps for differentiable models, a genetic search for black boxes.

Both work on rows of a :class:`~counterlens.counterfactual.tabular_box.Box` (every query repeated
for its candidates, or its population), all rows at once, and return points that
:mod:`~counterlens.counterfactual.tabular_refine` then makes hard, sparse and close.

**Gradient search** (``gradient_search``): per row, the hinge loss of the logit margin of the goal
class; every step moves the columns whose loss decrease per unit of cost (``|grad| / cost``, the
cost being 1 per MAD of a numeric feature and 1 per category switch, times the row's feature
weight) is within ``focus`` of the row's best, by a step in cost units that grows by ``growth``
per step, then projects onto the box (relaxed one-hot blocks). Columns at a bound, immutable
features and excluded features never move, so the path follows the cheapest direction first
(for a linear model: the single feature with the largest weight per MAD, the L1-minimal change).
A row stops at its first valid iterate.

**Genetic search** (``genetic_search``): per query a population of hard rows, each a few features
changed to values drawn from the data's marginals truncated to the row's box; fitness is the
MAD-L1 distance plus ``l0_weight`` per changed feature for valid rows, and the shortfall of the
goal class's probability otherwise; elitism, tournament selection, uniform crossover per feature,
mutation that reverts a feature to its original or draws a new value. All queries x individuals go
through the model in one call per generation. Random numbers are a pure function of (seed, query,
individual, generation), so results do not depend on how queries are chunked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attribution.noise import counter_normal
from ..data.tabular import TabularSchema
from .tabular_box import Box, Neighbours

MARGIN = 1e-3        # the hinge aims this far past the boundary (logit units)
RECORD_MARGIN = 5e-4
PROB_EPS = 1e-6      # refinement keeps the goal class this far above its rivals (probabilities)


@dataclass
class Goal:
    """What a row must reach: class ``target [R]`` (-1: any class but ``orig [R]``) with probability
    at least ``threshold`` and above every other class."""

    target: Tensor
    orig: Tensor
    threshold: float
    near: Neighbours | None = None    # optional plausibility requirement (checked in the refinement)

    def rows(self, idx: Tensor) -> Goal:
        return Goal(self.target[idx], self.orig[idx], self.threshold, self.near)

    def goal_class(self, scores: Tensor) -> Tensor:
        other = scores.scatter(1, self.orig[:, None], -math.inf).argmax(dim=1)
        return torch.where(self.target < 0, other, self.target)

    def check(self, probs: Tensor, eps: float = PROB_EPS) -> tuple[Tensor, Tensor, Tensor]:
        """``(valid [R], class [R], score [R])`` from probabilities; ``score`` >= 0 iff valid (up to eps):
        the goal class's lead over the threshold and over its best rival, whichever is smaller."""
        t = self.goal_class(probs)
        p_t = probs.gather(1, t[:, None]).squeeze(1)
        rest = probs.scatter(1, t[:, None], -1.0).amax(dim=1)
        score = torch.minimum(p_t - self.threshold, p_t - rest)
        return (p_t >= self.threshold + eps) & (p_t > rest + eps), t, score

    def hinge(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss [R], valid [R])`` on logits, for the gradient search."""
        t = self.goal_class(logits.detach())
        z_t = logits.gather(1, t[:, None]).squeeze(1)
        margin = z_t - logits.scatter(1, t[:, None], -math.inf).amax(dim=1)
        lp_t = torch.log_softmax(logits, dim=1).gather(1, t[:, None]).squeeze(1)
        log_thr = math.log(self.threshold) if self.threshold > 0 else -math.inf
        loss = F.relu(MARGIN - margin) + F.relu(log_thr + MARGIN - lp_t)
        ok = (margin > RECORD_MARGIN) & (lp_t > log_thr + RECORD_MARGIN)
        return loss, ok.detach()


def uniform(seed: int, keys: tuple[Tensor, ...], numel: int) -> Tensor:
    """Uniform ``(0, 1)`` noise ``[n, numel]``, a pure function of the seed, row keys and position."""
    z = counter_normal(seed, keys, numel)
    return (0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).clamp(1e-7, 1 - 1e-7)


# -- gradient search ------------------------------------------------------------------------------
def gradient_search(forward, box: Box, goal: Goal, weights: Tensor, *, steps: int = 100, step: float = 0.1,
                    growth: float = 1.1, focus: float = 0.8) -> tuple[Tensor, Tensor]:
    """``(x [R, D], found [R])``: each row's first valid iterate (relaxed), or its last one.

    ``forward``: schema-space rows -> logits, differentiable. ``weights [R, F]``: cost multiplier
    per feature and row (``inf``: the feature may not move in this row).
    """
    n = box.x0.shape[0]
    dev = box.x0.device
    x, out = box.x0.clone(), box.x0.clone()
    found = torch.zeros(n, dtype=torch.bool, device=dev)
    size = torch.full((n,), float(step), dtype=box.x0.dtype, device=dev)
    col_cost = weights[:, box.col_feat] * box.unit          # cost of one unit of each column, [R, D]
    for _ in range(steps):
        idx = (~found).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = x[idx].detach().requires_grad_(True)
        with torch.enable_grad():
            loss, ok = goal.rows(idx).hinge(forward(xa))
            (g,) = torch.autograd.grad(loss.sum(), xa)
        with torch.no_grad():
            xa = xa.detach()
            out[idx] = torch.where(ok[:, None], xa, out[idx])
            found[idx] |= ok
            x[idx] = torch.where(ok[:, None], xa, _step(box, idx, xa, g, col_cost[idx], size[idx], focus))
            size[idx] *= growth
    return torch.where(found[:, None], out, x), found


def _step(box: Box, idx: Tensor, xa: Tensor, g: Tensor, col_cost: Tensor, size: Tensor, focus: float) -> Tensor:
    """One step of the rows ``idx``: the numeric columns and one-hot blocks whose loss decrease per
    unit of cost is within ``focus`` of the row's best move by ``size`` cost units (a block moves
    its mass towards its best category, reaching it when ``size`` covers a whole switch)."""
    lo, hi = box.low[idx], box.high[idx]
    direction = -g.sign()
    blocked = ((direction > 0) & (xa >= hi)) | ((direction < 0) & (xa <= lo)) | (direction == 0) | ~box.numeric
    gain = torch.where(blocked, 0.0, g.abs() / col_cost)                      # numeric columns
    block_gain, block_to = [], []
    for a, b in box.blocks:
        gb = g[:, a:b]
        now = (gb * xa[:, a:b]).sum(dim=1)                                    # gradient along the mass as it is
        closed = (hi[:, a:b] <= 0) | (xa[:, a:b] >= 1 - 1e-6)
        best, to = gb.masked_fill(closed, math.inf).min(dim=1)
        block_gain.append(torch.where(torch.isfinite(best), (now - best).clamp_min(0) / (2 * col_cost[:, a]), 0.0))
        block_to.append(to)
    top = gain.amax(dim=1)
    if block_gain:
        top = torch.maximum(top, torch.stack(block_gain, dim=1).amax(dim=1))
    move = (gain >= focus * top[:, None]) & (gain > 0)
    out = xa + torch.where(move, direction * size[:, None] / col_cost, 0.0)
    for (a, b), bg, to in zip(box.blocks, block_gain, block_to):
        t = (size / (2 * col_cost[:, a])).clamp(max=1.0)
        t = torch.where((bg >= focus * top) & (bg > 0), t, 0.0)[:, None]
        vertex = F.one_hot(to, b - a).to(xa.dtype)
        out[:, a:b] = xa[:, a:b] + t * (vertex - xa[:, a:b])
    return box.project(out, idx)


# -- genetic search -------------------------------------------------------------------------------
class Sampler:
    """Draws feature values from the data's marginals (the schema's quantiles and category
    frequencies), truncated to each row's box, with counter-based random numbers."""

    def __init__(self, schema: TabularSchema, box: Box):
        dev = box.x0.device
        self.box, self.schema = box, schema
        self.num_cols = box.numeric.nonzero().squeeze(1)
        table = [f.quantiles for f in schema.features if f.numeric]
        self.quantiles = torch.tensor(table, dtype=box.x0.dtype, device=dev) if table else \
            torch.zeros(0, 2, dtype=box.x0.dtype, device=dev)
        freq = []
        for f in schema.features:
            if not f.numeric:
                freq += [max(v, 1e-3) for v in f.frequencies]
            else:
                freq.append(1.0)
        self.log_freq = torch.tensor(freq, dtype=box.x0.dtype, device=dev).log()

    def draw(self, idx: Tensor, keys: tuple[Tensor, ...], seed: int) -> Tensor:
        """A new value for every column ``[R, D]`` of rows ``idx``: numeric columns from their marginal
        within ``[low, high]``; one-hot blocks a category other than the original's (by frequency)."""
        box = self.box
        lo, hi, x0 = box.low[idx], box.high[idx], box.x0[idx]
        u = uniform(seed, keys, box.x0.shape[1])
        out = x0.clone()
        if self.num_cols.numel():
            q = self.quantiles                                  # [Fn, Q]
            c = self.num_cols
            n_q = q.shape[1] - 1
            cdf_lo = self._cdf(lo[:, c]).clamp(0, 1)
            cdf_hi = self._cdf(hi[:, c]).clamp(0, 1)
            pos = (cdf_lo + u[:, c] * (cdf_hi - cdf_lo)) * n_q
            i0 = pos.floor().clamp(0, n_q - 1).long()
            frac = pos - i0
            qe = q.T[None].expand(len(idx), -1, -1)            # [R, Q, Fn]
            v0 = qe.gather(1, i0[:, None]).squeeze(1)
            v1 = qe.gather(1, (i0 + 1)[:, None]).squeeze(1)
            out[:, c] = torch.minimum(torch.maximum(v0 + frac * (v1 - v0), lo[:, c]), hi[:, c])
        gumbel = -torch.log(-torch.log(u))
        for a, b in box.blocks:
            logits = self.log_freq[a:b] + gumbel[:, a:b]
            logits = logits.masked_fill((hi[:, a:b] <= 0) | (x0[:, a:b] > 0.5), -math.inf)
            pick = logits.argmax(dim=1)
            new = F.one_hot(pick, b - a).to(out.dtype)
            out[:, a:b] = torch.where(torch.isfinite(logits).any(dim=1, keepdim=True), new, x0[:, a:b])
        return out

    def _cdf(self, v: Tensor) -> Tensor:
        """Empirical CDF of numeric columns at ``v [R, Fn]`` from the quantiles (linear between them)."""
        q = self.quantiles.contiguous()                         # [Fn, Q]
        n_q = q.shape[1] - 1
        vt = v.T.contiguous()                                  # [Fn, R]
        hi_i = torch.searchsorted(q, vt, right=False).clamp(1, n_q)
        lo_v, hi_v = q.gather(1, hi_i - 1), q.gather(1, hi_i)
        frac = torch.where(hi_v > lo_v, (vt - lo_v) / (hi_v - lo_v).clamp_min(1e-30), 0.0).clamp(0, 1)
        cdf = (hi_i - 1 + frac) / n_q
        cdf = torch.where(vt <= q[:, :1], 0.0, torch.where(vt >= q[:, -1:], 1.0, cdf))
        return cdf.T


def genetic_search(probs_fn, box: Box, goal: Goal, sampler: Sampler, query: Tensor, *, population: int = 64,
                   generations: int = 40, l0_weight: float = 0.5, mutation: float = 0.15, elite: float = 0.2,
                   patience: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(x [B, P, D], fitness [B, P], valid [B, P], generations run)``: the final population of
    each query (box rows ``[B]``, global query ids ``query [B]``), best first.
    ``probs_fn``: schema-space rows ``[N, D]`` -> probabilities ``[N, K]``."""
    b, d = box.x0.shape
    p, dev = population, box.x0.device
    q_rows = torch.arange(b, device=dev).repeat_interleave(p)   # box row of every individual
    ind = torch.arange(p, device=dev).repeat(b)
    qid = query.to(dev)[q_rows]
    goal_rows = goal.rows(q_rows)

    def keys(gen: int, purpose: int):
        return (qid, ind, torch.full_like(ind, gen * 8 + purpose))

    # start: 1, 2, 3... changed features (geometric), values from the marginals
    u = uniform(seed, keys(0, 0), box.n_features + 1)
    n_change = (1 + (-torch.log(u[:, -1]) / math.log(2.0)).floor()).clamp(max=box.n_features)
    movable = box.movable[q_rows]
    scores = torch.where(movable, u[:, :-1], 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    pick = (rank < n_change[:, None]) & movable
    x = torch.where(pick[:, box.col_feat], sampler.draw(q_rows, keys(0, 1), seed), box.x0[q_rows])
    x = box.project(x, q_rows, hard=True)
    fit, valid = _fitness(probs_fn, box, goal_rows, x, q_rows, l0_weight)
    best, stale, gen = fit.view(b, p).amin(dim=1), 0, 0
    n_elite = max(1, round(elite * p))
    set_key = torch.rand(box.n_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dev)
    base = (torch.arange(b, device=dev) * p)[:, None]
    for gen in range(1, generations + 1):
        # elites: the best individual of each distinct set of changed features (niches survive)
        sets = ((box.feature_delta(x, q_rows) > 1e-6).double() @ set_key).view(b, p)
        order = fit.view(b, p).argsort(dim=1)
        sorted_sets = sets.gather(1, order)
        repeat = ((sorted_sets[:, :, None] == sorted_sets[:, None, :])
                  & torch.ones(p, p, dtype=torch.bool, device=dev).tril(-1)).any(dim=2)
        order = order.gather(1, (fit.view(b, p).gather(1, order) + repeat * INVALID * 4).argsort(dim=1))
        elites = (base + order[:, :n_elite]).flatten()
        n_child = p - n_elite
        child_rows = torch.arange(b, device=dev).repeat_interleave(n_child)
        ck = (query.to(dev)[child_rows], torch.arange(n_child, device=dev).repeat(b))
        r = uniform(seed, ck + (torch.full_like(ck[1], gen * 8 + 2),), 4 + 2 * box.n_features)
        cand = (r[:, :4] * p).long().clamp(max=p - 1) + child_rows[:, None] * p
        fa, fb = fit[cand[:, 0]] <= fit[cand[:, 1]], fit[cand[:, 2]] <= fit[cand[:, 3]]
        pa = torch.where(fa, cand[:, 0], cand[:, 1])
        pb = torch.where(fb, cand[:, 2], cand[:, 3])
        take_a = (r[:, 4:4 + box.n_features] < 0.5)[:, box.col_feat]
        child = torch.where(take_a, x[pa], x[pb])
        mut = r[:, 4 + box.n_features:]
        revert = (mut < mutation / 2)[:, box.col_feat]
        redraw = ((mut >= mutation / 2) & (mut < mutation))[:, box.col_feat]
        fresh = sampler.draw(child_rows, ck + (torch.full_like(ck[1], gen * 8 + 3),), seed)
        child = torch.where(revert, box.x0[child_rows], torch.where(redraw, fresh, child))
        child = box.project(child, child_rows, hard=True)
        child_fit, child_valid = _fitness(probs_fn, box, goal.rows(child_rows), child, child_rows, l0_weight)
        # the new population per query: its elites, then its children
        x = torch.cat([x[elites].view(b, n_elite, d), child.view(b, n_child, d)], dim=1).view(b * p, d)
        fit = torch.cat([fit[elites].view(b, n_elite), child_fit.view(b, n_child)], dim=1).flatten()
        valid = torch.cat([valid[elites].view(b, n_elite), child_valid.view(b, n_child)], dim=1).flatten()
        now = fit.view(b, p).amin(dim=1)
        stale = 0 if bool((now < best - 1e-9).any()) else stale + 1
        best = torch.minimum(best, now)
        if patience and stale >= patience:
            break
    order = fit.view(b, p).argsort(dim=1)
    flat = (base + order).flatten()
    return x[flat].view(b, p, d), fit[flat].view(b, p), valid[flat].view(b, p), gen


INVALID = 1e6


def _fitness(probs_fn, box: Box, goal: Goal, x: Tensor, rows: Tensor, l0_weight: float):
    ok, _, score = goal.check(probs_fn(x))
    delta = box.feature_delta(x, rows)
    cost = delta.sum(dim=1) + l0_weight * (delta > 1e-6).sum(dim=1)
    return torch.where(ok, cost, INVALID - score.clamp(max=0) * INVALID / 2), ok
