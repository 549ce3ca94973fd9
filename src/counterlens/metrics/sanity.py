"""Sanity checks of attribution methods (Adebayo et al. 2018, "Sanity checks for saliency maps").

* :func:`model_randomisation`: the *cascading* model-parameter randomisation test. On a deep copy
  of the model (the original is never touched), the layers with parameters are re-initialised one
  after another from the output down to the input, and the map is recomputed after each step. A
  method that explains the *model* must change as its weights are destroyed; one that mostly
  recovers the *image* (edges) does not. Guided backprop is the known failure; gradients and
  Grad-CAM pass.
* The **random-logit** check (Sixt et al. 2020): the map for a random *other* class, compared with
  the map for the target. A class-sensitive method gives a different map.

**Similarity.** Spearman rank correlation of the two maps per image (of ``|map|`` by default, as in
Adebayo et al.'s main figures; ``absolute=False`` keeps the sign), averaged over images; optionally
also SSIM of the maps min-max normalised to [0, 1]. A randomised map that became constant shares no
ranking with the original: its similarity is 0. Images whose original map is constant are left out.

**Pass rule.** ``passed`` when (a) the mean similarity after *all* layers are randomised is below
``threshold`` (0.5), and (b) it drops clearly along the way: the similarity averaged over the
cascade's steps is below ``threshold`` too. The unrandomised similarity is 1 by definition, so (a)
means a drop of more than ``1 - threshold``; (b) fails a map that survives the randomisation of every
layer but the lowest ones (guided backprop on a shallow network, Adebayo et al.'s Fig. 2).

**Cost.** ``len(layers) + 1`` (``+ 1`` with the random-logit check) runs of the method on the images.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attribution.base import check_params, get_method, resolve_targets
from ..attribution.graphs import hookable
from ..errors import InputError, MethodError


@dataclass
class SanityResult:
    """Outcome of :func:`model_randomisation` for one method.

    ``layers[i]`` is the module re-initialised at step ``i`` (top first); ``similarity[i]`` the mean
    similarity to the original map after randomising ``layers[:i + 1]``; ``per_image`` ``[L, B]``.
    """

    method: str
    layers: list[str]
    similarity: list[float]
    per_image: torch.Tensor
    threshold: float
    passed: bool
    measure: str
    random_logit: float | None = None
    ssim: list[float] | None = None
    maps_computed: int = 0

    @property
    def cascade_mean(self) -> float:
        """Mean similarity over the cascade's steps (the second half of the pass rule)."""
        finite = [v for v in self.similarity if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def to_json(self) -> dict:
        """The entry written to ``RUN/sanity.json``."""
        out = {"layers": list(self.layers), "similarity": [_num(v) for v in self.similarity],
               "passed": bool(self.passed), "threshold": float(self.threshold),
               "random_logit": _num(self.random_logit), "measure": self.measure,
               "cascade_mean": _num(self.cascade_mean),
               "n_images": int(self.per_image.shape[1]) if self.per_image.dim() == 2 else 0}
        if self.ssim is not None:
            out["ssim"] = [_num(v) for v in self.ssim]
        return out


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# -- layers ---------------------------------------------------------------------------------------
def randomizable_layers(clf, x: torch.Tensor) -> list[str]:
    """Names of the modules that own parameters, in reverse order of their first forward call.

    One probe forward of ``x[:1]`` records the call order, so the output side comes first whatever
    order the modules were registered in; modules the forward does not call are left out. A graph
    whose parameter owners are never called (a TorchScript or torch.export model's view, see
    :func:`counterlens.attribution.graphs.hookable`) gives them in the order its graph uses them.
    """
    if not isinstance(clf.module, nn.Module):
        raise MethodError("model randomisation needs an nn.Module with parameters")
    owners = {m: n for n, m in clf.module.named_modules()          # a scripted part cannot be hooked: left out
              if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, torch.jit.ScriptModule)}
    order: list[str] = []

    def hook(module, _inputs):
        if owners[module] not in order:
            order.append(owners[module])

    handles = [m.register_forward_pre_hook(hook) for m in owners]
    try:
        with torch.no_grad(), clf.eval_mode():
            clf.forward(clf.as_input(x)[:1])
    finally:
        for h in handles:
            h.remove()
    if not order and callable(getattr(clf.module, "parameter_owners", None)):
        order = [n for n in clf.module.parameter_owners() if n in owners.values()]
    if not order:
        raise MethodError("the model has no modules with parameters to randomise")
    return order[::-1]


