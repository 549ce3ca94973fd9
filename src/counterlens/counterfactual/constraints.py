"""Constraints and distances of a counterfactual search, in data space.

- the box: the valid value range of the data (``clf.value_range`` or a user range, never the
  normalised space the network sees), scalars or tensors that broadcast to ``[B, C, *S]``;
- the editable mask: only these elements may change; every other element is reset to the
  original *exactly* after every step;
- distances: elastic net (L1 + squared L2, averaged per element) for the loss, total variation
  of the edit over any number of spatial axes, and the reported L0 / L1 / L2 / Linf norms.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor, nn

from ..errors import InputError

L0_TOL = 1e-6   # an element counts as changed when |x' - x| > L0_TOL * (high - low)


# -- the box --------------------------------------------------------------------------------------
def resolve_box(clf, x: Tensor, value_range=None) -> tuple[Tensor, Tensor]:
    """``(low, high)`` as tensors on ``x``'s device that broadcast to ``x`` (``[1 or B, 1 or C, *S]``).

    ``value_range``: ``(low, high)`` of numbers or tensors; default ``clf.value_range``, else
    ``(x.min(), x.max())`` of the whole batch (pass a range for results independent of the batch).
    Raises :class:`InputError` for ``low >= high``, non-finite bounds or ``x`` outside the box.
    """
    if value_range is None:
        value_range = getattr(clf, "value_range", None)
    if value_range is None:
        value_range = (x.min(), x.max())
        if not bool(value_range[0] < value_range[1]):
            value_range = (value_range[0], value_range[0] + 1.0)
    try:
        low, high = value_range
    except (TypeError, ValueError) as exc:
        raise InputError(f"value_range={value_range!r}; pass (low, high), e.g. (0, 1)") from exc
    low, high = (_bound(v, x, name) for v, name in ((low, "low"), (high, "high")))
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise InputError("value_range has non-finite bounds; pass finite (low, high)")
    if not bool((low < high).all()):
        raise InputError(f"value_range={_show(value_range)}: low must be below high everywhere")
    slack = 1e-5 * (high - low)
    if bool((x < low - slack).any() or (x > high + slack).any()):
        raise InputError(f"x has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside "
                         f"value_range={_show(value_range)}; pass the data's own range as value_range "
                         "(in data space, not the normalised space)")
    return low, high


def _bound(v, x: Tensor, name: str) -> Tensor:
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return torch.tensor(float(v), dtype=x.dtype, device=x.device).view((1,) * x.dim())
    if isinstance(v, Tensor):
        v = v.detach().to(device=x.device, dtype=x.dtype)
        if v.dim() == 0:
            return v.view((1,) * x.dim())
        try:
            torch.broadcast_shapes(v.shape, x.shape)
        except RuntimeError as exc:
            raise InputError(f"value_range {name} has shape {tuple(v.shape)}, which does not broadcast to "
                             f"x {tuple(x.shape)}; pass a number or a tensor [1 or B, 1 or C, *S]") from exc
        if v.dim() != x.dim():
            raise InputError(f"value_range {name} has {v.dim()} axes; x has {x.dim()} ({tuple(x.shape)})")
        return v
    raise InputError(f"value_range {name}={v!r}; pass a number or a tensor")


def _show(value_range) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" if isinstance(v, (numbers.Real, Tensor)) and
                           (not isinstance(v, Tensor) or v.numel() == 1) else "tensor" for v in value_range) + ")"


# -- the editable mask ----------------------------------------------------------------------------
def resolve_editable(editable, x: Tensor) -> Tensor | None:
    """The editable mask as bool ``[B, C, *S]`` on ``x``'s device (None: everything editable).

    ``editable``: bool (or 0/1) tensor or array ``[1 or B, 1 or C, *S]``; ``[*S]`` alone is
    taken as one mask for every image and channel.
    """
    if editable is None:
        return None
    m = torch.as_tensor(editable)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise InputError("editable must be a bool mask (or 0/1 values); it has other values")
        m = m != 0
    spatial = tuple(x.shape[2:])
    if tuple(m.shape) == spatial:
        m = m.view(1, 1, *spatial)
    if m.dim() != x.dim() or tuple(m.shape[2:]) != spatial or m.shape[0] not in (1, x.shape[0]) \
            or m.shape[1] not in (1, x.shape[1]):
        raise InputError(f"editable has shape {tuple(m.shape)}; for x {tuple(x.shape)} pass a bool mask "
                         f"[1 or {x.shape[0]}, 1 or {x.shape[1]}, {', '.join(map(str, spatial))}]")
    return m.to(x.device).expand_as(x).contiguous()


def rows_of(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of a box or mask tensor whose batch axis is 1 (broadcast) or one per row."""
    return t if t.shape[0] == 1 else t[idx]


