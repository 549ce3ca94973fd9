"""Counterfactuals of multi-label models: switch one finding off or on, report the others.

A multi-label model (``Classifier(..., output="multilabel")``) scores ``K`` findings with independent
sigmoids. A counterfactual asks for one finding per image and the state it should reach:

- ``"pneumonia:off"`` / ``"pneumonia:on"`` (or ``"2:off"``, an index): that finding switched off / on;
- ``"pneumonia"`` or ``2`` (no state): the finding switched to the state it is not in now
  (off when its probability is at least 0.5, else on);
- ``"other"`` (the default): the most probable finding, switched (so usually off);
- one of those per image (a list of length B).

Valid: ``sigmoid(s * z_k) >= threshold`` with ``s = +1`` for on and ``-1`` for off, i.e. ``p_k >=
threshold`` switched on, ``p_k <= 1 - threshold`` switched off (at the default 0.5: the finding's
sigmoid crosses 0.5 the asked way), decided on the float32 logits. The other findings are free to
move; the result's ``probs_before`` / ``probs_after`` hold every finding's probability, and
:meth:`~counterlens.counterfactual.CounterfactualResult.findings` lists them per image.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError, TargetError

STATES = {"on": True, "off": False, "positive": True, "negative": False}


def goals(target, names: list[str], probs0: Tensor) -> tuple[Tensor, Tensor]:
    """``(finding LongTensor[B], on BoolTensor[B])`` on ``probs0``'s device from ``target`` (module doc).

    ``probs0``: ``[B, K]`` per-finding probabilities of the originals.
    """
    batch = probs0.shape[0]
    lowered = {n.lower(): i for i, n in enumerate(names)}

    def finding(text) -> int:
        if isinstance(text, str) and text.strip().lower() in lowered:
            return lowered[text.strip().lower()]
        try:
            k = int(text)
        except (TypeError, ValueError):
            raise TargetError(f"target {text!r} is not a finding of this model; findings: {names} (add ':on' or "
                              "':off', e.g. 'pneumonia:off')") from None
        if not 0 <= k < len(names):
            raise TargetError(f"target {k} is out of range: the model has {len(names)} findings ({names})")
        return k

    def one(t, row: int) -> tuple[int, bool | None]:
        if isinstance(t, torch.Tensor):
            t = t.item()
        if isinstance(t, str):
            if t.strip().lower() == "other":
                return int(probs0[row].argmax()), None
            head, sep, state = t.rpartition(":")
            if sep and state.strip().lower() in STATES:
                return finding(head), STATES[state.strip().lower()]
        if isinstance(t, bool) or not isinstance(t, (str, int)):
            raise TargetError(f"target {t!r}: pass a finding and its state, e.g. 'pneumonia:off' or 'pneumonia:on'")
        return finding(t), None

    if isinstance(target, (str, int)) or (isinstance(target, torch.Tensor) and target.dim() == 0):
        pairs = [one(target, i) for i in range(batch)]
    else:
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if len(items) != batch:
            raise TargetError(f"{len(items)} targets for a batch of {batch}; pass one per row or a single one")
        pairs = [one(t, i) for i, t in enumerate(items)]
    k = torch.tensor([f for f, _ in pairs], dtype=torch.long, device=probs0.device)
    now_on = probs0.gather(1, k[:, None]).squeeze(1) >= 0.5
    on = torch.tensor([False if s is None else s for _, s in pairs], device=probs0.device)
    toggle = torch.tensor([s is None for _, s in pairs], device=probs0.device)
    return k, torch.where(toggle, ~now_on, on)


def logit_threshold(threshold: float) -> float:
    """``log(t / (1 - t))``: the logit a finding must pass (``s * z_k``) to be valid."""
    if not 0.0 < threshold < 1.0:
        raise InputError(f"threshold={threshold!r}: a multi-label counterfactual needs a probability strictly between "
                         "0 and 1 for the finding's sigmoid, e.g. 0.5")
    return math.log(threshold) - math.log1p(-threshold)


def margin(logits: Tensor, finding: Tensor, on: Tensor, logit_thr: float) -> Tensor:
    """``[r]`` ``s * z_k - logit(threshold)``: positive once the finding is in the asked state."""
    z = logits.gather(1, finding[:, None]).squeeze(1)
    return torch.where(on, z, -z) - logit_thr


def valid(logits: Tensor, finding: Tensor, on: Tensor, threshold: float) -> Tensor:
    """``[r]`` bool: ``sigmoid(s * z_k) >= threshold``, computed in float32."""
    z = logits.float().gather(1, finding[:, None]).squeeze(1)
    return torch.sigmoid(torch.where(on, z, -z)) >= threshold


def reasons(ok: Tensor, found: Tensor, probs: Tensor, finding: Tensor, on: Tensor, mask, p: dict,
            lam_tried: Tensor, names: list[str]) -> list[str]:
    """Why each row is not valid (``""`` for a valid row), in the words of findings."""
    out = []
    for i in range(ok.shape[0]):
        if bool(ok[i]):
            out.append("")
            continue
        if mask is not None and not bool(mask[i].any()):
            out.append("the editable mask leaves nothing of this image to change")
            continue
        name, want, pk = names[int(finding[i])], "on" if bool(on[i]) else "off", float(probs[i, finding[i]])
        need = (f">= {p['threshold']:g}" if bool(on[i]) else f"<= {1 - p['threshold']:g}")
        if bool(found[i]):
            out.append(f"finding {name!r} was switched {want} only at the decision boundary: on re-evaluation its "
                       f"probability is {pk:.3f} (needs {need})")
        else:
            budget = (f"{p['steps']} steps" if p.get("schedule", "adaptive") == "adaptive"
                      else f"{p['lam_steps']} rounds of up to {p['steps']} steps")
            out.append(f"finding {name!r} not switched {want} in {budget}, at the smallest lambda "
                       f"{float(lam_tried[i].min()):.3g}: best probability {pk:.3f} (needs {need})")
    return out