def randomize_(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters in place (seeded).

    ``reset_parameters()`` when the module has one (PyTorch's own initialisation; BatchNorm also
    resets its running statistics). A module without one that holds a ``weight`` (the layers of an
    exported model's graph view) is re-drawn as ``nn.Linear`` / ``nn.ConvNd`` / the norm layers do
    it, in the same order from the same seed, so an exported model is randomised exactly like the
    eager one: a weight of 2+ axes by Kaiming-uniform and its bias uniform in +-1/sqrt(fan_in); a
    1-axis weight (a norm layer's scale) to 1, its bias to 0 and running statistics reset. Anything
    else: each parameter drawn from a normal with its own std.
    """
    devices = [module_device(module).index or 0] if module_device(module).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            return
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if weight is not None and weight.dim() >= 2:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            if bias is not None:
                fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]
                nn.init.uniform_(bias, -1 / math.sqrt(fan_in) if fan_in else 0, 1 / math.sqrt(fan_in) if fan_in else 0)
            return
        if weight is not None and weight.dim() == 1:
            weight.fill_(1.0)
            if bias is not None:
                bias.zero_()
            for key, value in module._buffers.items():
                if value is not None:
                    value.fill_(1 if key == "running_var" else 0)
            return
        for p in module.parameters(recurse=False):
            std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.01
            p.normal_(0.0, std)


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _randomised_copy(clf):
    """A shallow copy of ``clf`` with a deep copy of its module (caches cleared)."""
    twin = copy.copy(clf)
    caches = ("_target_layers", "_chunk_sizes", "_patch_grids")     # found on the original module
    twin.__dict__ = {k: v for k, v in clf.__dict__.items() if k not in caches}
    twin.module = copy.deepcopy(clf.module, _shared_graph_parts(clf.module))
    return twin


_MODULE_STATE = frozenset(nn.Module().__dict__)


def _shared_graph_parts(module) -> dict:
    """A ``deepcopy`` memo that shares, rather than copies, what graph-based modules (the views of
    TorchScript and torch.export models) hold besides their parameters, buffers and hooks: graphs,
    signatures and metadata with symbolic tensors that deepcopy cannot copy. Randomisation only
    re-draws parameters, so sharing them is safe."""
    memo: dict = {}
    if not isinstance(module, nn.Module):
        return memo
    for m in module.modules():
        if any(isinstance(v, torch.fx.Graph) for v in m.__dict__.values()):
            for key, value in m.__dict__.items():
                if key not in _MODULE_STATE and not isinstance(value, (torch.Tensor, nn.Module)):
                    memo[id(value)] = value
    return memo


# -- similarity -----------------------------------------------------------------------------------
def spearman(a, b) -> torch.Tensor:
    """Row-wise Spearman correlation of ``[B, *S]`` maps (average ranks for ties), ``Tensor[B]``.

    NaN where ``a`` is constant; 0 where only ``b`` is.
    """
    from scipy.stats import rankdata
    a = torch.as_tensor(a).reshape(len(a), -1).double().cpu().numpy()
    b = torch.as_tensor(b).reshape(len(b), -1).double().cpu().numpy()
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    na, nb = np.linalg.norm(ra, axis=1), np.linalg.norm(rb, axis=1)
    rho = (ra * rb).sum(axis=1) / np.maximum(na * nb, 1e-300)
    rho = np.where(nb == 0, 0.0, rho)
    return torch.from_numpy(np.where(na == 0, np.nan, rho))


def ssim(a, b, window: int = 7) -> torch.Tensor:
    """Row-wise SSIM of ``[B, *S]`` maps, each min-max normalised to [0, 1], ``Tensor[B]``.

    Uniform window of ``window`` pixels per axis (shrunk to the smallest side, kept odd),
    constants ``C1 = 0.01**2``, ``C2 = 0.03**2``; the mean over all window positions.
    """
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()

    def norm(t):
        flat = t.reshape(len(t), -1)
        lo, hi = flat.amin(1), flat.amax(1)
        shape = (-1,) + (1,) * (t.dim() - 1)
        return ((t - lo.view(shape)) / (hi - lo).clamp(min=1e-300).view(shape))[:, None]

    a, b = norm(a), norm(b)
    nd = a.dim() - 2
    if not 1 <= nd <= 3:
        raise InputError(f"ssim needs 1D, 2D or 3D maps, got {nd} spatial axes")
    w = min(window, *a.shape[2:])
    w = w if w % 2 else w - 1
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    mean = lambda t: pool(t, w, stride=1)  # noqa: E731
    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b = mean(a * a) - mu_a ** 2, mean(b * b) - mu_b ** 2
    cov = mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


# -- the tests ------------------------------------------------------------------------------------
def _method(method, params: dict | None, batch_size: int, seed: int) -> tuple[str, Callable, dict]:
    params = dict(params or {})
    if callable(method):
        return getattr(method, "__name__", "method"), method, params
    if not isinstance(method, str):
        raise InputError(f"method={method!r}; pass a method name such as 'gradcam' or a function")
    info = get_method(method)
    params = check_params(info, params)
    defaults = info.defaults()
    if "batch_size" in defaults:
        params.setdefault("batch_size", batch_size)
    if "seed" in defaults:
        params.setdefault("seed", seed)
    return info.name, info.function, params


def _similarity(measure: str, absolute: bool):
    if measure not in ("spearman", "ssim"):
        raise InputError(f"similarity={measure!r}; pass 'spearman' or 'ssim'")
    fn = spearman if measure == "spearman" else ssim
    return lambda a, b: fn(a.abs(), b.abs()) if absolute else fn(a, b)


def model_randomisation(clf, x, method, target="predicted", *, params: dict | None = None,
                        layers: Sequence[str] | None = None, similarity: str = "spearman",
                        absolute: bool = True, threshold: float = 0.5, random_logit: bool = True,
                        with_ssim: bool = False, batch_size: int = 64, seed: int = 0) -> SanityResult:
    """Cascading model-parameter randomisation of ``method`` on ``x``.

    Parameters
    ----------
    clf : Classifier (left untouched: a deep copy of its module is randomised).
    x : ``[B, C, *S]`` images (a handful is enough: the result is a mean over them).
    method : a registered method name (``"gradcam"``) or ``fn(clf, x, target, **params) -> [B, *S]``.
    target : the classes explained, resolved on the *original* model and kept for every step.
    params : the method's parameters (``batch_size`` and ``seed`` are filled in when it takes them).
    layers : module names to randomise, in order; default :func:`randomizable_layers` (all, top first).
    similarity : ``"spearman"`` (default) or ``"ssim"``; ``absolute`` compares ``|map|`` (default).
    threshold : the pass rule (see the module docstring): the similarity after randomising every
        layer, and its mean over the cascade, are both ``< threshold`` (0.5).
    random_logit : also compare with the map of a random other class (seeded).
    with_ssim : also report SSIM per step (in ``ssim``).
    """
    if not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise InputError(f"threshold={threshold!r}; pass a similarity in [-1, 1] (0.5 is usual)")
    name, fn, kwargs = _method(method, params, batch_size, seed)
    sim = _similarity(similarity, absolute)
    x = clf.as_input(x)
    clf = hookable(clf, x)      # TorchScript / torch.export: a view whose layers are called and can be re-drawn
    tgt = resolve_targets(clf, x, target, batch_size=batch_size)
    original = fn(clf, x, tgt, **kwargs).detach().cpu()
    twin = _randomised_copy(clf)
    names = list(layers) if layers is not None else randomizable_layers(clf, x)
    modules = dict(twin.module.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown or not names:
        raise InputError(f"layers={list(names)}: {unknown or 'empty'}; pass module names such as "
                         f"{randomizable_layers(clf, x)[:4]} or None for all")
    per_image, ssims = [], []
    for i, layer in enumerate(names):
        randomize_(modules[layer], seed + i)
        with _no_grad_leak(twin.module), warnings.catch_warnings():
            # a randomised network may well give empty CAMs: expected here, not worth a warning
            warnings.filterwarnings("ignore", message=r".*class activation maps are zero")
            randomised = fn(twin, x, tgt, **kwargs).detach().cpu()
        per_image.append(sim(original, randomised))
        if with_ssim:
            pair = (original.abs(), randomised.abs()) if absolute else (original, randomised)
            ssims.append(float(torch.nanmean(ssim(*pair))))
    per_image_t = torch.stack(per_image).float()
    means = [float(torch.nanmean(row)) if torch.isfinite(row).any() else math.nan for row in per_image_t]
    rl = None
    if random_logit:
        other = _other_classes(clf, x, tgt, seed)
        if other is not None:
            rl_map = fn(clf, x, other, **kwargs).detach().cpu()
            rl = float(torch.nanmean(sim(original, rl_map).float()))
    measure = f"{similarity}{'_abs' if absolute else ''}"
    result = SanityResult(name, names, means, per_image_t, float(threshold), False, measure, rl,
                          ssims if with_ssim else None, len(names) + 1 + (rl is not None))
    result.passed = bool(means[-1] < threshold and result.cascade_mean < threshold)   # False for NaN
    return result


def sanity_report(clf, inputs: dict, params: dict | None = None, *, threshold: float = 0.5,
                  batch_size: int = 64, seed: int = 0) -> dict:
    """:func:`model_randomisation` of several methods, as ``RUN/sanity.json`` holds it.

    ``inputs``: ``{method: (x [B, C, *S], target)}``; ``params``: ``{method: parameters}``. Names that
    are not registered methods are skipped; a method that cannot run here (e.g. a CAM on a model
    without spatial layers) gets ``{"passed": None, "error": message}`` and the others go on.
    Returns ``{method: SanityResult.to_json()}``.
    """
    from ..attribution.base import METHODS
    from ..errors import CounterlensError
    out = {}
    for method, (x, target) in inputs.items():
        if method not in METHODS:
            continue
        try:
            out[method] = model_randomisation(clf, x, method, target, params=(params or {}).get(method),
                                              threshold=threshold, batch_size=batch_size, seed=seed).to_json()
        except CounterlensError as exc:
            out[method] = {"layers": [], "similarity": [], "passed": None, "threshold": float(threshold),
                           "random_logit": None, "error": str(exc)}
    return out


def _other_classes(clf, x, tgt: torch.Tensor, seed: int) -> torch.Tensor | None:
    """A random class other than the target for each row (seeded), or None for a 1-output model."""
    n_classes = clf.n_classes or clf.logits(x[:1]).shape[1]
    if n_classes < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n_classes, (len(tgt),), generator=gen).to(tgt.device)
    return (tgt + shift) % n_classes


@contextlib.contextmanager
def _no_grad_leak(module: nn.Module):
    """Drop parameter gradients a method may leave on the randomised copy."""
    try:
        yield
    finally:
        for p in module.parameters():
            p.grad = None
