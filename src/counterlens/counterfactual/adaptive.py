"""The adaptive schedule of the counterfactual search (the default): one run of steps in which
every row's distance weight ``lam`` follows its own validity step by step.

After a step whose iterate is valid, ``lam`` grows by ``LAM_UP`` (pull harder towards the original);
after an invalid one it shrinks by ``LAM_DOWN`` (push harder towards the target). A row therefore
first walks to the decision boundary (``lam`` falls geometrically until the prediction loss wins),
then slides along it towards the original, crossing it back and forth while its best valid iterate
(smallest elastic distance) is kept. A row stops when that best distance has not improved by
``IMPROVE_TOL`` for ``patience`` steps, or after ``steps`` steps; finished rows leave the batch, so a
chunk costs as many model evaluations as its rows actually run.

Compared with the bisection schedule (``schedule="bisection"``: several full optimisations, one per
lambda), this reaches a valid counterfactual in about as many steps as the hand-written loop that
stops at the first valid step, and spends a few dozen more on making it small.
"""
from __future__ import annotations

import math

import torch

from .constraints import elastic_distance, project, rows_of

LAM_UP, LAM_DOWN = 1.25, 0.6     # per-step factors of lam after a valid / an invalid step
IMPROVE_TOL = 1e-2               # relative decrease of the best valid distance that counts as progress
MOMENTUM = 0.9
ETA_DECAY = 0.5            # step-size factor each time a row falls back across the boundary
COMPACT_EVERY = {"cpu": 1}       # drop finished rows every step on the CPU, every 8 steps elsewhere


