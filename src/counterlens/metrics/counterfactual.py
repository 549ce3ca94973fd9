"""Counterfactual quality: validity, proximity, sparsity, plausibility (IM1, IM2), nearest training image, diversity.

Every function takes plain tensors, or a result object with ``.x`` (counterfactuals), ``.x_orig``,
``.valid``, ``.target`` and ``.probs_before`` (as :class:`~counterlens.counterfactual.CounterfactualResult`
has), so the metrics also score counterfactuals from other tools. Inputs are ``[B, C, *S]`` in data
space; per-row outputs are CPU tensors ``[B]``.

IM1 and IM2 are from Van Looveren & Klaise (2019), "Interpretable counterfactual explanations guided
by prototypes": with ``AE_c`` an autoencoder fit on class ``c`` only and ``AE`` one fit on all classes,

* ``IM1 = ||x' - AE_t(x')||^2 / (||x' - AE_o(x')||^2 + eps)`` (t = target, o = original class):
  below 1 when ``x'`` looks more like the target class than like its original class;
* ``IM2 = ||AE_t(x') - AE(x')||^2 / (||x'||_1 + eps)``.

Lower is more plausible for both.
"""
from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["distances", "diversity", "im1", "im2", "nearest_training_distance", "proximity", "sparsity", "validity"]


def _tensor(x, name: str) -> torch.Tensor:
    if x is None:
        raise InputError(f"{name} is missing; pass a tensor or a counterfactual result")
    t = torch.as_tensor(x).detach().cpu()
    return t.float() if not torch.is_floating_point(t) else t


def _pair(x_cf, x_orig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_cf, x_orig, valid or None) from a result object or two tensors."""
    valid = None
    if hasattr(x_cf, "x") and hasattr(x_cf, "x_orig"):
        valid = getattr(x_cf, "valid", None)
        x_cf, x_orig = x_cf.x, x_cf.x_orig if x_orig is None else x_orig
    a, b = _tensor(x_cf, "x_cf"), _tensor(x_orig, "x_orig")
    if a.shape != b.shape or a.dim() < 2:
        raise InputError(f"x_cf has shape {tuple(a.shape)} and x_orig {tuple(b.shape)}; pass two tensors of the "
                         "same shape [B, C, *S]")
    return a, b, (torch.as_tensor(valid).bool().cpu() if valid is not None else None)


def _rows(t, b: int, name: str, dtype=torch.long) -> torch.Tensor:
    t = torch.as_tensor(t).cpu()
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise InputError(f"{name} has shape {tuple(t.shape)}; pass one value per row ([{b}]) or a scalar")
    return t.to(dtype)


def distances(x_cf, x_orig=None, *, tol: float = 1e-3) -> dict[str, torch.Tensor]:
    """Per-row ``l0`` (elements changed by more than ``tol``), ``l1`` (sum |d|), ``l2`` (sqrt of sum d^2),
    ``linf`` (max |d|) of ``d = x_cf - x_orig``; each ``[B]`` (float64 sums)."""
    a, b, _ = _pair(x_cf, x_orig)
    d = (a.double() - b.double()).flatten(1)
    return {"l0": (d.abs() > tol).sum(1).double(), "l1": d.abs().sum(1), "l2": d.pow(2).sum(1).sqrt(),
            "linf": d.abs().amax(1) if d.shape[1] else torch.zeros(d.shape[0], dtype=torch.float64)}


def validity(result_or_valid) -> float:
    """Share of valid rows: ``result.valid.float().mean()`` (or of a bool tensor ``[B]``); NaN for none."""
    valid = getattr(result_or_valid, "valid", result_or_valid)
    valid = torch.as_tensor(valid).cpu()
    if valid.dim() != 1:
        raise InputError(f"valid has shape {tuple(valid.shape)}; pass a result or a bool tensor [B]")
    return float(valid.bool().float().mean()) if valid.numel() else float("nan")


def proximity(x_cf, x_orig=None, *, valid=None, only_valid: bool = True) -> dict[str, float]:
    """Mean per-row L1 and L2 distance (``{"l1", "l2", "n"}``, n = rows averaged).

    With a result (or ``valid=`` given) and ``only_valid=True`` (default) only valid rows count, as
    distances of failed searches are not comparable; NaN when no row counts.
    """
    a, b, v = _pair(x_cf, x_orig)
    v = torch.as_tensor(valid).bool().cpu() if valid is not None else v
    d = distances(a, b)
    keep = v if (only_valid and v is not None) else torch.ones(a.shape[0], dtype=torch.bool)
    if keep.shape != (a.shape[0],):
        raise InputError(f"valid has shape {tuple(keep.shape)}; expected [{a.shape[0]}]")
    n = int(keep.sum())
    mean = (lambda t: float(t[keep].mean())) if n else (lambda t: float("nan"))
    return {"l1": mean(d["l1"]), "l2": mean(d["l2"]), "n": n}


def sparsity(x_cf, x_orig=None, *, tol: float = 1e-3, pixels: bool = False) -> torch.Tensor:
    """Per-row share of elements changed by more than ``tol``: ``[B]`` in [0, 1] (lower = sparser edit).

    ``pixels=True`` counts spatial positions instead: a pixel changed when any of its channels did.
    """
    a, b, _ = _pair(x_cf, x_orig)
    changed = (a.double() - b.double()).abs() > tol
    if pixels:
        changed = changed.any(1)
    return changed.flatten(1).double().mean(1)


def _reconstruct(ae, x: torch.Tensor) -> torch.Tensor:
    """``ae(x)`` on the autoencoder's device, no graph, back on the CPU."""
    with torch.no_grad():
        rec = ae(x.to(ae.device, torch.float32)).cpu()
    return rec


