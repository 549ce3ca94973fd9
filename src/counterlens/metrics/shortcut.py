"""Shortcut audit: does the model decide on a suspected region (a hospital marker, a ruler, a scanner
tag) instead of the anatomy?

On every image whose region mask is not empty (images with an empty mask are left out and counted):

1. **region flip rate**: share of predictions that change when the region is *inpainted*, i.e.
   filled in data space from the pixels around it (:func:`inpaint`);
2. **random flip rate**, the control: the same for regions of the same shape and area at random
   places (the region's mask shifted inside the image, seeded, clear of the region's own bounding box
   where the image allows; ``n_random`` per image). The same fill is used, so what a fill of that size
   does to any model (its own artefacts included) shows up here and not as a false alarm;
3. per attribution method, on the predicted class: **mass lift** in the region (relevance mass /
   region share, all images; 1 = what a uniform map gives) and **confounder sensitivity**: the share
   of the region's pixels in the map's top ``top_fraction`` (10%) of pixels, on the images whose
   decision changes when the region is inpainted (chance level: ``top_fraction``).

**Decision rule.** ``relies_on_region`` when ``region_flip_rate >= min_flip_rate`` (0.1) *and*
``region_flip_rate >= ratio * random_flip_rate`` (2) *and* ``region_flip_rate >= random_flip_rate +
margin`` (0.1): at least one decision in ten hangs on the region, and clearly more than on an equal
area anywhere else. Measured in ``docs/trust.md`` (chest-xray, 200 marked films): models that use
the marker flip 0.64-1.0 of their decisions, models that do not 0-0.005, random regions 0-0.002.

Every model evaluation goes through :class:`~counterlens.attribution.base.Evaluator`: the original,
inpainted and random-region versions of a chunk of images are one batch of rows.
"""
from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution.base import Evaluator, explain, get_method
from ..errors import InputError
from .localization import expected_in_top, mass_lift, relevance_mass

__all__ = ["INPAINT_METHODS", "audit", "inpaint", "random_regions", "verdict"]

INPAINT_METHODS = ("normalized", "biharmonic")


# -- inpainting -----------------------------------------------------------------------------------
def _neighbour_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of the 2 x D axis neighbours of every pixel (edges replicated)."""
    total = torch.zeros_like(t)
    for axis in range(2, t.dim()):
        n = t.shape[axis]
        if n == 1:
            total += 2 * t
            continue
        total += torch.cat([t.narrow(axis, 1, n - 1), t.narrow(axis, n - 1, 1)], dim=axis)
        total += torch.cat([t.narrow(axis, 0, 1), t.narrow(axis, 0, n - 1)], dim=axis)
    return total / (2 * (t.dim() - 2))


def _push_pull(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fill ``v / w`` where the weight ``w`` is 0 from coarser levels (Gortler et al. 1996, push-pull).

    ``v [B, C, *S]`` weighted values, ``w [B, 1, *S]`` weights in [0, 1]; every image has some weight.
    """
    own = v / w.clamp_min(1e-12)
    if bool((w > 0).all()) or max(v.shape[2:]) == 1:
        return own
    nd = v.dim() - 2
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    coarse = _push_pull(pool(v, 2, ceil_mode=True), pool(w, 2, ceil_mode=True))
    up = F.interpolate(coarse, size=v.shape[2:], mode=("linear", "bilinear", "trilinear")[nd - 1], align_corners=False)
    trust = (4 * w).clamp(max=1)
    return trust * own + (1 - trust) * up


def _fill_normalized(x: torch.Tensor, region: torch.Tensor, smooth_steps: int = 20) -> torch.Tensor:
    """Push-pull (pyramid of normalised averages) fill, then Laplace smoothing inside the region."""
    if not 1 <= x.dim() - 2 <= 3:
        raise InputError(f"inpaint='normalized' handles 1 to 3 spatial axes; x has {x.dim() - 2}")
    hole = region.unsqueeze(1)
    known = (~hole).to(x.dtype)
    out = torch.where(hole, _push_pull(x * known, known), x)
    for _ in range(smooth_steps):            # Jacobi steps of the Laplace equation smooth the seams
        out = torch.where(hole, _neighbour_mean(out), out)
    return out