def run_adaptive(search, x0, tgt, orig, low, high, mask, img, cand) -> dict:
    """Optimise one chunk of rows (see the module docstring); the same outputs as the bisection run."""
    p, r, dev = search.p, x0.shape[0], x0.device
    init, step_size, state, lam0, grad_mask = search.start(x0, tgt, orig, low, high, mask, img, cand)
    patience = p["early_stop"] or p["steps"]

    # outputs, written when a row leaves the batch
    out_x, out_found = x0.clone(), torch.zeros(r, dtype=torch.bool, device=dev)
    out_lam, out_iters = lam0.clone(), torch.zeros(r, dtype=torch.long, device=dev)
    out_min_lam = lam0.clone()
    # the state of the rows still running (``rows``: their indices in the chunk)
    rows = torch.arange(r, device=dev)
    par, m = init.clone(), torch.zeros_like(init)
    lam, min_lam = lam0.clone(), lam0.clone()
    best_x, fallback_x = x0.clone(), x0.clone()
    best_dist = torch.full((r,), math.inf, device=dev)
    best_lam, fallback_lam = lam0.clone(), lam0.clone()
    fallback_score = torch.full((r,), math.inf, device=dev)
    stall = torch.zeros(r, dtype=torch.long, device=dev)
    frozen, stop_step = torch.zeros(r, dtype=torch.bool, device=dev), torch.zeros(r, dtype=torch.long, device=dev)
    eta, was_valid = torch.ones(r, device=dev), torch.zeros(r, dtype=torch.bool, device=dev)
    gm, ss = grad_mask, step_size
    compact = COMPACT_EVERY.get(dev.type, 8)
    one = (-1,) + (1,) * (x0.dim() - 1)

    def sub(t):
        return None if t is None else rows_of(t, rows)

    view = state               # the whole chunk's per-row tensors; ``local``: those of the rows still running
    local = dict(view)
    for step in range(1, p["steps"] + 1):
        ids = torch.arange(rows.shape[0], device=dev)
        pa = par.detach().requires_grad_(True)
        with torch.enable_grad():
            xp = search._to_data(pa, ids, local)
            obj, _, dist, strict, violation = search._objective(xp, ids, lam, local)
            (g,) = torch.autograd.grad(obj.sum(), pa)
        with torch.no_grad():
            xp, live = xp.detach(), ~frozen        # frozen: finished, waiting for the next compaction
            better = live & strict & (dist < best_dist)
            progress = strict & (dist < best_dist * (1 - IMPROVE_TOL))
            best_x = torch.where(better.view(one), xp, best_x)
            best_dist = torch.where(better, dist, best_dist)
            best_lam = torch.where(better, lam, best_lam)
            closer = live & (violation < fallback_score)
            fallback_x = torch.where(closer.view(one), xp, fallback_x)
            fallback_score = torch.where(closer, violation, fallback_score)
            fallback_lam = torch.where(closer, lam, fallback_lam)
            found = torch.isfinite(best_dist)
            stall = torch.where(progress | ~found, 0, stall + 1)
            lam = torch.where(live, torch.where(strict, lam * LAM_UP, lam * LAM_DOWN), lam)
            # finer steps each time the row falls back across the boundary (it is oscillating around it)
            eta = torch.where(live & was_valid & ~strict, eta * ETA_DECAY, eta)
            was_valid = strict
            min_lam = torch.minimum(min_lam, lam)
            if gm is not None:
                g = g * gm
            # momentum on the gradient, each step scaled so that its largest element moves by lr (of the
            # range): elements move in proportion to their gradient, so the edit stays concentrated
            # where it matters (Adam's per-element normalisation would move every element by lr)
            m = MOMENTUM * m + (1 - MOMENTUM) * g
            m_hat = m / (1 - MOMENTUM ** step)
            par = pa.detach() - (ss * eta[:, None]) * m_hat / m_hat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
            if not search.latent:
                par = project(par.view_as(xp), local["x0"], local["low"], local["high"], local["mask"]).flatten(1)
            now = live & ((found & (stall >= patience)) | (step == p["steps"]))
            stop_step = torch.where(now, step, stop_step)
            frozen = frozen | now
            if (step % compact and step < p["steps"]) or not bool(frozen.any()):
                continue
            finished = frozen
            done_rows = rows[finished]
            out_x[done_rows] = torch.where(found[finished].view(one), best_x[finished], fallback_x[finished])
            out_found[done_rows] = found[finished]
            out_lam[done_rows] = torch.where(found[finished], best_lam[finished], fallback_lam[finished])
            out_iters[done_rows] = stop_step[finished]
            out_min_lam[done_rows] = min_lam[finished]
            keep = ~finished
            if not bool(keep.any()):
                break
            rows = rows[keep]
            par, m, lam, min_lam = par[keep], m[keep], lam[keep], min_lam[keep]
            best_x, fallback_x, best_dist = best_x[keep], fallback_x[keep], best_dist[keep]
            best_lam, fallback_lam, fallback_score, stall = best_lam[keep], fallback_lam[keep], fallback_score[keep], \
                stall[keep]
            frozen, stop_step, eta, was_valid = frozen[keep], stop_step[keep], eta[keep], was_valid[keep]
            ss = ss if ss.shape[0] == 1 else ss[keep]
            gm = None if gm is None else gm[keep]
            local = {k: sub(v_) if k != "protos" else (None if v_ is None else v_[rows]) for k, v_ in view.items()}
    return {"x": out_x, "found": out_found, "lam": out_lam, "iterations": out_iters,
            "lam_tried": torch.stack([lam0, out_min_lam], dim=1),
            "lam_valid": torch.stack([out_found, out_found], dim=1)}


PRUNE_GRID = 8            # edits tried per row and pruning round
PRUNE_ROWS = 1 << 20       # elements per model call of the pruning pass (several grid points per call for small inputs)