def _per_class(x: torch.Tensor, cls: torch.Tensor, aes: dict, name: str) -> torch.Tensor:
    """``AE_{cls[r]}(x[r])`` for every row, grouped by class (one call per class, not per row)."""
    out = torch.empty_like(x, dtype=torch.float32)
    for c in cls.unique().tolist():
        if c not in aes:
            raise InputError(f"{name}: no autoencoder for class {c}; ae_by_class has {sorted(aes)} "
                             "(fit one per class with fit_class_autoencoders)")
        rows = cls == c
        out[rows] = _reconstruct(aes[c], x[rows])
    return out


def _no_multilabel(result, name: str) -> None:
    if getattr(result, "multilabel", False):
        raise InputError(f"{name} compares class autoencoders, but this result is multi-label (a finding switched "
                         "on or off, not a class); score it with validity, proximity and sparsity, or pass target= "
                         "and orig_class= for autoencoders of your own grouping")


def _im_inputs(x_cf, target, orig_class):
    if hasattr(x_cf, "x"):
        if target is None or orig_class is None:
            _no_multilabel(x_cf, "im1")
        target = getattr(x_cf, "target", None) if target is None else target
        if orig_class is None and getattr(x_cf, "probs_before", None) is not None:
            orig_class = torch.as_tensor(x_cf.probs_before).argmax(1)
        x_cf = x_cf.x
    x = _tensor(x_cf, "x_cf")
    if target is None or orig_class is None:
        raise InputError("pass target and orig_class (one class per row), or a result with .target and .probs_before")
    return x, _rows(target, x.shape[0], "target"), _rows(orig_class, x.shape[0], "orig_class")


def im1(x_cf, target=None, orig_class=None, ae_by_class: dict | None = None, *, eps: float = 1e-8) -> torch.Tensor:
    """IM1 per row, ``[B]`` (see the module docstring). ``ae_by_class``: ``{class: AutoencoderPrior}``.

    ``x_cf`` may be a result: ``target`` defaults to ``result.target`` and ``orig_class`` to the
    prediction before (``result.probs_before.argmax(1)``).
    """
    if not isinstance(ae_by_class, dict) or not ae_by_class:
        raise InputError("im1: pass ae_by_class={class: autoencoder} (fit_class_autoencoders builds it)")
    x, t, o = _im_inputs(x_cf, target, orig_class)
    err_t = (x - _per_class(x, t, ae_by_class, "im1 target")).double().pow(2).flatten(1).sum(1)
    err_o = (x - _per_class(x, o, ae_by_class, "im1 orig_class")).double().pow(2).flatten(1).sum(1)
    return err_t / (err_o + eps)


