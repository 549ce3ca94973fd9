"""Class activation maps: Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM, Guided Grad-CAM.

One small core, in the style of pytorch-grad-cam: :func:`layer_gradients` runs the model in chunks
of ``batch_size`` images and hands each chunk's activations ``A [b, K, *s]`` and gradients
``G = dS/dA [b, K, *s]`` (``S`` the target logit) to a ``combine(A, G) -> [b, *s]`` function; each
gradient CAM is that one function. :func:`class_activation_map` adds the ReLU and the upsampling to
the input's spatial size. Score-CAM reuses the same helper forward-only and evaluates its masked
inputs through :class:`Evaluator`.

The target layer is found by itself for any input shape (1D, 2D, 3D; see :func:`find_target_layer`)
or named, ``layer="features.3"``. Hooks live in context managers and are removed on error; the
layer's output is captured by a forward hook that passes a copy on, so later in-place operations
(``ReLU(inplace=True)``, ``out += identity``) cannot change what the map is computed from.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, MethodError
from . import tokens as token_maps
from .graphs import hookable
from .base import Evaluator, gradient_of, prepare, register, spatial_dims, target_score
from .gradients import make_baseline

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- the target layer -----------------------------------------------------------------------------
def find_target_layer(clf, x: torch.Tensor) -> str:
    """Name of the module whose output is the model's last feature map.

    One probe forward of ``x[:1]`` records, in the order modules finish, every output with as many
    axes as ``x`` (``[B, C', *spatial']``) and more than one position: so a 1D, 2D or 3D model each
    gets its last feature map. Of the modules that returned that same tensor in its final state
    (same object, no in-place change since), the innermost one called once per forward is chosen:
    ``features.4`` rather than its container ``features``; the in-place ReLU rather than the conv
    before it; a residual block (``layer4.1``) rather than its reused ReLU module. Functional code in
    the model's own ``forward`` after the last module (``F.relu(h + self.block(h))``) is not a module:
    the map is then taken at the last module before it; name another with ``layer=...``.

    A vision transformer (token outputs ``[B, N, D]`` after the last spatial map, see
    :mod:`.tokens`) gets the last token layer whose gradient reaches the patch tokens (the last
    block's ``norm1`` in the usual layout).
    """
    if not isinstance(clf.module, nn.Module):
        raise MethodError("CAM methods need an nn.Module to hook; pass layer=... or use another method")
    rec = token_maps.probe(clf, x)
    if token_maps.transformer_after_maps(rec):
        return token_maps.find_token_layer(clf, x)
    names, calls, seen = rec["names"], rec["calls"], rec["spatial"]
    if not seen:
        raise MethodError("no module of this model has a spatial output; name one with layer='features.3'")
    _, last, version = seen[-1]
    same = [m for m, out, v in seen if out is last and v == version and calls[m] == 1]
    return names[same[0] if same else seen[-1][0]]


def get_layer(clf, layer: str | nn.Module | None, x: torch.Tensor) -> nn.Module:
    """The module to hook: given, named (``"features.3"``) or found by :func:`find_target_layer`."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is not None and not isinstance(layer, str):
        raise InputError(f"layer={layer!r}; pass a module name such as 'features.3', a module, or None")
    if layer is None:   # found once per input shape, then remembered on the classifier
        found = clf.__dict__.setdefault("_target_layers", {})
        key = (tuple(x.shape[1:]), id(clf.module))
        if key not in found:
            found[key] = find_target_layer(clf, x)
        name = found[key]
    else:
        name = layer
    modules = dict(clf.module.named_modules()) if isinstance(clf.module, nn.Module) else {}
    if name and name not in modules:       # inside a wrapper (an exported program's view): by its suffix
        inner = [n for n in modules if n.endswith("." + name)]
        name = inner[0] if len(inner) == 1 else name
    if name not in modules or not name:
        raise InputError(f"layer={name!r} is not a module of this model; "
                         f"some names: {', '.join(list(modules)[1:12])}{' ...' if len(modules) > 12 else ''}")
    return modules[name]


def _layer_name(clf, layer: nn.Module) -> str:
    names = {m: n for n, m in clf.module.named_modules()} if isinstance(clf.module, nn.Module) else {}
    return repr(names[layer]) if names.get(layer) else type(layer).__name__


# -- the shared core ------------------------------------------------------------------------------
@contextlib.contextmanager
def capture(layer: nn.Module):
    """Record the layer's output of the next forward passes in ``store['act']`` (the last call wins)."""
    store: dict = {}

    def hook(_module, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise MethodError(f"layer {type(_module).__name__} returns {type(out).__name__}, not a tensor; "
                              "name another layer with layer=...")
        store["act"] = out
        return out.clone()

    if isinstance(layer, torch.jit.ScriptModule):
        raise MethodError(f"layer {type(layer).__name__} is a TorchScript part of an eager model, whose output "
                          "cannot be hooked; name an eager layer with layer=..., or give the whole model as TorchScript")
    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def layer_gradients(clf, x, tgt, layer, batch_size, combine: Combine | None = None, *, grad: bool = True,
                    reshape=None, tokens: int | None = None):
    """Activations ``A [B, K, *s]`` and gradients ``G = dS/dA`` of the target logit at ``layer``.

    A layer returning tokens ``[B, N, D]`` (a vision transformer) gives ``A`` and ``G`` as
    ``[B, D, *grid]``: extra tokens dropped, patch tokens on the patch grid (``reshape``, ``tokens``:
    see :mod:`.tokens`). Both are float32 whatever the layer's dtype.

    The model runs through :class:`Evaluator` in chunks of ``batch_size`` images, in eval mode.
    With ``combine``, returns ``cat(combine(A_chunk, G_chunk))`` so that only one chunk's ``A`` and
    ``G`` are held at a time; without, returns ``(A, G)``. ``grad=False``: forward only, ``G`` is None.
    """
    parts: list = []
    grid: dict = {}

    def as_map(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == x.dim():
            return t
        name = _layer_name(clf, layer)
        if token_maps.is_token_output(t, x):
            if "grid" not in grid:
                grid["grid"] = token_maps.token_grid(clf, x, t.shape[1], reshape, tokens, name)
            return token_maps.tokens_to_map(t, grid["grid"], tokens, name)
        raise MethodError(f"layer {name} returns shape {tuple(t.shape)}; CAM methods need a feature map "
                          f"[B, C, *spatial] or tokens [B, N, D] for input {tuple(x.shape)}; name another layer "
                          "with layer=...")

    def work(a: int, b: int):
        with capture(layer) as store, torch.set_grad_enabled(grad):
            xb = x[a:b].detach().requires_grad_(grad)   # so frozen models still get a graph
            logits = clf.forward(xb)
            if "act" not in store:
                raise MethodError(f"layer {type(layer).__name__} was not called by the model's forward; "
                                  "name another one with layer=...")
            act = store["act"]
            if act.shape[0] != b - a:
                raise MethodError(f"layer {_layer_name(clf, layer)} saw {act.shape[0]} rows in a call with {b - a} (a model "
                                  "that pads or splits its batch, e.g. an export with a fixed batch size): CAM methods "
                                  "need one call per batch; export the model with a dynamic batch")
            g = as_map(gradient_of(target_score(logits, tgt[a:b]), act).float()) if grad else None
            act = as_map(act.detach().float())      # bf16 / fp16 / autocast layers: the CAM maths in float32
        parts.append(combine(act, g) if combine is not None else (act, g))

    with clf.eval_mode():
        Evaluator(clf, batch_size).run(x.shape[0], work)
    if combine is not None:
        return torch.cat(parts)
    return torch.cat([p[0] for p in parts]), (torch.cat([p[1] for p in parts]) if grad else None)


_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(cam: torch.Tensor, size, interpolation: str = "linear") -> torch.Tensor:
    """``[B, *s]`` -> ``[B, *size]``. ``interpolation``: ``"linear"`` (bi/trilinear by the number of
    spatial axes; ``"bilinear"`` and ``"trilinear"`` are the same) or ``"nearest"`` (Captum's default)."""
    if interpolation in ("linear", "bilinear", "trilinear"):
        mode, kwargs = _LINEAR[cam.dim() - 1], {"align_corners": False}
    elif interpolation == "nearest":
        mode, kwargs = "nearest", {}
    else:
        raise InputError(f"interpolation={interpolation!r}; pass 'linear' (bi/trilinear) or 'nearest'")
    return F.interpolate(cam[:, None], size=tuple(size), mode=mode, **kwargs)[:, 0]


def weighted_maps(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k`` -> ``[b, *s]``: weights ``[b, K]``, ``[b, K, 1, ...]`` or ``[b, K, *s]``; ``A [b, K, *s]``."""
    if weights.dim() == 2:
        weights = weights.view(*weights.shape, *([1] * (acts.dim() - 2)))
    return (weights * acts).sum(dim=1)


def class_activation_map(clf, x, target, combine: Combine, *, layer=None, relu: bool = True,
                         interpolation: str = "linear", batch_size: int = 64, reshape=None,
                         tokens: int | None = None) -> torch.Tensor:
    """``upsample(relu(combine(A, G)))`` at the input's spatial size, ``[B, *spatial]``.
    ``reshape`` / ``tokens``: the patch grid and extra tokens of a token layer (see :mod:`.tokens`)."""
    x, tgt = prepare(clf, x, target, batch_size)
    clf = hookable(clf, x)          # TorchScript / torch.export: a view whose layers can be hooked
    cam = layer_gradients(clf, x, tgt, get_layer(clf, layer, x), batch_size, combine, reshape=reshape, tokens=tokens)
    if relu:
        flat = cam.flatten(1)
        dark = (flat.amax(dim=1) <= 0) & (flat.amin(dim=1) < 0)
        if bool(dark.any()):
            warnings.warn(f"{int(dark.sum())} of {cam.shape[0]} class activation maps are zero: the weighted "
                          "feature maps are negative everywhere for their target, so the ReLU removes all of it "
                          "(Grad-CAM's mean-gradient weights assume a head that averages over positions; a flatten "
                          "+ dense head breaks that); layercam or gradcam_plus_plus, or relu=False, show these images",
                          stacklevel=3)
        cam = cam.clamp_min(0)
    return upsample(cam, x.shape[2:], interpolation)


# -- gradient CAMs: one combine function each -----------------------------------------------------
def _gradcam(acts, grads):
    return weighted_maps(grads.mean(dim=spatial_dims(grads), keepdim=True), acts)


def _gradcam_plus_plus(acts, grads):
    g2 = grads.pow(2)
    denom = 2 * g2 + acts.sum(dim=spatial_dims(acts), keepdim=True) * g2 * grads
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return weighted_maps((alpha * grads.clamp_min(0)).sum(dim=spatial_dims(grads), keepdim=True), acts)


def _layercam(acts, grads):
    return (grads.clamp_min(0) * acts).sum(dim=1)


@register("cam", "ReLU of gradient-weighted feature maps at the last spatial layer (Selvaraju et al. 2017)")
def gradcam(clf, x, target="predicted", *, layer: str | None = None, relu: bool = True,
            batch_size: int = 64, reshape=None, tokens: int | None = None) -> torch.Tensor:
    """Grad-CAM: channel weights = spatial mean of the gradients; map = ReLU(sum_c w_c A_c),
    upsampled (bi/trilinear) to the input's spatial size, ``[B, *spatial]``.
    ``layer``: module name (default: found by :func:`find_target_layer`). A layer returning
    tokens ``[B, N, D]`` (vision transformers) is reshaped to the patch grid, found from the model or
    given as ``reshape=(h, w)``; ``tokens``: how many extra (class, register) tokens lead
    (default: ``N - h * w``); see :mod:`counterlens.attribution.tokens`."""
    return class_activation_map(clf, x, target, _gradcam, layer=layer, relu=relu, batch_size=batch_size,
                                reshape=reshape, tokens=tokens)


@register("cam", "Grad-CAM with second-order pixel weights on positive gradients (Chattopadhay et al. 2018)")
def gradcam_plus_plus(clf, x, target="predicted", *, layer: str | None = None, batch_size: int = 64,
                      reshape=None, tokens: int | None = None) -> torch.Tensor:
    """Grad-CAM++, ``[B, *spatial]``.

    With ``G = dS/dA`` of the target logit ``S`` and the paper's exponential score ``Y = exp(S)``
    (which turns its second and third derivatives into ``G^2``, ``G^3``):
    ``alpha = G^2 / (2 G^2 + sum_s(A_k) G^3)`` (0 where the denominator is 0),
    ``w_k = sum_s(alpha * relu(G))`` (the positive per-image factor ``exp(S)`` is dropped, as in
    pytorch-grad-cam), map = ReLU(sum_k w_k A_k), upsampled (bi/trilinear).
    Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
    Networks", WACV 2018. ``reshape``, ``tokens``: for token layers, as in :func:`gradcam`.
    """
    return class_activation_map(clf, x, target, _gradcam_plus_plus, layer=layer, batch_size=batch_size,
                                reshape=reshape, tokens=tokens)


@register("cam", "ReLU of feature maps weighted pixel-wise by their positive gradients (Jiang et al. 2021)")
def layercam(clf, x, target="predicted", *, layer: str | None = None, batch_size: int = 64,
             reshape=None, tokens: int | None = None) -> torch.Tensor:
    """Layer-CAM: map = ReLU(sum_k relu(G_k) * A_k), upsampled (bi/trilinear), ``[B, *spatial]``.
    Works at shallow layers too (``layer="features.0"``). Jiang et al., "LayerCAM: Exploring
    Hierarchical Class Activation Maps for Localization", IEEE TIP 2021."""
    return class_activation_map(clf, x, target, _layercam, layer=layer, batch_size=batch_size,
                                reshape=reshape, tokens=tokens)


# -- score-CAM and guided grad-CAM ----------------------------------------------------------------
@register("cam", "feature maps weighted by the confidence gain of the input masked with each (Wang et al. 2020)")
def scorecam(clf, x, target="predicted", *, layer: str | None = None, baseline="zeros",
             output: str = "prob", batch_size: int = 64, reshape=None, tokens: int | None = None) -> torch.Tensor:
    """Score-CAM, batched over (image, channel) rows, ``[B, *spatial]``.

    For each image and each of the layer's ``K`` maps: upsample the map (bi/trilinear) to the
    input size, min-max normalise it to a mask ``H_k`` in [0, 1] (a constant map gets mask 0), and
    score ``X_k = X_b + H_k * (X - X_b)`` (``X * H_k`` for the default zero baseline ``X_b``).
    The channel weight is the paper's increase in confidence, ``w_k = f(X_k) - f(X_b)``, with ``f``
    the target's softmax probability (``output="prob"``, as in the paper; ``"logit"`` also works).
    Map = ReLU(sum_k w_k A_k) at the layer, then upsampled (bi/trilinear), like the other CAMs.
    Others differ: the authors' code (haofanwang/Score-CAM) weights by ``f(X_k)`` without
    ``f(X_b)`` and applies the ReLU after upsampling; pytorch-grad-cam takes a softmax over ``k`` of
    the masked target logits and upsamples the masks with ``align_corners=True``.

    ``baseline``: ``"zeros"``, ``"blur"``, a number or a tensor (see ``make_baseline``).
    The ``B * K`` masked inputs are built chunk by chunk inside the evaluator, never all at once.
    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR Workshops 2020.
    """
    x, tgt = prepare(clf, x, target, batch_size)
    clf = hookable(clf, x)
    acts, _ = layer_gradients(clf, x, tgt, get_layer(clf, layer, x), batch_size, grad=False,
                              reshape=reshape, tokens=tokens)
    base = make_baseline(x, baseline)
    n_maps, size = acts.shape[1], x.shape[2:]
    scores = torch.empty(x.shape[0] * n_maps, device=x.device)

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)
        img, k = rows // n_maps, rows % n_maps
        mask = upsample(acts[img, k], size).flatten(1)
        low, high = mask.amin(dim=1, keepdim=True), mask.amax(dim=1, keepdim=True)
        span = high - low
        mask = torch.where(span > 0, (mask - low) / span.clamp_min(torch.finfo(mask.dtype).tiny), 0.0)
        xb = base[img] + mask.view(-1, 1, *size) * (x[img] - base[img])
        scores[a:b] = target_score(clf.forward(xb), tgt[img], output, clf.multilabel)

    with torch.no_grad(), clf.eval_mode():
        Evaluator(clf, batch_size).run(scores.numel(), work)
    base_scores = Evaluator(clf, batch_size).scores(base, tgt, output=output)
    weights = scores.view(-1, n_maps) - base_scores[:, None]
    return upsample(weighted_maps(weights, acts).clamp_min(0), size)


@register("cam", "guided backprop times the upsampled Grad-CAM (Selvaraju et al. 2017)")
def guided_gradcam(clf, x, target="predicted", *, layer: str | None = None, interpolation: str = "linear",
                   batch_size: int = 64, reshape=None, tokens: int | None = None) -> torch.Tensor:
    """Guided Grad-CAM: ``sum_c(guided_backprop_c) * upsample(gradcam)``, ``[B, *spatial]``.

    The per-pixel Grad-CAM factor is the same for every channel, so the channel sum of Captum's
    per-channel ``GuidedGradCam`` equals the channel-summed guided backprop times the map (signed).
    ``interpolation``: ``"linear"`` (bi/trilinear, as in the paper) or ``"nearest"`` (Captum's default).
    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017.
    """
    from .gradients import guided_backprop  # lazy: written alongside, avoids an import cycle

    x, tgt = prepare(clf, x, target, batch_size)
    clf = hookable(clf, x)          # guided backprop through the same view's ReLUs
    cam = class_activation_map(clf, x, tgt, _gradcam, layer=layer, interpolation=interpolation,
                               batch_size=batch_size, reshape=reshape, tokens=tokens)
    return guided_backprop(clf, x, tgt, batch_size=batch_size) * cam