def project(x_new: Tensor, x_orig: Tensor, low: Tensor, high: Tensor, editable: Tensor | None) -> Tensor:
    """Clamp to ``[low, high]``, then reset every element outside ``editable`` to ``x_orig`` exactly."""
    out = torch.minimum(torch.maximum(x_new, low), high)
    return out if editable is None else torch.where(editable, out, x_orig)


# -- distances ------------------------------------------------------------------------------------
def elastic_distance(d: Tensor, l1: float = 1.0, l2: float = 1.0) -> Tensor:
    """``l1 * mean|d| + l2 * mean(d^2)`` per row (``[R]``) of ``d`` ``[R, ...]``."""
    flat = d.flatten(1)
    out = flat.new_zeros(flat.shape[0])
    if l1:
        out = out + l1 * flat.abs().mean(dim=1)
    if l2:
        out = out + l2 * flat.square().mean(dim=1)
    return out


def total_variation(d: Tensor) -> Tensor:
    """Anisotropic total variation per row, ``[R]``: the mean absolute difference of neighbours,
    summed over every spatial axis (2 for images, 3 for volumes, 1 for signals) of ``[R, C, *S]``."""
    out = d.new_zeros(d.shape[0])
    for axis in range(2, d.dim()):
        if d.shape[axis] > 1:
            out = out + d.diff(dim=axis).abs().flatten(1).mean(dim=1)
    return out


def distances(x: Tensor, x_orig: Tensor, scale: Tensor | float = 1.0) -> dict[str, Tensor]:
    """``{"l0", "l1", "l2", "linf"}`` -> ``[B]`` norms of ``x - x_orig`` (float64 sums).

    ``l0`` counts elements changed by more than ``L0_TOL * scale`` (``scale`` = high - low).
    """
    d = (x - x_orig).double()
    tol = L0_TOL * torch.as_tensor(scale, dtype=torch.float64, device=d.device)
    flat, big = d.flatten(1), (d.abs() > tol).flatten(1)
    return {"l0": big.sum(dim=1).to(torch.float64), "l1": flat.abs().sum(dim=1),
            "l2": flat.square().sum(dim=1).sqrt(), "linf": flat.abs().amax(dim=1)}


# -- argument checks ------------------------------------------------------------------------------
def check_number(name: str, value, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, integer: bool = False):
    """Raise :class:`InputError` naming ``name`` unless ``low <= value <= high`` (open ends as told)."""
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(float(value))
                                                  and value != math.inf):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{name}={value!r}; pass {kind}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo = ("(" if low_open else "[") + f"{low:g}"
        hi = f"{high:g}" + (")" if high_open else "]")
        raise InputError(f"{name}={value!r} is out of range; pass a value in {lo}, {hi}")
    return value