def im2(x_cf, target=None, ae_by_class: dict | None = None, ae=None, *, eps: float = 1e-8) -> torch.Tensor:
    """IM2 per row, ``[B]``: ``||AE_t(x') - AE(x')||^2 / (||x'||_1 + eps)``; ``ae`` fit on all classes."""
    if not isinstance(ae_by_class, dict) or not ae_by_class or ae is None:
        raise InputError("im2: pass ae_by_class={class: autoencoder} and ae=<autoencoder fit on all classes>")
    if hasattr(x_cf, "x"):
        if target is None:
            _no_multilabel(x_cf, "im2")
        target = getattr(x_cf, "target", None) if target is None else target
        x_cf = x_cf.x
    x = _tensor(x_cf, "x_cf")
    if target is None:
        raise InputError("im2: pass target (one class per row), or a result with .target")
    t = _rows(target, x.shape[0], "target")
    num = (_per_class(x, t, ae_by_class, "im2 target") - _reconstruct(ae, x)).double().pow(2).flatten(1).sum(1)
    return num / (x.double().abs().flatten(1).sum(1) + eps)


def nearest_training_distance(x_cf, target=None, x_train=None, y_train=None, *, chunk: int | None = None,
                              return_index: bool = False):
    """Per-row L2 distance from ``x_cf [B, C, *S]`` to the nearest image of ``x_train [N, C, *S]`` whose
    label ``y_train [N]`` is the row's ``target``: ``[B]`` (float64 on the CPU).

    Computed per target class over chunks of ``chunk`` training images (default: about 64 MB of
    float64 per chunk, e.g. 167 images of 224 x 224);
    ``return_index=True`` also returns the index into ``x_train`` of each nearest image ``[B]``.
    A target class absent from ``y_train`` raises InputError.
    """
    if hasattr(x_cf, "x"):
        target = getattr(x_cf, "target", None) if target is None else target
        x_cf = x_cf.x
    x = _tensor(x_cf, "x_cf").double().flatten(1)
    t = _rows(target, x.shape[0], "target")
    xt, yt = _tensor(x_train, "x_train"), torch.as_tensor(y_train).long().cpu()
    if xt.shape[0] != yt.shape[0] or xt.flatten(1).shape[1] != x.shape[1]:
        raise InputError(f"x_train {tuple(xt.shape)} / y_train {tuple(yt.shape)} do not fit x_cf rows "
                         f"of {x.shape[1]} values; pass [N, C, *S] images and [N] labels")
    chunk = max(1, (1 << 23) // max(1, x.shape[1])) if chunk is None else chunk
    if not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk={chunk!r}: pass a positive int")
    xt = xt.flatten(1)
    best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    where = torch.full((x.shape[0],), -1, dtype=torch.long)
    for c in t.unique().tolist():
        rows = (t == c).nonzero().squeeze(1)
        idx = (yt == c).nonzero().squeeze(1)
        if idx.numel() == 0:
            raise InputError(f"nearest_training_distance: y_train has no image of target class {c}")
        for s in range(0, idx.numel(), chunk):
            part = idx[s:s + chunk]
            d = torch.cdist(x[rows], xt[part].double(), compute_mode="donot_use_mm_for_euclid_dist")
            dmin, arg = d.min(1)
            better = dmin < best[rows]
            best[rows] = torch.where(better, dmin, best[rows])
            where[rows] = torch.where(better, part[arg], where[rows])
    return (best, where) if return_index else best


def diversity(candidates) -> torch.Tensor:
    """Mean pairwise L1 distance between the ``k`` candidates of each row: ``[B, k, C, *S]`` -> ``[B]``
    (0 for k = 1). Accepts a result with ``.candidates``."""
    cands = getattr(candidates, "candidates", candidates)
    c = _tensor(cands, "candidates")
    if c.dim() < 3:
        raise InputError(f"candidates has shape {tuple(c.shape)}; expected [B, k, C, *S]")
    flat = c.double().flatten(2)
    k = flat.shape[1]
    if k < 2:
        return torch.zeros(flat.shape[0], dtype=torch.float64)
    d = torch.cdist(flat, flat, p=1)
    return d.sum((1, 2)) / (k * (k - 1))
