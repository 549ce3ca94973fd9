"""The objective of a counterfactual search over one chunk of rows (:class:`_Search`), which the
schedules (:mod:`.adaptive`, :mod:`.bisection`) drive step by step: the rows' start (the image, or
noise keyed by ``(seed, image, candidate)``; the prior's code with ``latent``), the first ``lam``
per row (``"auto"``), the prediction loss (hinge or CE; one finding of a multi-label model), the
elastic / TV / prior / prototype terms, and validity with its recording margin. The search itself
(batching, targets, assembling the result) is :func:`counterlens.counterfactual.search.counterfactual`.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attribution.noise import counter_normal
from ..errors import InputError, MethodError
from . import multilabel as ml
from .adaptive import prune_edits, run_adaptive
from .bisection import run_bisection
from .constraints import elastic_distance, project, rows_of, total_variation

MARGIN = 1e-3            # the loss aims this far past the boundary (logit / log-prob units) ...
RECORD_MARGIN = 5e-4     # ... and an iterate is recorded as valid this far past it


class _Search:
    """One chunk's optimisation. Multi-label (``multilabel=True``): ``tgt`` is the finding and
    ``orig`` the state it should reach (True: on), see :mod:`.multilabel`."""

    def __init__(self, clf, p: dict, other: bool, prior, protos, latent: bool, multilabel: bool = False):
        self.clf, self.p, self.other, self.prior, self.protos, self.latent = clf, p, other, prior, protos, latent
        self.log_thr = math.log(p["threshold"]) if p["threshold"] > 0 else -math.inf
        self.multilabel = multilabel
        self.ml_thr = ml.logit_threshold(p["threshold"]) if multilabel else None

    def run(self, x0, tgt, orig, low, high, mask, img, cand) -> dict:
        run = run_adaptive if self.p["schedule"] == "adaptive" else run_bisection
        out = run(self, x0, tgt, orig, low, high, mask, img, cand)
        if self.p["prune"]:
            out["x"] = prune_edits(self, x0, out["x"], out["found"], tgt, orig, low, high, mask)
        return out

    def start(self, x0, tgt, orig, low, high, mask, img, cand):
        """What both schedules start from: ``(init [r, N], step_size, state, lam0 [r], grad_mask)``.

        ``init``: the optimised tensor, flattened (pixels, or the prior's code with ``latent``);
        candidate 0 of each image is the image itself, candidate ``j > 0`` adds noise keyed by
        ``(seed, image, j)``; ``step_size``: ``lr`` in range units (latent: of the code's std per row);
        ``state``: the per-row tensors :meth:`_objective` reads; ``grad_mask``: the editable mask as
        floats (None without one, or in latent mode).
        """
        p, r = self.p, x0.shape[0]
        scale = high - low
        with torch.no_grad():
            if self.latent:
                z0 = self.prior.encode(x0).detach()
                start = z0.flatten(1)
                step_size = p["lr"] * start.std(dim=1, keepdim=True).clamp_min(1e-8)
                noise_scale = p["init_noise"] * start.std(dim=1, keepdim=True)
                self.latent_shape = z0.shape[1:]
            else:
                start = x0.flatten(1)
                step_size = (p["lr"] * scale).expand_as(x0).flatten(1)
                noise_scale = (p["init_noise"] * scale).expand_as(x0).flatten(1)
            noise = counter_normal(p["seed"], (img, cand), start.shape[1]) * noise_scale
            init = start + torch.where(cand[:, None] > 0, noise, torch.zeros_like(noise))
            if not self.latent:
                init = project(init.view_as(x0), x0, low, high, mask).flatten(1)
            protos = self._prototypes(x0, img, tgt, orig)
        state = {"x0": x0, "tgt": tgt, "orig": orig, "low": low, "high": high, "mask": mask, "scale": scale,
                 "protos": protos}
        lam0 = self._auto_lam(init, state) if p["lam"] == "auto" else torch.full((r,), p["lam"], device=x0.device)
        grad_mask = None if (mask is None or self.latent) else mask.flatten(1).to(x0.dtype)
        return init, step_size, state, lam0, grad_mask

    def is_valid(self, logits: Tensor, tgt: Tensor, orig: Tensor) -> Tensor:
        """``[r]`` bool: the row's logits meet the target (with the recording margin)."""
        if self.multilabel:
            return ml.margin(logits, tgt, orig, self.ml_thr) > RECORD_MARGIN
        if self.other:
            t = logits.scatter(1, orig[:, None], -math.inf).argmax(dim=1)
        else:
            t = tgt
        z_t = logits.gather(1, t[:, None]).squeeze(1)
        margin = z_t - logits.scatter(1, t[:, None], -math.inf).amax(dim=1)
        lp_t = torch.log_softmax(logits, dim=1).gather(1, t[:, None]).squeeze(1)
        return (margin > RECORD_MARGIN) & (lp_t > self.log_thr + RECORD_MARGIN)

    def _to_data(self, pa: Tensor, idx: Tensor, s: dict) -> Tensor:
        x0 = s["x0"][idx]
        if not self.latent:
            return pa.view_as(x0)
        xd = _decode(self.prior, pa.view(pa.shape[0], *self.latent_shape), x0.shape)
        return project(xd, x0, rows_of(s["low"], idx), rows_of(s["high"], idx),
                       None if s["mask"] is None else s["mask"][idx])

    def _objective(self, xp: Tensor, idx: Tensor, lam: Tensor, s: dict):
        p = self.p
        logits = self.clf.forward(xp)
        if not logits.requires_grad:
            raise MethodError("the model's output does not depend differentiably on x (no autograd graph); "
                              "a counterfactual search needs gradients")
        pred, strict, violation = self._prediction_loss(logits, idx, s)
        d = (xp - s["x0"][idx]) / rows_of(s["scale"], idx)
        dist = elastic_distance(d, p["l1"], p["l2"])
        obj = pred + lam * dist
        if p["tv"]:
            obj = obj + p["tv"] * total_variation(d)
        if p["prior_weight"]:
            obj = obj + p["prior_weight"] * self.prior.reconstruction_error(xp)
        if p["proto_weight"]:
            code = self.prior.encode(xp).flatten(1)
            obj = obj + p["proto_weight"] * (code - s["protos"][idx]).square().mean(dim=1)
        sel = dist.detach() if (p["l1"] or p["l2"]) else elastic_distance(d.detach(), 1.0, 1.0)
        return obj, pred, sel, strict.detach(), violation

    def _prediction_loss(self, logits: Tensor, idx: Tensor, s: dict):
        """``(loss [r], strict [r] bool, violation [r])`` of the rows' target from their logits."""
        p = self.p
        if self.multilabel:      # the finding's signed logit past logit(threshold)
            margin = ml.margin(logits, s["tgt"][idx], s["orig"][idx], self.ml_thr)
            strict, violation = margin > RECORD_MARGIN, F.relu(-margin).detach()
            if p["loss"] == "hinge":
                return F.relu(p["kappa"] + MARGIN - margin), strict, violation
            ce = F.softplus(-(margin + self.ml_thr))          # -log sigmoid(s z_k)
            return torch.where(strict & (margin >= p["kappa"]), torch.zeros_like(ce), ce), strict, violation
        logp = torch.log_softmax(logits, dim=1)
        if self.other:   # the best class other than the original prediction, step by step
            t = logits.detach().scatter(1, s["orig"][idx, None], -math.inf).argmax(dim=1)
        else:
            t = s["tgt"][idx]
        z_t = logits.gather(1, t[:, None]).squeeze(1)
        z_other = logits.scatter(1, t[:, None], -math.inf).amax(dim=1)
        margin, lp_t = z_t - z_other, logp.gather(1, t[:, None]).squeeze(1)
        strict = (margin > RECORD_MARGIN) & (lp_t > self.log_thr + RECORD_MARGIN)
        violation = (F.relu(-margin) + F.relu(self.log_thr - lp_t)).detach()
        if p["loss"] == "hinge":
            pred = F.relu(p["kappa"] + MARGIN - margin) + F.relu(self.log_thr + MARGIN - lp_t)
        else:
            pred = torch.where(strict & (margin >= p["kappa"]), torch.zeros_like(lp_t), -lp_t)
        return pred, strict, violation

    def _auto_lam(self, init: Tensor, s: dict) -> Tensor:
        """Start weight per row from the prediction-loss gradient ``g`` at the start (range units,
        editable elements): ``l1 > 0``: where the L1 pull on an element, ``lam * l1 / N``, equals the
        mean ``|g|``; ``l1 = 0``: ``N |g|^2 / (2 l2 loss)``, whose L2 equilibrium edit ``N g / (2 lam
        l2)`` covers the loss to first order. Rows with no gradient get 1."""
        p, r = self.p, init.shape[0]
        idx = torch.arange(r, device=init.device)
        with torch.enable_grad():
            xp = self._to_data(init, idx, s).detach().requires_grad_(True)
            pred = self._objective(xp, idx, torch.zeros(r, device=init.device), s)[1]
            (g,) = torch.autograd.grad(pred.sum(), xp)
        with torch.no_grad():
            g = (g * s["scale"]).flatten(1)
            n = g.shape[1]
            if s["mask"] is not None:
                keep = s["mask"].flatten(1)
                g, n_edit = g * keep, keep.sum(dim=1).clamp_min(1)
            else:
                n_edit = torch.full((r,), n, device=g.device)
            if p["l1"] > 0:
                lam = n * g.abs().sum(dim=1) / n_edit / p["l1"]
            else:
                lam = n * g.square().sum(dim=1) / (2 * max(p["l2"], 1e-12) * pred.detach().clamp_min(1e-6))
            return torch.where(torch.isfinite(lam) & (lam > 0), lam, torch.ones_like(lam))

    def _prototypes(self, x0, img, tgt, orig) -> Tensor | None:
        """The prototype each row is guided to, ``[r, L]`` (None without prototypes)."""
        if self.protos is None or not self.p["proto_weight"]:
            return None
        # [K, L] for every image, or [B, K, L] per image
        table = self.protos[img] if self.protos.dim() == 3 else self.protos.unsqueeze(0).expand(x0.shape[0], -1, -1)
        if self.other:
            code = self.prior.encode(x0).flatten(1)
            dist = (table - code[:, None]).square().sum(dim=2).scatter(1, orig[:, None], math.inf)
            tgt = dist.argmin(dim=1)
        return table.gather(1, tgt.view(-1, 1, 1).expand(-1, 1, table.shape[2])).squeeze(1)


def _decode(prior, z: Tensor, shape) -> Tensor:
    params = inspect.signature(prior.decode).parameters
    out = prior.decode(z, size=tuple(shape[2:])) if "size" in params else prior.decode(z)
    if tuple(out.shape[1:]) != tuple(shape[1:]):
        raise InputError(f"prior.decode returns {tuple(out.shape[1:])} per image; x has {tuple(shape[1:])}")
    return out
