"""Gradient methods: saliency, gradient x input, guided backprop, deconvnet, integrated gradients.

Every function has the call shape ``method(clf, x, target, **params) -> Tensor[B, *spatial]``:
``x`` is a data-space batch ``[B, C, *spatial]`` (1D, 2D or 3D), ``target`` one class per row
(int, name, "predicted" or a per-row list/tensor), and the map has the input's spatial shape
(channels summed for signed attributions, max of ``|grad|`` over channels for ``saliency``).
"""
from __future__ import annotations

import math

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .base import Evaluator, gradient_of, prepare, register, target_score
from .relu_rules import relu_rule

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")


@register("gradient", "|d score / d x|, max over channels (Simonyan et al. 2014)")
def saliency(clf, x, target="predicted", *, absolute: bool = True, batch_size: int = 64) -> torch.Tensor:
    """Vanilla gradient. ``absolute=True``: max over channels of ``|grad|``; else the signed sum."""
    x, tgt = prepare(clf, x, target, batch_size)
    _, g = Evaluator(clf, batch_size).scores(x, tgt, grad=True)
    return g.abs().amax(dim=1) if absolute else g.sum(dim=1)


@register("gradient", "gradient times input, summed over channels (Shrikumar et al. 2016)")
def input_x_gradient(clf, x, target="predicted", *, batch_size: int = 64) -> torch.Tensor:
    """Gradient x input: ``(x * d score / d x).sum(channels)``, ``[B, *spatial]``.

    Equals integrated gradients from a zero baseline for a linear model (Shrikumar et al. 2016,
    "Not just a black box"). Signed; channels summed.
    """
    x, tgt = prepare(clf, x, target, batch_size)
    _, g = Evaluator(clf, batch_size).scores(x, tgt, grad=True)
    return (x * g).sum(dim=1)


def relu_rule_gradient(clf, x: torch.Tensor, tgt: torch.Tensor, rule: str, batch_size: int = 64) -> torch.Tensor:
    """Input gradient ``[B, C, *spatial]`` with every ReLU's backward replaced by ``rule``.

    ``rule``: ``"guided"`` or ``"deconvnet"`` (see :mod:`.relu_rules`). ``x`` and ``tgt`` as
    returned by ``prepare``. Module, in-place and functional ReLUs are all covered; the model is
    not touched. Warns when the forward pass called no ReLU (the result is then the plain gradient).
    """
    if isinstance(clf.module, torch.jit.ScriptModule):     # its ReLUs run in C++: use the graph view's
        from .graphs import hookable
        clf = hookable(clf, x)
    with relu_rule(rule) as mode:
        _, g = Evaluator(clf, batch_size).scores(x, tgt, grad=True)
    if mode.calls == 0:
        warnings.warn(f"{rule} rule: the model called no ReLU (TorchScript and compiled modules, "
                      "ReLU6, LeakyReLU or clamp are not modified), so this is the plain gradient",
                      stacklevel=3)
    return g


@register("gradient", "gradient with ReLU backward passing only positive signals (Springenberg et al. 2015)")
def guided_backprop(clf, x, target="predicted", *, batch_size: int = 64) -> torch.Tensor:
    """Guided backpropagation, ``[B, *spatial]``, channels summed (signed).

    Every ReLU backpropagates ``grad * (input > 0) * (grad > 0)`` (Springenberg et al. 2015,
    "Striving for simplicity: the all convolutional net"), whether the model calls it as an
    ``nn.ReLU`` module, in place, or functionally (``F.relu``, ``torch.relu``, ``Tensor.relu_``).
    Other activations keep their ordinary backward. The model is not modified (see
    :func:`counterlens.attribution.relu_rules.relu_rule`).
    """
    x, tgt = prepare(clf, x, target, batch_size)
    return relu_rule_gradient(clf, x, tgt, "guided", batch_size).sum(dim=1)


@register("gradient", "gradient with ReLU backward = relu of the incoming gradient (Zeiler & Fergus 2014)")
def deconvnet(clf, x, target="predicted", *, batch_size: int = 64) -> torch.Tensor:
    """Deconvnet, ``[B, *spatial]``, channels summed (signed).

    Every ReLU backpropagates ``relu(grad)``, ignoring its forward input (Zeiler & Fergus 2014,
    "Visualizing and understanding convolutional networks"); module, in-place and functional
    ReLUs alike. Other activations keep their ordinary backward.
    """
    x, tgt = prepare(clf, x, target, batch_size)
    return relu_rule_gradient(clf, x, tgt, "deconvnet", batch_size).sum(dim=1)


