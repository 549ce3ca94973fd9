"""The result of a counterfactual search: one row per image, everything on the CPU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class CounterfactualResult:
    """Counterfactuals of a batch, in data space.

    Fields (``B`` images, ``K`` classes, ``k`` candidates per image)
    ------
    x : ``[B, C, *S]`` the best counterfactual of each image (the smallest valid edit; when no
        candidate is valid, the one that came closest to the target).
    x_orig : ``[B, C, *S]`` the originals.
    target : ``[B]`` int64, the class aimed at; for ``target="other"`` the class reached (or, for
        an invalid row, the most probable other class).
    valid : ``[B]`` bool, ``argmax(probs_after) == target`` and ``probs_after[target] >= threshold``.
    probs_before, probs_after : ``[B, K]`` softmax probabilities of ``x_orig`` and ``x``.
    distance : ``{"l0", "l1", "l2", "linf"}`` -> ``[B]`` norms of ``x - x_orig`` in data units
        (``l0``: number of elements changed by more than ``l0_tol``).
    lam : ``[B]`` the distance weight of the round that produced the returned candidate.
    iterations : ``[B]`` int64, optimisation steps its row ran (all lambda rounds together).
    reason : ``B`` strings, ``""`` for a valid row, else why it is not valid.
    candidates : ``[B, k, C, *S]`` every candidate when ``k > 1`` (else None).
    candidates_valid : ``[B, k]`` bool, validity of each candidate (k > 1, else None).
    lam_tried, lam_valid : diagnostics per candidate, ``[B, k, n]``: with the bisection schedule
        the lambda of every round (``n = lam_steps``) and whether that round found a valid
        counterfactual; with the adaptive schedule ``n = 2``: the start lambda and the smallest
        lambda reached, and (both columns) whether the row found a valid counterfactual.
    classes : class names, when known.
    params : the search settings, for records.
    target_on : ``[B]`` bool, multi-label only: the state the target finding was asked to reach
        (True: switched on, False: switched off); None otherwise.
    multilabel : the model is multi-label: ``target`` is a finding, ``probs_before`` /
        ``probs_after`` are every finding's own sigmoid probability (the other findings, reported,
        not constrained; see :meth:`findings`), and ``valid`` means the target finding's probability
        is ``>= threshold`` (on) or ``<= 1 - threshold`` (off).
    """

    x: Tensor
    x_orig: Tensor
    target: Tensor
    valid: Tensor
    probs_before: Tensor
    probs_after: Tensor
    distance: dict[str, Tensor]
    lam: Tensor
    iterations: Tensor
    reason: list[str]
    candidates: Tensor | None = None
    candidates_valid: Tensor | None = None
    lam_tried: Tensor | None = None
    lam_valid: Tensor | None = None
    classes: list[str] | None = None
    params: dict = field(default_factory=dict)
    target_on: Tensor | None = None
    multilabel: bool = False

    def __len__(self) -> int:
        return self.x.shape[0]

    def difference(self) -> Tensor:
        """``x - x_orig``, ``[B, C, *S]`` (signed, data units)."""
        return self.x - self.x_orig

    @property
    def pred_before(self) -> Tensor:
        """``[B]`` predicted class of each original."""
        return self.probs_before.argmax(dim=1)

    @property
    def pred_after(self) -> Tensor:
        """``[B]`` predicted class of each counterfactual."""
        return self.probs_after.argmax(dim=1)

    def class_name(self, index: int) -> str:
        return self.classes[index] if self.classes is not None and 0 <= index < len(self.classes) else str(index)

    def findings(self, index: int, threshold: float = 0.5) -> list[dict]:
        """Multi-label: every finding of row ``index`` before and after, the target first.

        ``[{"finding", "target", "prob_before", "prob_after", "positive_before", "positive_after"}]``
        (``positive``: probability >= ``threshold``).
        """
        if not self.multilabel:
            raise ValueError("findings() is for multi-label results; use probs_before / probs_after")
        t = int(self.target[index])
        order = [t] + [k for k in range(self.probs_before.shape[1]) if k != t]
        before, after = self.probs_before[index].tolist(), self.probs_after[index].tolist()
        return [{"finding": self.class_name(k), "target": k == t, "prob_before": before[k], "prob_after": after[k],
                 "positive_before": before[k] >= threshold, "positive_after": after[k] >= threshold} for k in order]

    def summary(self) -> list[dict]:
        """One plain dict per row (ints, floats, strings) for tables, JSON or SQLite.

        Multi-label rows add ``target_state`` (``"on"`` / ``"off"``), ``others_changed`` (other findings
        whose state at 0.5 changed) and ``others_max_change`` (largest change of another finding's
        probability)."""
        rows = []
        before, after = self.pred_before.tolist(), self.pred_after.tolist()
        for i in range(len(self)):
            t = int(self.target[i])
            rows.append({
                "index": i,
                "target": t,
                "target_name": self.class_name(t),
                "pred_before": before[i],
                "pred_before_name": self.class_name(before[i]),
                "pred_after": after[i],
                "pred_after_name": self.class_name(after[i]),
                "prob_target_before": float(self.probs_before[i, t]),
                "prob_target_after": float(self.probs_after[i, t]),
                "valid": bool(self.valid[i]),
                **{f"distance_{k}": float(v[i]) for k, v in self.distance.items()},
                "lam": float(self.lam[i]),
                "iterations": int(self.iterations[i]),
                "reason": self.reason[i],
            })
            if self.multilabel:
                other = torch.ones(self.probs_before.shape[1], dtype=torch.bool)
                other[t] = False
                b, a = self.probs_before[i][other], self.probs_after[i][other]
                rows[-1].update(target_state="on" if bool(self.target_on[i]) else "off",
                                others_changed=int(((b >= 0.5) != (a >= 0.5)).sum()),
                                others_max_change=float((a - b).abs().max()) if other.any() else 0.0)
        return rows

    def select(self, index) -> CounterfactualResult:
        """The rows ``index`` (int, slice, list or bool/int tensor) as a new result."""
        if isinstance(index, int):
            index = [index]
        idx = torch.arange(len(self))[index]
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, dict) and f.name == "distance":
                out[f.name] = {k: v[idx] for k, v in value.items()}
            elif f.name == "reason":
                out[f.name] = [value[i] for i in idx.tolist()]
            else:
                out[f.name] = value
        return CounterfactualResult(**out)

    def __repr__(self) -> str:
        n, ok = len(self), int(self.valid.sum())
        return f"CounterfactualResult({n} rows, {ok} valid, shape={tuple(self.x.shape[1:])})"


def invalid_reasons(valid, found, probs, t, orig, other, mask, p, lam_tried, names) -> list[str]:
    """Why each row is not valid (``""`` for a valid row), for :attr:`CounterfactualResult.reason`.

    ``found``: the search recorded a valid iterate for the row (so a failure is a re-evaluation at
    the boundary); ``p``: the search settings; ``lam_tried``: ``[B, rounds]``.
    """
    out = []
    for i in range(valid.shape[0]):
        if bool(valid[i]):
            out.append("")
            continue
        if mask is not None and not bool(mask[i].any()):
            out.append("the editable mask leaves nothing of this image to change")
            continue
        goal = f"any class but {names[int(orig[i])]!r}" if other else repr(names[int(t[i])])
        pt, pred, name = float(probs[i, t[i]]), int(probs[i].argmax()), names[int(t[i])]
        if bool(found[i]):
            out.append(f"target {goal} was reached only at the decision boundary: on re-evaluation prob "
                       f"{pt:.3f} of {name!r}, predicted {names[pred]!r}")
        else:
            argmax = " (the argmax, below the threshold)" if pred == int(t[i]) else ""
            budget = (f"{p['steps']} steps" if p.get("schedule", "adaptive") == "adaptive"
                      else f"{p['lam_steps']} rounds of up to {p['steps']} steps")
            out.append(f"target {goal} not reached in {budget}, at the smallest lambda "
                       f"{float(lam_tried[i].min()):.3g}: best prob {pt:.3f} of {name!r}{argmax} "
                       f"< threshold {p['threshold']:g}")
    return out
