"""Quality of tabular counterfactuals: sparsity, proximity, constraint violations, yNN, redundancy,
diversity.

Every function takes a :class:`~counterlens.data.tabular.TabularSchema` and rows as DataFrames (raw
features, as any tool returns them) or schema-space tensors ``[N, D]``, so counterfactuals from
other tools (DiCE, ...) are scored by the same code. Distances are in the schema's units:
a numeric feature's change divided by its scale (the median absolute deviation by default), a
categorical feature counts 1 when its category changes.

- ``l0``: features changed; ``l1_mad``: the MAD-normalised L1 distance (lower is closer);
- ``violations``: features of a counterfactual that break the schema (immutable changed, monotone
  direction broken, outside the permitted range or categories, non-integer integer, not a valid
  category); checked from the schema alone, independently of any search;
- ``ynn``: share of the ``n_neighbors`` nearest reference rows that the model puts in the
  counterfactual's class (higher: the counterfactual sits among rows of its class);
- ``redundancy``: changed features that could each be reverted alone while the counterfactual
  stays valid (0: every change is needed);
- ``diversity``: mean pairwise distance (``l1_mad``) and mean pairwise share of differing
  features (``count``) within each query's set.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.tabular import TabularSchema
from ..errors import InputError

__all__ = ["changed_features", "diversity", "is_valid", "l0", "l1_mad", "redundancy", "violations", "ynn"]

CHANGE_TOL = 1e-6   # a numeric feature changed when |x' - x| > CHANGE_TOL * scale


def rows(schema: TabularSchema, x, *, strict: bool = False) -> torch.Tensor:
    """Schema-space ``[N, D]`` float64 (CPU) of a DataFrame or tensor; unknown categories give an
    all-zero one-hot block (a violation), not an error, unless ``strict``."""
    return schema.encode(x, strict=strict).double()


def _pair(schema, x_cf, x_orig):
    a, b = rows(schema, x_cf), rows(schema, x_orig)
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = b.expand_as(a)
    if a.shape != b.shape:
        raise InputError(f"x_cf has {a.shape[0]} rows and x_orig {b.shape[0]}; pass one original per "
                         "counterfactual (or a single original)")
    return a, b


def changed_features(schema: TabularSchema, x_cf, x_orig, *, tol: float = CHANGE_TOL) -> torch.Tensor:
    """``[N, F]`` bool: which features of each counterfactual differ from its original."""
    a, b = _pair(schema, x_cf, x_orig)
    out = torch.zeros(a.shape[0], len(schema), dtype=torch.bool)
    for i, f in enumerate(schema.features):
        sl = schema.slices[f.name]
        d = (a[:, sl] - b[:, sl]).abs()
        out[:, i] = (d[:, 0] > tol * f.scale) if f.numeric else (d > 0.5).any(dim=1)
        out[:, i] |= ~torch.isfinite(a[:, sl]).all(dim=1)
    return out


def l0(schema: TabularSchema, x_cf, x_orig) -> torch.Tensor:
    """``[N]`` number of features changed (a categorical feature counts once)."""
    return changed_features(schema, x_cf, x_orig).sum(dim=1).double()


def l1_mad(schema: TabularSchema, x_cf, x_orig) -> torch.Tensor:
    """``[N]`` sum over numeric features of ``|x' - x| / scale``, plus 1 per categorical feature changed."""
    a, b = _pair(schema, x_cf, x_orig)
    changed = changed_features(schema, a, b)
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i, f in enumerate(schema.features):
        sl = schema.slices[f.name]
        if f.numeric:
            out += torch.where(changed[:, i], (a[:, sl.start] - b[:, sl.start]).abs() / f.scale, 0.0)
        else:
            out += changed[:, i].double()
    return out