def integration_rule(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alpha`` in [0, 1] and weights (summing to 1) of a quadrature rule with ``steps`` points.

    Same points as Captum's ``method=`` of the same name. Weights equal Captum's too, except for
    ``riemann_trapezoid``: here the true trapezoid rule on ``linspace(0, 1, steps)`` (step
    ``1/(steps-1)``, weights sum to 1), where Captum uses step ``1/steps`` (weights sum to
    ``(steps-1)/steps``, so its attributions are smaller by that factor and miss completeness).
    """
    if int(steps) < 1:
        raise InputError(f"steps={steps}; pass at least 1 (50 is a good start)")
    n = int(steps)
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = (t + 1) / 2, w / 2
    elif rule == "riemann_trapezoid":
        if n < 2:
            raise InputError("riemann_trapezoid needs steps >= 2")
        alphas = np.linspace(0, 1, n)
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
    elif rule == "riemann_middle":
        alphas, weights = (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_left":
        alphas, weights = np.arange(n) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_right":
        alphas, weights = (np.arange(n) + 1.0) / n, np.full(n, 1.0 / n)
    else:
        raise InputError(f"rule={rule!r}; pass one of {', '.join(RULES)}")
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


def make_baseline(x: torch.Tensor, baseline, seed: int = 0) -> torch.Tensor:
    """``"zeros"``, ``"blur"`` (heavy Gaussian blur of x), ``"uniform"`` (noise in x's range), a number or a tensor."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(x)
        if baseline == "blur":
            return _gaussian_blur(x, sigma=max(x.shape[2:]) / 16)
        if baseline == "uniform":       # per image: noise in its own range, keyed by the image (or its case)
            from .noise import counter_normal, row_keys
            flat = x.flatten(1)
            lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
            z = counter_normal(seed, (row_keys(torch.arange(x.shape[0], device=x.device)),), flat.shape[1])
            u = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
            return (lo + (hi - lo) * u.to(x.device)).view_as(x).to(x.dtype)
        raise InputError(f"baseline={baseline!r}; pass 'zeros', 'blur', 'uniform', a number or a tensor")
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return b.expand_as(x).clone()
    except RuntimeError as exc:
        raise InputError(f"baseline of shape {tuple(b.shape)} does not broadcast to x {tuple(x.shape)}") from exc


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over every spatial axis (edge values repeated at the borders)."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c, nd = x.shape[1], x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = F.pad(x, [radius] * (2 * nd), mode="replicate")
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k.numel()
        out = conv(out, k.view(1, 1, *shape).repeat(c, 1, *([1] * nd)), groups=c)
    return out


@register("gradient", "path integral of gradients from a baseline to x (Sundararajan et al. 2017)")
def integrated_gradients(clf, x, target="predicted", *, steps: int = 50, baseline="zeros",
                         rule: str = "gausslegendre", batch_size: int = 64, seed: int = 0,
                         return_delta: bool = False):
    """Integrated gradients, batched over (image, step) rows.

    ``attr = (x - baseline) * sum_k w_k * grad f(baseline + alpha_k (x - baseline))``, summed over
    channels. Completeness: ``attr.sum() ~= f(x) - f(baseline)`` for the target logit; with
    ``return_delta=True`` also returns that gap per row, ``[B]`` (the convergence delta).
    (Sundararajan et al. 2017, "Axiomatic attribution for deep networks".)

    ``steps`` (50): quadrature points per image. ``baseline``: ``"zeros"``, ``"blur"``,
    ``"uniform"`` (seeded noise in x's value range), a number, or a tensor broadcastable to ``x``.
    ``rule``: one of ``RULES`` (see :func:`integration_rule`). Peak memory is set by
    ``batch_size`` rows of (image, step), never by ``steps x images``.
    """
    x, tgt = prepare(clf, x, target, batch_size)
    base = make_baseline(x, baseline, seed)
    alphas, weights = (t.to(x.device) for t in integration_rule(rule, steps))
    n_steps, batch = alphas.numel(), x.shape[0]
    diff = x - base
    total = torch.zeros_like(x)
    evaluator = Evaluator(clf, batch_size)

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)
        img, k = rows // n_steps, rows % n_steps
        shape = (-1,) + (1,) * (x.dim() - 1)
        xb = (base[img] + alphas[k].view(shape) * diff[img]).requires_grad_(True)
        with torch.enable_grad():
            g = gradient_of(target_score(clf.forward(xb), tgt[img]), xb)
        total.index_add_(0, img, g * weights[k].view(shape))

    with clf.eval_mode():
        evaluator.run(batch * n_steps, work)
    attr = (diff * total).sum(dim=1)
    if not return_delta:
        return attr
    ends = Evaluator(clf, batch_size).scores(torch.cat([x, base]), torch.cat([tgt, tgt]))
    delta = attr.flatten(1).sum(dim=1) - (ends[:batch] - ends[batch:])
    return attr, delta