def prune_edits(search, x0, x_cf, found, tgt, orig, low, high, mask) -> torch.Tensor:
    """Drop the smallest changes of every valid counterfactual while it stays valid.

    Per row, the elements of ``d = x_cf - x0`` are ranked by ``|d| / (high - low)``; the edits that
    keep only the top ``k`` are evaluated for a geometric grid of ``k`` (forward passes only; for small
    inputs several grid points per model call, up to ``PRUNE_ROWS`` elements), then for a linear grid between the largest invalid
    and the smallest valid ``k`` of the first round. Each row keeps its valid variant with the smallest
    elastic distance (the unpruned edit is always one of them), so pruning never makes an edit larger
    or a valid row invalid. Rows without a valid counterfactual are returned unchanged.
    """
    r = x0.shape[0]
    if not bool(found.any()):
        return x_cf
    scale = high - low
    d = (x_cf - x0).flatten(1)
    n = d.shape[1]
    score = (d / scale.expand_as(x0).flatten(1) if scale.numel() > 1 else d / scale.flatten()[0]).abs()
    rank = torch.empty_like(score, dtype=torch.long)
    rank.scatter_(1, score.argsort(dim=1, descending=True),
                  torch.arange(n, device=d.device).expand(r, n).contiguous())
    nonzero = (score > 0).sum(dim=1).clamp_min(1)
    best = x_cf.clone()
    best_dist = torch.where(found, _elastic(search, x_cf, x0, scale), torch.full_like(score[:, 0], math.inf))
    lo = torch.zeros(r, device=d.device)                       # a k known to be invalid (0: the original)
    hi = nonzero.to(torch.float32)                             # a k known to be valid (everything)
    for rnd in range(2):
        if rnd == 0:   # geometric: 1 .. nonzero
            frac = torch.logspace(-3, 0, PRUNE_GRID, device=d.device)
            ks = (frac[None, :] * hi[:, None]).ceil()
        else:          # linear between the bracket of the first round
            frac = torch.linspace(0, 1, PRUNE_GRID + 2, device=d.device)[1:-1]
            ks = (lo[:, None] + frac[None, :] * (hi - lo)[:, None]).ceil()
        ks = torch.minimum(ks.clamp_min(1), nonzero[:, None].to(ks.dtype))
        ok = torch.zeros(r, PRUNE_GRID, dtype=torch.bool, device=d.device)
        per_call = max(1, min(PRUNE_GRID, PRUNE_ROWS // max(1, r * n)))    # grid points per model call
        for j0 in range(0, PRUNE_GRID, per_call):
            js = range(j0, min(PRUNE_GRID, j0 + per_call))
            # [len(js) * r] variants, grid point major: exactly x_cf or x0 in every element
            keep = torch.cat([rank < ks[:, j:j + 1] for j in js])
            xv = torch.where(keep, x_cf.flatten(1).repeat(len(js), 1), x0.flatten(1).repeat(len(js), 1))
            xv = xv.view(len(js) * r, *x0.shape[1:])
            with torch.no_grad():
                logits = search.clf.forward(xv)
            for q, j in enumerate(js):
                xj = xv[q * r:(q + 1) * r]
                ok[:, j] = search.is_valid(logits[q * r:(q + 1) * r], tgt, orig) & found
                dist = _elastic(search, xj, x0, scale)
                take = ok[:, j] & (dist < best_dist)
                best = torch.where(take.view((-1,) + (1,) * (x0.dim() - 1)), xj, best)
                best_dist = torch.where(take, dist, best_dist)
        # the bracket: the largest invalid k below the smallest valid k
        k_valid = torch.where(ok, ks, torch.full_like(ks, math.inf)).amin(dim=1)
        hi = torch.where(torch.isfinite(k_valid), torch.minimum(hi, k_valid), hi)
        lo = torch.where(~ok & (ks < hi[:, None]), ks, torch.zeros_like(ks)).amax(dim=1).maximum(lo)
    return best


def _elastic(search, xv, x0, scale) -> torch.Tensor:
    p = search.p
    dd = (xv - x0) / scale
    return elastic_distance(dd, p["l1"], p["l2"]) if (p["l1"] or p["l2"]) else elastic_distance(dd, 1.0, 1.0)
