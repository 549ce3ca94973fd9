"""Class activation maps. The target layer is found by itself: the last module with a spatial output.

Hooks live in a context manager and are removed on error; the layer's output is captured by a
forward hook that passes a copy on, so later in-place operations (``ReLU(inplace=True)``) cannot
change what the map is computed from.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, MethodError
from .base import Evaluator, gradient_of, prepare, register, spatial_dims, target_score


def find_target_layer(clf, x: torch.Tensor) -> str:
    """Name of the last leaf module (in execution order) whose output keeps spatial axes.

    "Spatial" means an output with as many axes as ``x`` (``[B, C', *spatial']``) and more than
    one position, so a 2D, 3D or 1D model each gets its last feature map.
    """
    if not isinstance(clf.module, nn.Module):
        raise MethodError("CAM methods need an nn.Module to hook; pass layer=... or use another method")
    found: list[str] = []
    names = {m: n for n, m in clf.module.named_modules()}

    def hook(module, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == x.dim() and out.shape[2:].numel() > 1:
            found.append(names[module])

    leaves = [m for m in clf.module.modules() if not list(m.children())]
    with _hooks(leaves, hook), torch.no_grad(), clf.eval_mode():
        clf.forward(x[:1])
    if not found:
        raise MethodError("no module of this model has a spatial output; name one with layer='features.3'")
    return found[-1]


@contextlib.contextmanager
def _hooks(modules, hook):
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def get_layer(clf, layer: str | nn.Module | None, x: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    name = find_target_layer(clf, x) if layer is None else layer
    modules = dict(clf.module.named_modules())
    if name not in modules:
        raise InputError(f"layer={name!r} is not a module of this model; "
                         f"some names: {', '.join(list(modules)[1:12])}")
    return modules[name]


@contextlib.contextmanager
def capture(layer: nn.Module):
    """Record the layer's output of the next forward passes in ``store['act']``."""
    store: dict = {}

    def hook(_module, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise MethodError(f"layer {type(_module).__name__} returns {type(out).__name__}, not a tensor")
        store["act"] = out
        return out.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def layer_gradients(clf, x, tgt, layer, batch_size):
    """Activations ``A`` and gradients ``dS/dA`` of the target score at ``layer``, chunked."""
    acts, grads = [], []

    def work(a, b):
        with capture(layer) as store, torch.enable_grad():
            xb = x[a:b].detach().requires_grad_(True)   # so frozen models still get a graph
            score = target_score(clf.forward(xb), tgt[a:b])
            act = store["act"]
            acts.append(act.detach())
            grads.append(gradient_of(score, act))

    with clf.eval_mode():
        Evaluator(clf, batch_size).run(x.shape[0], work)
    return torch.cat(acts), torch.cat(grads)


def upsample(cam: torch.Tensor, size) -> torch.Tensor:
    """``[B, *s]`` -> ``[B, *size]`` by (bi/tri)linear interpolation."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[cam.dim() - 1]
    return F.interpolate(cam[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]


@register("cam", "ReLU of gradient-weighted feature maps at the last spatial layer (Selvaraju et al. 2017)")
def gradcam(clf, x, target="predicted", *, layer: str | None = None, relu: bool = True,
            batch_size: int = 64) -> torch.Tensor:
    """Grad-CAM: channel weights = spatial mean of the gradients; map = ReLU(sum_c w_c A_c),
    upsampled to the input's spatial size. ``layer``: module name (default: found by itself)."""
    x, tgt = prepare(clf, x, target)
    acts, grads = layer_gradients(clf, x, tgt, get_layer(clf, layer, x), batch_size)
    weights = grads.mean(dim=spatial_dims(grads), keepdim=True)
    cam = (weights * acts).sum(dim=1)
    if relu:
        cam = cam.clamp_min(0)
    return upsample(cam, x.shape[2:])
