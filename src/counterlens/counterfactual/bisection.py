"""The bisection schedule of the counterfactual search (``schedule="bisection"``).

Per row, ``lam_steps`` Adam optimisations ("rounds"), ``lam`` bisected on its logarithm between
them: up after a valid round, down after an invalid one, by ``lam_factor``, its square, its cube,
... until a valid and an invalid ``lam`` bracket it, then geometric means, for the *largest* weight
that still gives a valid counterfactual. A round ends after ``steps`` steps or when the row's
objective has not improved by ``IMPROVE_TOL`` for ``early_stop`` steps; the row then starts its
next round at once (where it ended, ``warm_start``), independently of the other rows, and rows
that finished all rounds are no longer evaluated. ``self`` is the search (``search._Search``).
"""
from __future__ import annotations

import math

import torch

from .constraints import project, rows_of

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
REFRESH = {"cpu": 1}     # look up the active rows every step on the CPU, every 10 (one sync) elsewhere
IMPROVE_TOL = 1e-2       # relative decrease of the objective that counts as progress for the early stop


def run_bisection(self, x0, tgt, orig, low, high, mask, img, cand) -> dict:
    p, r = self.p, x0.shape[0]
    init, step_size, state, lam, grad_mask = self.start(x0, tgt, orig, low, high, mask, img, cand)
    dev, n_rounds, early = x0.device, p["lam_steps"], p["early_stop"] or 0
    lam_lo, lam_hi = torch.zeros_like(lam), torch.full_like(lam, math.inf)
    best_x, fallback_x = x0.clone(), x0.clone()
    best_dist, fallback_score = torch.full_like(lam, math.inf), torch.full_like(lam, math.inf)
    best_lam, fallback_lam = lam.clone(), lam.clone()
    lam_tried = torch.zeros(r, n_rounds, device=dev)
    lam_valid = torch.zeros(r, n_rounds, dtype=torch.bool, device=dev)
    lam_tried[:, 0] = lam
    # per-row state: each row runs its own rounds; a row that ends a round starts its next one at
    # once, so the chunk runs as long as its slowest row, not the sum of every round's slowest row
    par, m, v = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
    t = torch.zeros(r, device=dev)                         # Adam steps in the current round
    rnd = torch.zeros(r, dtype=torch.long, device=dev)     # current round
    iters = torch.zeros(r, dtype=torch.long, device=dev)
    best_obj, stall = torch.full_like(lam, math.inf), torch.zeros_like(iters)
    round_valid, done = torch.zeros(r, dtype=torch.bool, device=dev), torch.zeros(r, dtype=torch.bool, device=dev)
    refresh = REFRESH.get(dev.type, 10)
    idx = torch.arange(r, device=dev)
    for step in range(n_rounds * p["steps"]):
        if step % refresh == 0:
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
        pa = par[idx].detach().requires_grad_(True)
        lam_i = lam[idx]
        with torch.enable_grad():
            xp = self._to_data(pa, idx, state)
            obj, _, sel, strict, violation = self._objective(xp, idx, lam_i, state)
            (g,) = torch.autograd.grad(obj.sum(), pa)
        with torch.no_grad():
            act, xp = ~done[idx], xp.detach()
            one = (-1,) + (1,) * (xp.dim() - 1)
            # the best valid iterate (smallest distance) and, for rows never valid, the closest one
            # (torch.where rather than boolean indexing: no device sync per step)
            upd = act & strict & (sel < best_dist[idx])
            best_x[idx] = torch.where(upd.view(one), xp, best_x[idx])
            best_dist[idx] = torch.where(upd, sel, best_dist[idx])
            best_lam[idx] = torch.where(upd, lam_i, best_lam[idx])
            rv = round_valid[idx] | (act & strict)
            upd = act & (violation < fallback_score[idx])
            fallback_x[idx] = torch.where(upd.view(one), xp, fallback_x[idx])
            fallback_score[idx] = torch.where(upd, violation, fallback_score[idx])
            fallback_lam[idx] = torch.where(upd, lam_i, fallback_lam[idx])
            # early stop of the round on a stalled objective
            improved = obj < best_obj[idx] - IMPROVE_TOL * best_obj[idx].abs() - 1e-9
            b_obj = torch.minimum(best_obj[idx], obj)
            st = torch.where(improved, 0, stall[idx] + 1)
            # Adam, then the projection
            if grad_mask is not None:
                g = g * grad_mask[idx]
            m_i, v_i, t_i = m[idx], v[idx], t[idx] + 1
            m_new = BETAS[0] * m_i + (1 - BETAS[0]) * g
            v_new = BETAS[1] * v_i + (1 - BETAS[1]) * g * g
            m_hat = m_new / (1 - BETAS[0] ** t_i)[:, None]
            v_hat = v_new / (1 - BETAS[1] ** t_i)[:, None]
            p_new = pa.detach() - step_size[idx] * m_hat / (v_hat.sqrt() + ADAM_EPS)
            if not self.latent:
                p_new = project(p_new.view_as(xp), x0[idx], rows_of(low, idx), rows_of(high, idx),
                                None if mask is None else mask[idx]).flatten(1)
            iters[idx] += act.long()
            # the end of a round: bisection on log lambda (up after a valid round, down after an
            # invalid one, by f, f^2, f^3, ... until bracketed, then geometric means), fresh Adam
            end = act & ((t_i >= p["steps"]) | ((st >= early) if early else torch.zeros_like(act)))
            r_i = rnd[idx]
            r_c = r_i.clamp_max(n_rounds - 1)     # rows already done (stale on the GPU) stay put
            lam_valid[idx, r_c] = torch.where(end, rv, lam_valid[idx, r_c])
            lo = torch.where(end & rv, torch.maximum(lam_lo[idx], lam_i), lam_lo[idx])
            hi = torch.where(end & ~rv, torch.minimum(lam_hi[idx], lam_i), lam_hi[idx])
            bracketed = torch.isfinite(hi) & (lo > 0)
            step_up = torch.pow(p["lam_factor"], (r_i + 1).to(lam_i.dtype))   # f, f^2, ... until bracketed
            grow = torch.where(rv, lam_i * step_up, lam_i / step_up)
            nxt = torch.where(bracketed, (lo * hi.clamp_max(1e30)).sqrt(), grow)
            lam_lo[idx], lam_hi[idx], lam[idx] = lo, hi, torch.where(end, nxt, lam_i)
            r_next = r_i + end.long()
            fin = r_next >= n_rounds
            lam_tried[idx, r_next.clamp_max(n_rounds - 1)] = torch.where(
                end & ~fin, nxt, lam_tried[idx, r_next.clamp_max(n_rounds - 1)])
            rnd[idx], done[idx] = r_next, done[idx] | (end & fin)
            a, e = act[:, None], end[:, None]
            moved = torch.where(a, p_new, pa.detach())
            restart = init[idx] if not p["warm_start"] else moved
            par[idx] = torch.where(e, restart, moved)
            m[idx] = torch.where(e, 0.0, torch.where(a, m_new, m_i))
            v[idx] = torch.where(e, 0.0, torch.where(a, v_new, v_i))
            t[idx] = torch.where(end, 0.0, torch.where(act, t_i, t[idx]))
            best_obj[idx] = torch.where(end, math.inf, torch.where(act, b_obj, best_obj[idx]))
            stall[idx] = torch.where(end, 0, torch.where(act, st, stall[idx]))
            round_valid[idx] = torch.where(end, False, torch.where(act, rv, round_valid[idx]))
    found = torch.isfinite(best_dist)
    return {"x": torch.where(found.view(-1, *[1] * (x0.dim() - 1)), best_x, fallback_x),
            "found": found, "lam": torch.where(found, best_lam, fallback_lam), "iterations": iters,
            "lam_tried": lam_tried, "lam_valid": lam_valid}