def violations(schema: TabularSchema, x_cf, x_orig, *, details: bool = False):
    """``[N]`` number of features of each counterfactual that break a constraint of ``schema``.

    ``details=True`` returns a list of ``{feature: reason}`` per row instead. A feature left at its
    original value never violates (an original outside a narrowed range may stay where it is).
    """
    a, b = _pair(schema, x_cf, x_orig)
    changed = changed_features(schema, a, b)
    found: list[dict] = [{} for _ in range(a.shape[0])]
    for i, f in enumerate(schema.features):
        sl = schema.slices[f.name]
        va, vb = a[:, sl], b[:, sl]
        reasons: list[tuple[torch.Tensor, str]] = []
        if f.numeric:
            v, v0 = va[:, 0], vb[:, 0]
            tol = 1e-6 * (f.scale + max(abs(f.low), abs(f.high)))
            reasons += [(~torch.isfinite(v), "not a finite number"),
                        (v < f.low - tol, f"below the permitted minimum {f.low:g}"),
                        (v > f.high + tol, f"above the permitted maximum {f.high:g}")]
            if f.kind == "integer":
                reasons.append(((v - v.round()).abs() > 1e-6 * (1 + v.abs()), "not an integer"))
            if f.monotone == "increase":
                reasons.append((v < v0 - tol, "decreased but may only increase"))
            elif f.monotone == "decrease":
                reasons.append((v > v0 + tol, "increased but may only decrease"))
        else:
            one_hot = ((va == 0) | (va == 1)).all(dim=1) & (va.sum(dim=1) == 1)
            reasons.append((~one_hot, "not one of the known categories"))
            if f.allowed is not None:
                allowed = torch.tensor(f.allowed, dtype=torch.bool)
                ok = (va[:, allowed].sum(dim=1) == 1)
                reasons.append((one_hot & ~ok, f"a category outside the permitted {_allowed(f)}"))
        if f.immutable:
            reasons.append((torch.ones_like(changed[:, i]), "immutable but changed"))
        for hit, why in reasons:
            for r in (hit & changed[:, i]).nonzero().flatten().tolist():
                found[r].setdefault(f.name, why)
    if details:
        return found
    return torch.tensor([len(d) for d in found], dtype=torch.long)


def _allowed(f) -> list:
    return [c for c, ok in zip(f.categories, f.allowed) if ok]


def _scaled(schema: TabularSchema, x: torch.Tensor) -> torch.Tensor:
    """Columns in distance units: numeric / scale, one-hot * 0.5 (a category change costs 1 in L1)."""
    w = torch.tensor([1.0 / f.scale if f.numeric else 0.5 for f in schema.features for _ in range(f.width)],
                     dtype=torch.float64)
    return x.double() * w


def ynn(schema: TabularSchema, x_cf, cf_class, reference, reference_class, *, n_neighbors: int = 5,
        chunk: int = 2048) -> torch.Tensor:
    """``[N]`` share of the ``n_neighbors`` reference rows nearest to each counterfactual (``l1_mad``
    distance) whose class ``reference_class [M]`` (usually the model's predictions) is the
    counterfactual's class ``cf_class [N]``."""
    a, ref = rows(schema, x_cf), rows(schema, reference)
    cls = torch.as_tensor(np.asarray(cf_class)).long().flatten()
    ref_cls = torch.as_tensor(np.asarray(reference_class)).long().flatten()
    if cls.shape[0] != a.shape[0] or ref_cls.shape[0] != ref.shape[0]:
        raise InputError(f"ynn: {a.shape[0]} counterfactuals with {cls.shape[0]} classes, {ref.shape[0]} reference "
                         f"rows with {ref_cls.shape[0]} classes; pass one class per row")
    if not 1 <= n_neighbors <= ref.shape[0]:
        raise InputError(f"n_neighbors={n_neighbors}; pass 1 .. {ref.shape[0]} (the reference rows)")
    sa, sr = _scaled(schema, a), _scaled(schema, ref)
    out = torch.empty(a.shape[0], dtype=torch.float64)
    for s in range(0, a.shape[0], chunk):
        d = torch.cdist(sa[s:s + chunk], sr, p=1)
        nn_idx = d.topk(n_neighbors, dim=1, largest=False).indices
        out[s:s + chunk] = (ref_cls[nn_idx] == cls[s:s + chunk, None]).double().mean(dim=1)
    return out


