"""The constraints of a tabular counterfactual search, per row, in schema space.

A :class:`Box` holds, for every search row (a query, or a candidate of a query), the interval each
schema-space column may take: the permitted range of a numeric feature (widened to include the
row's own value, which may always stay), cut at the original by a monotone constraint and shut by
an immutable one; for a one-hot column 0..1 when the category is allowed, else 0 (the original's
own category is always allowed). :meth:`Box.project` puts any point back inside: relaxed (one-hot
blocks as distributions, for the gradient search) or hard (one category per block, integers,
values in the gap between an original outside the range and the range snapped into the range).
No returned counterfactual skips the hard projection, so none breaks a constraint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.tabular import TabularSchema


@dataclass
class Box:
    x0: Tensor            # [N, D] originals
    low: Tensor           # [N, D] search interval (hull of the permitted range and x0, monotone, immutable)
    high: Tensor
    range_low: Tensor     # [N, D] the permitted range (+-inf outside numeric columns)
    range_high: Tensor
    blocks: list          # (start, stop) of every one-hot block
    integer: Tensor       # [D] bool
    numeric: Tensor       # [D] bool
    col_feat: Tensor      # [D] long: feature of each column
    unit: Tensor          # [D] cost of one unit of change: 1 / scale (numeric), 0.5 (one-hot)
    movable: Tensor       # [N, F] bool: the feature can change at all
    n_features: int

    @classmethod
    def build(cls, schema: TabularSchema, x0: Tensor) -> Box:
        dev, n = x0.device, x0.shape[0]
        inf = math.inf
        low = torch.zeros_like(x0)
        high = torch.ones_like(x0)
        r_low = torch.full_like(x0, -inf)
        r_high = torch.full_like(x0, inf)
        blocks, integer, numeric, unit = [], [], [], []
        movable = torch.zeros(n, len(schema), dtype=torch.bool, device=dev)
        for i, f in enumerate(schema.features):
            sl = schema.slices[f.name]
            v0 = x0[:, sl]
            if f.numeric:
                lo = torch.full_like(v0[:, 0], f.low)
                hi = torch.full_like(v0[:, 0], f.high)
                if f.kind == "integer":
                    lo, hi = lo.ceil(), hi.floor()
                r_low[:, sl.start], r_high[:, sl.start] = lo, hi
                lo, hi = torch.minimum(lo, v0[:, 0]), torch.maximum(hi, v0[:, 0])
                if f.monotone == "increase":
                    lo = v0[:, 0]
                elif f.monotone == "decrease":
                    hi = v0[:, 0]
                if f.immutable:
                    lo = hi = v0[:, 0]
                low[:, sl.start], high[:, sl.start] = lo, hi
                movable[:, i] = hi > lo
                integer.append(f.kind == "integer")
                numeric.append(True)
                unit.append(1.0 / f.scale)
            else:
                blocks.append((sl.start, sl.stop))
                allowed = torch.ones(f.width, dtype=torch.bool, device=dev) if f.allowed is None else \
                    torch.tensor(f.allowed, dtype=torch.bool, device=dev)
                hi = torch.where(allowed[None, :] | (v0 > 0.5), 1.0, 0.0)
                if f.immutable:
                    low[:, sl], hi = v0, v0
                high[:, sl] = hi
                movable[:, i] = (hi.sum(dim=1) > 1.5) & ~torch.tensor(f.immutable, device=dev)
                integer += [False] * f.width
                numeric += [False] * f.width
                unit += [0.5] * f.width
        as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=dev)
        return cls(x0, low, high, r_low, r_high, blocks, as_t(integer, torch.bool), as_t(numeric, torch.bool),
                   schema.column_feature().to(dev), as_t(unit, x0.dtype), movable, len(schema))

    def rows(self, idx: Tensor) -> Box:
        """The box of rows ``idx`` (e.g. every query repeated for its candidates)."""
        return Box(self.x0[idx], self.low[idx], self.high[idx], self.range_low[idx], self.range_high[idx],
                   self.blocks, self.integer, self.numeric, self.col_feat, self.unit, self.movable[idx],
                   self.n_features)

    # -- projection ------------------------------------------------------------------------------
    def project(self, x: Tensor, idx: Tensor | None = None, *, hard: bool = False) -> Tensor:
        """``x [R, D]`` back inside the box of rows ``idx`` (all rows when None).

        Relaxed: clamp, one-hot blocks renormalised to sum 1. Hard: also one category per block
        (the most likely allowed one), integer columns rounded, numeric values that left the
        original but lie outside the permitted range snapped into it, and values within rounding
        of the original reset to it exactly.
        """
        x0, low, high = (t if idx is None else t[idx] for t in (self.x0, self.low, self.high))
        out = torch.minimum(torch.maximum(x, low), high)
        for a, b in self.blocks:
            q = out[:, a:b]
            if hard:
                pick = q.masked_fill(high[:, a:b] <= 0, -1.0).argmax(dim=1)
                out[:, a:b] = torch.nn.functional.one_hot(pick, b - a).to(out.dtype)
            else:
                s = q.sum(dim=1, keepdim=True)
                out[:, a:b] = torch.where(s > 1e-6, q / s.clamp_min(1e-6), x0[:, a:b])
        if not hard:
            return out
        num = self.numeric
        r_lo, r_hi = (t if idx is None else t[idx] for t in (self.range_low, self.range_high))
        scale = torch.where(num, 1.0 / self.unit, 1.0)
        same = (out - x0).abs() <= 1e-6 * scale
        out = torch.where(num & same, x0, out)
        moved = num & ~same
        snapped = torch.minimum(torch.maximum(out, r_lo), r_hi)
        # into the permitted range, unless that is on the other side of the original (monotone)
        snapped = torch.where((snapped >= low) & (snapped <= high), snapped, x0)
        out = torch.where(moved, snapped, out)
        rounded = out.round()
        rounded = torch.where(rounded < low, out.ceil(), rounded)
        rounded = torch.where(rounded > high, out.floor(), rounded)
        rounded = torch.where((rounded >= low) & (rounded <= high), rounded, x0)
        return torch.where(self.integer & moved, rounded, out)

    # -- distances -------------------------------------------------------------------------------
    def feature_gap(self, a: Tensor, b: Tensor) -> Tensor:
        """``[..., F]`` distance per feature between rows ``a`` and ``b`` (broadcast; numeric:
        |d| / scale; categorical: half the L1 of the block's difference, 1 for a hard switch)."""
        per_col = (a - b).abs() * self.unit
        out = torch.zeros(*per_col.shape[:-1], self.n_features, dtype=per_col.dtype, device=per_col.device)
        return out.index_add_(-1, self.col_feat, per_col)

    def feature_delta(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """``[R, F]`` cost of each feature's change from the original (see :meth:`feature_gap`)."""
        return self.feature_gap(x, self.x0 if idx is None else self.x0[idx])

    def changed(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """``[R, F]`` bool: features that differ from the original (hard rows)."""
        return self.feature_delta(x, idx) > 1e-6

    def revert(self, x: Tensor, features: Tensor, idx: Tensor | None = None) -> Tensor:
        """``x`` with the feature ``features [R]`` of each row (-1: none) set back to the original."""
        x0 = self.x0 if idx is None else self.x0[idx]
        hit = self.col_feat[None, :] == features[:, None]
        return torch.where(hit, x0, x)


class Neighbours:
    """Plausibility: a row of class ``t`` is plausible when at least ``share`` of its ``n`` nearest
    reference rows (MAD-L1 distance, as :func:`counterlens.metrics.tabular.ynn` measures it) are
    put in class ``t`` by the model (``ref_class``)."""

    def __init__(self, reference: Tensor, ref_class: Tensor, unit: Tensor, n: int, share: float,
                 chunk: int = 2 ** 24):
        self.unit, self.n, self.share = unit, int(n), float(share)
        self.raw, self.ref = reference, reference * unit
        self.ref_class = ref_class
        self.chunk = max(1, chunk // max(1, self.ref.shape[0]))     # rows per distance matrix

    def fraction(self, x: Tensor, cls: Tensor) -> Tensor:
        """``[R]`` share of each row's ``n`` nearest reference rows in class ``cls [R]``."""
        out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        for a in range(0, x.shape[0], self.chunk):
            d = torch.cdist(x[a:a + self.chunk] * self.unit, self.ref, p=1)
            idx = d.topk(self.n, dim=1, largest=False).indices
            out[a:a + self.chunk] = (self.ref_class[idx] == cls[a:a + self.chunk, None]).to(x.dtype).mean(dim=1)
        return out

    def __call__(self, x: Tensor, cls: Tensor) -> Tensor:
        return self.fraction(x, cls) >= self.share - 1e-9