def _fill_biharmonic(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    from skimage.restoration import inpaint_biharmonic
    arr, holes = x.detach().cpu().numpy(), region.cpu().numpy()
    out = arr.copy()
    for i in np.flatnonzero(holes.reshape(len(holes), -1).any(1)):   # a solver per image (no model calls)
        out[i] = inpaint_biharmonic(arr[i], holes[i], channel_axis=0)
    return torch.from_numpy(out).to(x.device, x.dtype)


def inpaint(x, region, method: str = "normalized") -> torch.Tensor:
    """``x [B, C, *S]`` with the pixels of ``region`` (bool ``[B, *S]``) filled from around them.

    ``"normalized"`` (default, 1-3 spatial axes, on the device, batched): push-pull normalised
    averaging (a pyramid of 2x-pooled means of the known pixels; each hole pixel takes the upsampled
    mean of the finest level that has known pixels around it), then 20 Laplace (neighbour-mean) steps
    inside the hole smooth the seams. ``"biharmonic"``: scikit-image's biharmonic inpainting, one image
    at a time on the CPU (2D/3D; smoother but slower, see ``docs/trust.md``). Values stay in data space.
    """
    if method not in INPAINT_METHODS:
        raise InputError(f"inpaint={method!r}; pass one of {', '.join(INPAINT_METHODS)}")
    region = torch.as_tensor(region, device=x.device).bool()
    if region.shape != (x.shape[0], *x.shape[2:]):
        raise InputError(f"region has shape {tuple(region.shape)}; expected [{x.shape[0]}, "
                         f"{', '.join(map(str, x.shape[2:]))}] (one mask per image of x)")
    if bool(region.flatten(1).all(1).any()):
        raise InputError("a region covers its whole image; nothing is left to inpaint it from: pass a smaller region")
    return _fill(x, region, method)


def _fill(x: torch.Tensor, region: torch.Tensor, method: str) -> torch.Tensor:
    return _fill_normalized(x, region) if method == "normalized" else _fill_biharmonic(x, region)


# -- random regions of equal area -----------------------------------------------------------------
def random_regions(region, n: int, *, seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` copies per row of ``region`` (bool ``[B, *S]``) shifted to random places: ``[B, n, *S]``.

    Each copy keeps the mask's shape (so its area) and its bounding box inside the image; among 64
    seeded candidate shifts the first whose box is clear of the region's own box is taken (the first
    candidate when none is). An empty row gives empty copies.
    """
    region = torch.as_tensor(region).bool().cpu()
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    spatial = torch.tensor(region.shape[1:])
    dims = tuple(range(len(spatial)))
    out = torch.zeros((region.shape[0], n, *region.shape[1:]), dtype=torch.bool)
    for i in range(region.shape[0]):
        idx = region[i].nonzero()
        if idx.numel() == 0:
            continue
        lo, hi = idx.min(0).values, idx.max(0).values
        extent = hi - lo + 1
        origins = (torch.rand(n, 64, len(spatial), generator=gen) * (spatial - extent + 1)).long()
        clear = ~((origins <= hi) & (origins + extent > lo)).all(-1)          # [n, 64] box not overlapping
        first = torch.where(clear.any(1), clear.int().argmax(1), torch.zeros(n, dtype=torch.long))
        for j, origin in enumerate(origins[torch.arange(n), first]):
            out[i, j] = region[i].roll(tuple((origin - lo).tolist()), dims=dims)
    return out


# -- the audit -----------------------------------------------------------------------------------
def _as_region(region_masks, x: torch.Tensor) -> torch.Tensor:
    r = torch.as_tensor(np.asarray(region_masks) if not isinstance(region_masks, torch.Tensor) else region_masks)
    r = r.detach().cpu()
    spatial = tuple(x.shape[2:])
    if tuple(r.shape) == spatial:
        r = r.unsqueeze(0).expand(x.shape[0], *spatial)
    elif r.dim() == x.dim() and r.shape[1] == 1:
        r = r[:, 0]
    if tuple(r.shape) != (x.shape[0], *spatial):
        raise InputError(f"region_masks has shape {tuple(r.shape)}; expected [{x.shape[0]}, "
                         f"{', '.join(map(str, spatial))}] (one mask per image) or [{', '.join(map(str, spatial))}]")
    return (r > 0.5 if torch.is_floating_point(r) else r != 0).contiguous()


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else round(v, 4)


def _positive_set(logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64: the positive findings (logit >= 0, i.e. sigmoid >= 0.5) of each row as a bit set."""
    if logits.shape[1] > 62:
        raise InputError(f"the shortcut audit of a multi-label model handles up to 62 findings; this one has "
                         f"{logits.shape[1]}")
    bits = torch.ones(logits.shape[1], dtype=torch.long) << torch.arange(logits.shape[1])
    return ((logits >= 0).long() * bits.to(logits.device)).sum(1)


def _decide(region_rate: float, random_rate: float, min_flip_rate: float, ratio: float, margin: float) -> bool:
    return region_rate >= min_flip_rate and region_rate >= ratio * random_rate and region_rate >= random_rate + margin


def audit(clf, x, region_masks, methods=("gradcam", "integrated_gradients"), labels=None, *,
          batch_size: int = 64, seed: int = 0, n_random: int = 8, inpaint: str = "normalized",
          top_fraction: float = 0.1, min_flip_rate: float = 0.1, ratio: float = 2.0, margin: float = 0.1,
          params: dict | None = None, images_per_batch: int = 64, return_details: bool = False):
    """Audit ``clf`` for a shortcut through the region ``region_masks``; returns the ``audit.json`` content.

    Parameters
    ----------
    clf : Classifier
    x : Tensor ``[N, C, *S]`` in data space.
    region_masks : bool ``[N, *S]`` (one mask per image; images with an empty mask are left out) or
        ``[*S]`` (one region, e.g. a box, for every image).
    methods : attribution methods scored in the region (may be empty), on the predicted class.
    labels : optional ``[N]`` class indices: adds ``accuracy`` and ``accuracy_region_removed``
        (single-label models). A multi-label model's decision is its set of positive findings
        (sigmoid >= 0.5): a flip is any finding switching, counted per finding in ``flips``
        (``{"effusion on -> off": count}``); maps explain the most probable finding.
    batch_size : rows per model call. seed : random regions and random methods.
    n_random : random regions per image (8). inpaint : ``"normalized"`` or ``"biharmonic"`` (:func:`inpaint`).
    top_fraction : the "top 10%" of confounder sensitivity. min_flip_rate, ratio, margin : the decision
        rule (module docstring). params : ``{method: {name: value}}``.
    images_per_batch : images whose original, inpainted and random versions go to the model together.
    return_details : also return ``{"index", "region", "pred", "pred_region", "probs", "flipped",
        "random_flips", "maps", "seconds"}`` (per audited image, for storing them).

    Returns a JSON-ready dict: ``relies_on_region``, ``region_flip_rate``, ``random_flip_rate``,
    ``n_images``, ``flips`` (``{"pneumonia -> normal": count}``), ``methods`` (per method ``mass_lift``,
    ``confounder_sensitivity`` (None when no decision changed), ``relevance_mass``, ...), ``verdict``.
    """
    if inpaint not in INPAINT_METHODS:
        raise InputError(f"inpaint={inpaint!r}; pass one of {', '.join(INPAINT_METHODS)}")
    if not isinstance(n_random, int) or n_random < 1:
        raise InputError(f"n_random={n_random!r}; pass a positive number of random regions per image (e.g. 8)")
    if not 0 < top_fraction < 1:
        raise InputError(f"top_fraction={top_fraction!r}; pass a share of pixels in (0, 1), e.g. 0.1")
    if not isinstance(images_per_batch, int) or images_per_batch < 1:
        raise InputError(f"images_per_batch={images_per_batch!r}; pass a positive number of images, e.g. 64")
    methods = [get_method(m).name for m in methods]
    params = {get_method(k).name: v for k, v in (params or {}).items()}
    if set(params) - set(methods):
        raise InputError(f"params given for {sorted(set(params) - set(methods))}, which are not among methods={methods}")
    x = clf.as_input(x)
    region = _as_region(region_masks, x)
    has = region.flatten(1).any(1)
    if not bool(has.any()):
        raise InputError("region_masks is empty for every image; pass masks that mark the suspected region")
    if bool(region.flatten(1).all(1).any()):
        raise InputError("a region mask covers its whole image; pass a mask of the suspected region only")
    index = has.nonzero().squeeze(1)
    if labels is not None:
        y = torch.as_tensor(labels).view(-1).cpu()
        if len(y) != x.shape[0]:
            raise InputError(f"labels has {len(y)} entries for {x.shape[0]} images; pass one label per image or None")
    xs, rs = x[index.to(x.device)], region[index]
    n = len(index)
    evaluator, gen = Evaluator(clf, batch_size), torch.Generator().manual_seed(int(seed))
    pred, pred_region, random_flips, probs, dec, dec_region = [], [], [], [], [], []
    for a in range(0, n, images_per_batch):
        xb, rb = xs[a:a + images_per_batch], rs[a:a + images_per_batch].to(x.device)
        rnd = random_regions(rb.cpu(), n_random, generator=gen).flatten(0, 1).to(x.device)
        rows = torch.cat([xb, _fill(xb, rb, inpaint), _fill(xb.repeat_interleave(n_random, 0), rnd, inpaint)])
        logits = evaluator.logits(rows).cpu()
        p, b = logits.argmax(1), len(xb)
        d = _positive_set(logits) if clf.multilabel else p      # the decision: a class, or the positive findings
        probs.append(clf.probs_of(logits[:b].double()))      # softmax, or per-finding sigmoid
        pred.append(p[:b])
        pred_region.append(p[b:2 * b])
        dec.append(d[:b])
        dec_region.append(d[b:2 * b])
        random_flips.append((d[2 * b:].view(b, n_random) != d[:b, None]).double().mean(1))
    pred, pred_region, random_flips = torch.cat(pred), torch.cat(pred_region), torch.cat(random_flips)
    dec, dec_region = torch.cat(dec), torch.cat(dec_region)
    flipped = dec_region != dec
    region_rate, random_rate = flipped.double().mean().item(), random_flips.mean().item()
    relies = _decide(region_rate, random_rate, min_flip_rate, ratio, margin)

    names = clf.class_names(clf.n_classes)
    if clf.multilabel:      # per finding that switched
        flips = Counter(f"{names[k]} {'on -> off' if (a >> k) & 1 else 'off -> on'}"
                        for a, b in zip(dec[flipped].tolist(), dec_region[flipped].tolist())
                        for k in range(len(names)) if ((a ^ b) >> k) & 1)
    else:
        flips = Counter(f"{names[a]} -> {names[b]}" for a, b in zip(pred[flipped].tolist(), pred_region[flipped].tolist()))
    result = {
        "relies_on_region": bool(relies), "region_flip_rate": round(region_rate, 4),
        "random_flip_rate": round(random_rate, 4), "n_images": n, "n_flipped": int(flipped.sum()),
        "n_without_region": int((~has).sum()), "n_random": n_random, "inpaint": inpaint,
        "region_share": round(rs.flatten(1).double().mean(1).mean().item(), 5), "flips": dict(flips),
        "decision_rule": {"min_flip_rate": min_flip_rate, "ratio": ratio, "margin": margin,
                          "text": f"relies_on_region = region_flip_rate >= {min_flip_rate} and region_flip_rate >= "
                                  f"{ratio} x random_flip_rate and region_flip_rate >= random_flip_rate + {margin}"},
        "top_fraction": top_fraction, "methods": {}, "seed": seed,
    }
    if labels is not None and not clf.multilabel:
        result["accuracy"] = round((pred == y[index]).double().mean().item(), 4)
        result["accuracy_region_removed"] = round((pred_region == y[index]).double().mean().item(), 4)
    extras = {"index": index, "region": rs, "pred": pred, "pred_region": pred_region, "flipped": flipped,
              "probs": torch.cat(probs), "random_flips": random_flips, "maps": {}, "seconds": {}}
    for method in methods:
        t0 = time.perf_counter()
        maps = torch.cat([explain(clf, xs[a:a + images_per_batch], pred[a:a + images_per_batch].to(clf.device),
                                  methods=[method], batch_size=batch_size, seed=seed,
                                  **({method: params[method]} if method in params else {}))[method]
                          for a in range(0, n, images_per_batch)])
        extras["seconds"][method] = time.perf_counter() - t0
        extras["maps"][method] = maps
        lift = mass_lift(maps, rs)
        flat, reg = maps.flatten(1).double(), rs.flatten(1)
        top = torch.full((n,), math.ceil(top_fraction * flat.shape[1]))
        sens = expected_in_top(flat, reg, top) / reg.sum(1).double()
        result["methods"][method] = {
            "mass_lift": _num(lift.nanmean()), "confounder_sensitivity": _num(sens[flipped].mean()) if flipped.any() else None,
            "relevance_mass": _num(relevance_mass(maps, rs).nanmean()),
            "mass_lift_median": _num(lift.nanmedian()) if not bool(lift.isnan().all()) else None,
            "n_maps_without_positive_relevance": int(lift.isnan().sum())}
    result["verdict"] = verdict(result)
    return (result, extras) if return_details else result


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%" if v >= 0.01 or v == 0 else f"{100 * v:.1f}%"


def verdict(result: dict) -> str:
    """The plain-language verdict of an audit result, with its numbers."""
    rate, rnd, n = result["region_flip_rate"], result["random_flip_rate"], result["n_images"]
    numbers = (f"{_pct(rate)} of decisions change when it is removed, {_pct(rnd)} for random regions of the same "
               f"size ({n} images with the region, {result['n_random']} random regions each)")
    if result["relies_on_region"]:
        text = f"The model relies on the region: {numbers}."
        if result.get("flips"):
            text += " Changes: " + ", ".join(f"{k} ({v})" for k, v in result["flips"].items()) + "."
    else:
        text = f"No alarm: the model does not rely on the region: {numbers}."
        line = result.get("decision_rule", {}).get("min_flip_rate", 0.1)
        if rate >= 0.05 and rate >= 2 * rnd and rate < line:
            text += (f" Still, {_pct(rate)} is a partial dependence below the alarm line ({_pct(line)}): "
                     "look at the changed cases.")
    parts = []
    for method, m in result["methods"].items():
        lift = m["mass_lift"]
        if lift is None:
            parts.append(f"{method} gave no positive relevance")
            continue
        sens = m["confounder_sensitivity"]
        part = f"{method} puts {lift:.1f}x the region's share of relevance into it"
        if sens is not None:
            part += f" ({_pct(sens)} of its pixels in the top {_pct(result['top_fraction'])} where decisions change)"
        if result["relies_on_region"] and lift <= 1:
            part += ": on its own this map would have hidden the shortcut"
        elif not result["relies_on_region"] and lift >= 2:
            part += ": a map-only audit would have raised a false alarm"
        parts.append(part)
    if parts:
        text += " Attribution: " + "; ".join(parts) + "."
    if n < 20:
        text += f" Only {n} images had the region: treat the numbers as indicative."
    return text