def is_valid(probs, target=None, orig=None, threshold: float = 0.5) -> torch.Tensor:
    """``[N]`` bool: the class ``target [N]`` has probability >= ``threshold`` and strictly above every
    other class; where ``target`` is -1 (or ``target=None``), any class but ``orig [N]`` does."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    t = torch.full((p.shape[0],), -1, dtype=torch.long) if target is None else \
        torch.as_tensor(np.asarray(target)).long().flatten()
    if bool((t < 0).any()):
        if orig is None:
            raise InputError("is_valid: pass target (one class per row) or orig (for 'any other class')")
        orig = torch.as_tensor(np.asarray(orig)).long().flatten()
        t = torch.where(t < 0, p.scatter(1, orig[:, None], -1.0).argmax(dim=1), t)
    p_t = p.gather(1, t[:, None]).squeeze(1)
    rest = p.scatter(1, t[:, None], -1.0).amax(dim=1)
    return (p_t >= threshold) & (p_t > rest)


def redundancy(predict_proba: Callable, schema: TabularSchema, x_cf, x_orig, target=None, *, orig=None,
               threshold: float = 0.5) -> torch.Tensor:
    """``[N]`` changed features that can each be reverted alone with the counterfactual still valid.

    ``predict_proba``: schema-space rows ``[M, D]`` (float32 tensor) -> probabilities ``[M, K]``.
    ``target`` / ``orig``: as in :func:`is_valid` (the class to keep, or -1: any class but ``orig``).
    """
    a, b = _pair(schema, x_cf, x_orig)
    changed = changed_features(schema, a, b)
    r_idx, f_idx = changed.nonzero(as_tuple=True)
    out = torch.zeros(a.shape[0], dtype=torch.long)
    if r_idx.numel() == 0:
        return out
    trial = a[r_idx].clone()
    col_feat = schema.column_feature()
    revert = col_feat[None, :] == f_idx[:, None]
    trial = torch.where(revert, b[r_idx], trial)
    probs = predict_proba(trial.float())
    sel = lambda v: None if v is None else torch.as_tensor(np.asarray(v)).long().flatten()[r_idx]
    still = is_valid(probs, sel(target), sel(orig), threshold)
    out.index_add_(0, r_idx, still.long())
    return out


def diversity(schema: TabularSchema, sets: Sequence) -> dict[str, torch.Tensor]:
    """Per query: ``{"l1_mad": [B], "count": [B]}``, the mean pairwise ``l1_mad`` distance and the mean
    pairwise share of features that differ, over the counterfactuals of each set (0 for fewer
    than two). ``sets``: one DataFrame or ``[k_i, D]`` tensor per query."""
    left, right, owner = [], [], []
    for q, s in enumerate(sets):
        if len(s) < 2:
            continue
        x = rows(schema, s)
        i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
        left.append(x[i])
        right.append(x[j])
        owner.append(torch.full((i.numel(),), q, dtype=torch.long))
    dist = torch.zeros(len(sets), dtype=torch.float64)
    count = torch.zeros(len(sets), dtype=torch.float64)
    if owner:                                  # every pair of every set measured in one go
        a, b, owner = torch.cat(left), torch.cat(right), torch.cat(owner)
        pairs = torch.zeros(len(sets), dtype=torch.float64).index_add_(0, owner, torch.ones(owner.numel(),
                                                                                          dtype=torch.float64))
        dist.index_add_(0, owner, l1_mad(schema, a, b))
        count.index_add_(0, owner, changed_features(schema, a, b).double().mean(dim=1))
        dist, count = dist / pairs.clamp_min(1), count / pairs.clamp_min(1)
    return {"l1_mad": dist, "count": count}
