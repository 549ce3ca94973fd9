"""Batched counterfactual search: the smallest data-space edit that makes the model say ``target``.

Every image x candidate is one *row*; all rows are optimised together as one tensor on the model's
device (in chunks of ``batch_size`` rows, each chunk a full search, halved on out-of-memory).
Per row and step the objective is::

    pred_loss(logits, target)                       # hinge on the logit margin, or clipped CE
    + lam_row * (l1 * mean|d| + l2 * mean d^2)      # elastic net, d = (x' - x) / (high - low)
    + tv * TV(d)                                    # total variation of the edit, every spatial axis
    + prior_weight * prior.reconstruction_error(x')
    + proto_weight * mean (prior.encode(x') - prototype[target])^2

minimised by gradient steps on ``x'`` (or, with ``latent=True``, on the prior's code ``z`` with
``x' = decode(z)``), projected after every step onto the box ``[low, high]`` and the editable mask
(elements outside it are reset to the original exactly). Each row keeps its best valid iterate
(smallest elastic distance). ``lam`` follows one of two schedules:

- ``"adaptive"`` (default, :mod:`.adaptive`): one run in which each row's ``lam`` grows after a
  valid step and shrinks after an invalid one, so the row walks to the decision boundary and then
  slides along it towards the original; steps are momentum steps scaled so that the largest
  element moves ``lr`` of the range; a row stops when its best valid distance has not improved by
  1% for ``early_stop`` steps. As fast as the hand-written loop that stops at the first valid step,
  with edits a fraction of its size.
- ``"bisection"``: ``lam_steps`` Adam optimisations per row, ``lam`` bisected on its logarithm
  between them (up after a valid round, down after an invalid one, by ``lam_factor``, its square,
  its cube, ... until bracketed, then geometric means) for the *largest* weight that still gives a
  valid counterfactual; a round ends after ``steps`` steps or when the row's objective has not
  improved by 1% for ``early_stop`` steps, and the row starts its next round at once (where it
  ended, ``warm_start``), independently of the other rows. Slower (hundreds of steps), slightly
  smaller edits.

The first ``lam`` is given, or with ``lam="auto"`` set per row from the loss gradient at the start.
Rows that finished no longer cost model evaluations. Then (``prune``, on by default without prior
terms) the smallest changes of each valid edit are dropped while it stays valid (forward passes
only, :func:`.adaptive.prune_edits`).

Validity: ``argmax(probs) == target`` and ``probs[target] >= threshold``. A row that never gets
there returns its closest iterate with ``valid=False`` and a reason. Gradients are taken with
``torch.autograd.grad`` with respect to the optimised tensor only: the model's parameters get no
``.grad`` and its train/eval flags are restored (it runs in eval mode).

Randomness: candidate 0 of every image starts at the image itself; candidate ``j > 0`` of image
``i`` starts from noise that is a pure function of ``(seed, i, j)``, so results do not depend on
``batch_size``. With one candidate per image, a batch gives the same rows as one image at a time
(up to the float rounding of batched convolutions).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attribution.base import Evaluator, resolve_targets
from ..errors import InputError
from ..model import Classifier
from . import multilabel as ml
from .constraints import (
    check_prior,
    check_search_params,
    distances,
    elastic_distance,
    prior_eval_mode,
    resolve_box,
    resolve_editable,
    rows_of,
)
from .objective import MARGIN, RECORD_MARGIN, _Search  # noqa: F401  (MARGIN, RECORD_MARGIN re-exported)
from .result import CounterfactualResult, invalid_reasons


def counterfactual(clf: Classifier, x, target="other", *, threshold: float = 0.5, loss: str = "hinge",
                   kappa: float = 0.0, l1: float = 1.0, l2: float = 1.0, tv: float = 0.0,
                   lam: float | str = "auto", lam_steps: int = 5, lam_factor: float | None = None,
                   steps: int = 500, lr: float | None = None, candidates: int = 1, init_noise: float = 0.1,
                   editable=None, value_range=None, prior=None, prior_weight: float = 0.0,
                   prototypes: Tensor | None = None, proto_weight: float = 0.0, latent: bool = False,
                   early_stop: int | None = None, warm_start: bool = True, schedule: str = "adaptive",
                   prune: bool | None = None, batch_size: int | str | None = None, seed: int = 0) -> CounterfactualResult:
    """Counterfactuals of ``x`` for ``target``, searched in data space, batched.

    Parameters
    ----------
    clf : Classifier
    x : ``[B, C, *S]`` data-space images (2D, 3D or 1D spatial).
    target : ``"other"`` (default: any class but the current prediction), a class index or name,
        or one per row (list / tensor of length B). Multi-label models: a finding and the state
        it should reach, ``"pneumonia:off"`` / ``"pneumonia:on"`` (``"other"``: the most probable
        finding switched; see :mod:`.multilabel`); ``threshold`` then applies to that finding's
        sigmoid and the other findings are reported, not constrained.
    threshold : 0.5. Probability the target must reach (and be the argmax).
    loss : ``"hinge"`` (default: ``max(0, max_{j!=t} z_j - z_t + kappa)`` plus a hinge on
        ``log p_t`` at ``log threshold``) or ``"ce"`` (``-log p_t``, zero once the row is valid).
    kappa : 0.0. Extra logit margin the hinge asks for.
    l1, l2 : 1.0, 1.0. Weights of mean |d| and mean d^2 in the distance (``d`` in units of the range).
    tv : 0.0. Weight of the total variation of the edit (smooth, blob-like edits).
    lam : ``"auto"``. Initial distance weight of each row: a number, or ``"auto"``
        (per row, from the gradient at the start: the weight at which the L1 pull on an element
        equals the mean gradient magnitude; see ``objective._Search._auto_lam``).
    lam_steps : 5. Bisection rounds (each an optimisation of up to ``steps`` steps; bisection only).
    lam_factor : None. Factor ``f`` of the bisection's first phase: round ``r`` (0-based) moves lam
        by ``f**(r+1)``, up after a valid round, down after an invalid one, until a valid and an
        invalid lam bracket it; None: 2 with ``lam="auto"`` (the start is near), 10 with a given lam.
    steps : 500. Steps per row at most (bisection: per round).
    lr : None. Step size as a fraction of the value range (latent: of the code's std per row);
        None: 0.1 for the adaptive schedule (the largest element's move per step), 0.01 for the
        bisection (Adam's step).
    candidates : 1. Counterfactuals per image (different random starts); ``x`` holds the best.
    init_noise : 0.1. Start noise of candidates 1.. as a fraction of the range (or code std).
    editable : None. Bool mask ``[1 or B, 1 or C, *S]`` (or ``[*S]``) of the elements that may change.
    value_range : None. ``(low, high)`` numbers or broadcastable tensors; default ``clf.value_range``,
        else ``(x.min(), x.max())`` of the batch.
    prior : None. An object with ``reconstruction_error(x) -> [B]``, ``encode(x) -> [B, *L]`` and
        ``decode(z) -> [B, C, *S]`` (e.g. :class:`AutoencoderPrior`), on ``clf.device``.
    prior_weight : 0.0. Weight of ``prior.reconstruction_error(x')``.
    prototypes : None. ``[K, *L]`` class prototypes in the prior's code space (or ``[B, K, *L]``
        per image); for ``target="other"`` the guide is the other class whose prototype is nearest
        to ``encode(x)``.
    proto_weight : 0.0. Weight of ``mean (encode(x') - prototype)^2``.
    latent : False. Search the prior's code and decode it (edits made of the prior's patterns).
    early_stop : None. Adaptive: stop a row when its best valid distance has not improved by 1% for
        this many steps (default 6; 20 gives edits a few percent smaller for about three times the
        steps);
        bisection: end a round when its objective has not improved by 1% for this many steps
        (default 50). 0: never.
    warm_start : True. Each bisection round starts where the row's previous round ended (False:
        every round starts again from the image; slower, sometimes slightly closer).
    schedule : ``"adaptive"`` (default) or ``"bisection"``; see the module docstring.
    prune : None. Drop the smallest changes of every valid edit while it stays valid; None: on,
        except with a prior term or ``latent=True`` (there the edit's shape is the point).
    batch_size : None. Rows (images x candidates) optimised at once: a number, ``"auto"`` (measures),
        or None: sized by the input, ``2**22`` elements per chunk between 16 and 512 rows (512 rows
        of 8x8 digits, 256 of 128x128, 83 of 224x224): a chunk runs until its slowest row is done,
        so fewer, larger chunks are faster as long as memory allows.
    seed : 0. Seed of the start noise of candidates 1...

    Returns a :class:`CounterfactualResult` (CPU tensors).
    """
    p = check_search_params(
        loss=loss, threshold=threshold, kappa=kappa, l1=l1, l2=l2, tv=tv, lam=lam, lam_steps=lam_steps,
        lam_factor=lam_factor, steps=steps, lr=lr, candidates=candidates, init_noise=init_noise,
        prior_weight=prior_weight, proto_weight=proto_weight, early_stop=early_stop, seed=seed,
        warm_start=bool(warm_start), schedule=schedule,
        prune=(not latent and not prior_weight and not proto_weight) if prune is None else bool(prune))
    x = clf.as_input(x).detach()
    if x.shape[0] == 0:
        raise InputError("x has no rows; pass at least one image [1, C, *S]")
    if batch_size is None:
        batch_size = int(min(512, max(16, (1 << 22) // max(1, x[0].numel()))))
    ev = Evaluator(clf, batch_size)
    logits0 = ev.logits(x)
    n_images, n_classes = logits0.shape
    names = clf.class_names(n_classes)
    multilabel = clf.multilabel
    if multilabel:     # a finding per image and the state it should reach ("orig": True for on)
        if prototypes is not None or proto_weight:
            raise InputError("prototypes / proto_weight guide towards a class; a multi-label counterfactual switches "
                             "one finding: leave them out (prior_weight works)")
        ml.logit_threshold(p["threshold"])
        tgt, orig = ml.goals(target, names, torch.sigmoid(logits0))
        other = False
    else:
        orig = logits0.argmax(dim=1)
        other = isinstance(target, str) and target.lower() == "other"
        tgt = orig if other else resolve_targets(clf, x, target, logits=logits0)
    low, high = resolve_box(clf, x, value_range)
    mask = resolve_editable(editable, x)
    protos = check_prior(clf, x, prior, prior_weight, prototypes, proto_weight, latent, n_classes)
    k = candidates
    rows_img = torch.arange(n_images, device=x.device).repeat_interleave(k)
    rows_cand = torch.arange(k, device=x.device).repeat(n_images)
    search = _Search(clf, p, other, prior, protos, latent, multilabel)

    def work(a: int, b: int) -> dict:
        i = rows_img[a:b]
        return search.run(x[i], tgt[i], orig[i], rows_of(low, i), rows_of(high, i),
                          None if mask is None else mask[i], i, rows_cand[a:b])

    with clf.eval_mode(), prior_eval_mode(prior):
        parts = ev.run(n_images * k, work)
    out = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return _assemble(ev, x, out, orig, tgt, other, low, high, mask, k, p, names, logits0, multilabel)


# -- assembling the result ------------------------------------------------------------------------
def _assemble(ev, x, out, orig, tgt, other, low, high, mask, k, p, names, logits0,
              multilabel: bool = False) -> CounterfactualResult:
    """Re-evaluate every row's returned iterate, pick the best candidate per image, build the result."""
    n_images, scale = x.shape[0], high - low
    rows_x, rows_orig, orig_rows = out["x"], x.repeat_interleave(k, dim=0), orig.repeat_interleave(k)
    logits = ev.logits(rows_x).float()
    if multilabel:        # the finding's sigmoid on the asked side of the threshold; the others reported
        probs, probs0, t_rows = torch.sigmoid(logits), torch.sigmoid(logits0.float()), tgt.repeat_interleave(k)
        valid = ml.valid(logits, t_rows, orig_rows, p["threshold"])
        violation = F.relu(-ml.margin(logits, t_rows, orig_rows, ml.logit_threshold(p["threshold"])))
    else:
        probs, logp, probs0 = torch.softmax(logits, dim=1), torch.log_softmax(logits, dim=1), torch.softmax(logits0, 1)
        # "other": the class reached, or the most probable other class
        t_rows = logits.scatter(1, orig_rows[:, None], -math.inf).argmax(dim=1) if other else tgt.repeat_interleave(k)
        valid = (logits.argmax(dim=1) == t_rows) & (probs.gather(1, t_rows[:, None]).squeeze(1) >= p["threshold"])
        log_thr = math.log(p["threshold"]) if p["threshold"] > 0 else -math.inf
        z_t, lp = logits.gather(1, t_rows[:, None]).squeeze(1), logp.gather(1, t_rows[:, None]).squeeze(1)
        violation = F.relu(logits.scatter(1, t_rows[:, None], -math.inf).amax(dim=1) - z_t) + F.relu(log_thr - lp)
    d = (rows_x - rows_orig) / (scale if scale.shape[0] == 1 else scale.repeat_interleave(k, dim=0))
    sel = elastic_distance(d, p["l1"], p["l2"]) if (p["l1"] or p["l2"]) else elastic_distance(d, 1.0, 1.0)
    key = torch.where(valid, sel, math.inf).view(n_images, k)   # valid first (closest), else the closest miss
    choice = torch.where(torch.isfinite(key).any(dim=1), key.argmin(dim=1), violation.view(n_images, k).argmin(dim=1))
    pick = torch.arange(n_images, device=x.device) * k + choice
    x_cf = rows_x[pick]
    if multilabel:
        reasons = ml.reasons(valid[pick], out["found"][pick], probs[pick], t_rows[pick], orig, mask, p,
                             out["lam_tried"][pick], names)
    else:
        reasons = invalid_reasons(valid[pick], out["found"][pick], probs[pick], t_rows[pick], orig, other, mask, p,
                                  out["lam_tried"][pick], names)
    per_image = {name: _cpu(out[name].view(n_images, k, -1)) for name in ("lam_tried", "lam_valid")}
    return CounterfactualResult(
        x=_cpu(x_cf), x_orig=_cpu(x), target=_cpu(t_rows[pick]), valid=_cpu(valid[pick]),
        probs_before=_cpu(probs0), probs_after=_cpu(probs[pick]),
        distance={name: _cpu(v) for name, v in distances(x_cf, x, scale).items()},
        lam=_cpu(out["lam"][pick]), iterations=_cpu(out["iterations"][pick]), reason=reasons,
        candidates=_cpu(rows_x.view(n_images, k, *x.shape[1:])) if k > 1 else None,
        candidates_valid=_cpu(valid.view(n_images, k)) if k > 1 else None,
        **per_image, classes=list(names), params=dict(p),
        target_on=_cpu(orig) if multilabel else None, multilabel=multilabel)


# -- helpers --------------------------------------------------------------------------------------
def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu()