def check_search_params(**p) -> dict:
    """Validate the numeric and string settings of :func:`counterfactual`; return them as a dict."""
    if p["loss"] not in ("hinge", "ce"):
        raise InputError(f"loss={p['loss']!r}; pass 'hinge' (logit margin) or 'ce' (cross-entropy)")
    check_number("threshold", p["threshold"], high=1.0, high_open=True)
    for name in ("kappa", "l1", "l2", "tv", "init_noise", "prior_weight", "proto_weight"):
        check_number(name, p[name])
    if isinstance(p["lam"], str) and p["lam"] != "auto":
        raise InputError(f"lam={p['lam']!r}; pass a positive number or 'auto'")
    if p["lam"] != "auto":
        check_number("lam", p["lam"], low_open=True)
    if p["schedule"] not in ("adaptive", "bisection"):
        raise InputError(f"schedule={p['schedule']!r}; pass 'adaptive' (lambda follows validity step by step) "
                         "or 'bisection' (one optimisation per lambda)")
    adaptive = p["schedule"] == "adaptive"
    if p["early_stop"] is None:
        p = {**p, "early_stop": 6 if adaptive else 50}
    if p["lr"] is None:
        p = {**p, "lr": 0.1 if adaptive else 0.01}
    if p["lam_factor"] is None:
        p = {**p, "lam_factor": 2.0 if p["lam"] == "auto" else 10.0}
    check_number("lam_factor", p["lam_factor"], low=1.0, low_open=True)
    check_number("lr", p["lr"], low_open=True)
    for name in ("lam_steps", "steps", "candidates"):
        check_number(name, p[name], low=1, integer=True)
    if p["early_stop"] is not None:
        check_number("early_stop", p["early_stop"], low=0, integer=True)
    check_number("seed", p["seed"], integer=True, high=2 ** 32 - 1)
    floats = ("threshold", "kappa", "l1", "l2", "tv", "lam", "lam_factor", "lr", "init_noise", "prior_weight",
              "proto_weight")
    out = dict(p)
    for k, v in p.items():
        if k in floats and v != "auto":
            out[k] = float(v)
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
            out[k] = int(v)
    return out


def check_prior(clf, x, prior, prior_weight, prototypes, proto_weight, latent, n_classes):
    """Check that ``prior`` has what the prior terms need and is on the model's device; return the
    prototypes flattened (``[K, L]`` or per image ``[B, K, L]``) on the device, or None."""
    needs = {"reconstruction_error": prior_weight > 0, "encode": proto_weight > 0 or latent, "decode": latent}
    if any(needs.values()) and prior is None:
        used = "latent=True" if latent else "prior_weight > 0" if prior_weight > 0 else "proto_weight > 0"
        raise InputError(f"{used} needs prior=...: an autoencoder with encode/decode/reconstruction_error "
                         "(counterlens.counterfactual.fit_prior)")
    for method, needed in needs.items():
        if needed and not callable(getattr(prior, method, None)):
            raise InputError(f"prior {type(prior).__name__} has no {method}(); it needs encode, decode and "
                             "reconstruction_error")
    if isinstance(prior, nn.Module):
        devices = {t.device for t in list(prior.parameters()) + list(prior.buffers())}
        here = clf.device
        if any(d.type != here.type or (here.index is not None and d.index != here.index) for d in devices):
            raise InputError(f"prior is on {sorted(map(str, devices))} but the model on {clf.device}; "
                             f"move it with prior.to({str(clf.device)!r})")
    if proto_weight > 0 and prototypes is None:
        raise InputError("proto_weight > 0 needs prototypes=[K, *latent] (counterfactual.class_prototypes)")
    if prototypes is None or not proto_weight:
        return None
    protos = torch.as_tensor(prototypes).detach().to(device=clf.device, dtype=torch.float32)
    with torch.no_grad(), prior_eval_mode(prior):
        code_shape = tuple(prior.encode(x[:1]).shape[1:])
    per_image = protos.dim() == len(code_shape) + 2
    want = (x.shape[0], n_classes, *code_shape) if per_image else (n_classes, *code_shape)
    if tuple(protos.shape) != want:
        raise InputError(f"prototypes has shape {tuple(protos.shape)}; expected [{n_classes}, "
                         f"{', '.join(map(str, code_shape))}] (one code per class) or [B, {n_classes}, ...]")
    return protos.flatten(2) if per_image else protos.flatten(1)


@contextlib.contextmanager
def prior_eval_mode(prior):
    """Eval mode for a prior that is an ``nn.Module``; every submodule's own flag comes back after."""
    if not isinstance(prior, nn.Module):
        yield
        return
    saved = [(m, m.training) for m in prior.modules()]
    try:
        prior.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag
