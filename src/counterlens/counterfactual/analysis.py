"""What a counterfactual changed, and where: difference maps, layer activations, attribution.

Every function takes either a counterfactual result (anything with ``x`` = the counterfactuals and
``x_orig`` = the originals, both ``[B, C, *spatial]`` in data space) or the pair ``(x, x_cf)``.

- :func:`difference_map`: the signed edit ``x_cf - x`` summed over channels, ``[B, *spatial]``.
- :func:`activation_changes`: how much each layer's output moved between original and
  counterfactual (mean ``|change|``, change relative to the original activation's norm, and the
  channels that moved most), in execution order; :func:`summary_layers`: the bounded set of
  layers a dataset run records them for.
- :func:`attribute_difference`: integrated gradients from the original (baseline) to the
  counterfactual (input), which splits the change of the target logit over the edited pixels:
  ``attr.sum() ~= logit_t(x_cf) - logit_t(x)`` (completeness).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..attribution.base import Evaluator, resolve_targets
from ..attribution.gradients import integrated_gradients
from ..errors import InputError, MethodError, TargetError
from ..model import Classifier


def _pair(x, x_cf) -> tuple[torch.Tensor, torch.Tensor]:
    """``(original, counterfactual)`` from a result or from two tensors of the same shape."""
    if x_cf is None:
        if not (hasattr(x, "x") and hasattr(x, "x_orig")):
            raise InputError("pass a counterfactual result (with .x and .x_orig) or both x and x_cf")
        x, x_cf = x.x_orig, x.x
    x, x_cf = torch.as_tensor(x), torch.as_tensor(x_cf)
    if x.shape != x_cf.shape:
        raise InputError(f"x has shape {tuple(x.shape)} but x_cf has shape {tuple(x_cf.shape)}; "
                         "pass one counterfactual per original, same shape")
    if x.dim() < 3:
        raise InputError(f"x has shape {tuple(x.shape)}; expected [batch, channels, *spatial]")
    return x, x_cf


def difference_map(result, x_cf=None) -> torch.Tensor:
    """Signed edit ``x_cf - x`` summed over channels, ``[B, *spatial]`` float32 on the CPU.

    ``difference_map(result)`` or ``difference_map(x, x_cf)``. Positive where the counterfactual
    is brighter (higher value) than the original.
    """
    x, x_cf = _pair(result, x_cf)
    return (x_cf.detach().float().cpu() - x.detach().float().cpu()).sum(dim=1)


# -- layer activations ----------------------------------------------------------------------------
@contextlib.contextmanager
def _forward_hooks(modules: dict[str, nn.Module], callback):
    """Forward hooks calling ``callback(name, output)`` on each module; always removed."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(
                lambda _m, _inp, out, name=name: callback(name, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def _select_layers(module: nn.Module, layers) -> dict[str, nn.Module]:
    named = dict(module.named_modules())
    if layers is None:
        return {n: m for n, m in named.items() if n and not any(True for _ in m.children())} or {"(model)": module}
    if isinstance(layers, str):
        layers = [layers]
    unknown = [n for n in layers if n not in named]
    if unknown:
        known = ", ".join(n for n in named if n) or "(none)"
        raise InputError(f"layers={list(layers)}: no module named {unknown} in the model; its modules: {known}")
    return {n: named[n] for n in layers}


# activation functions: with the leaf modules that hold parameters, the layers a run summarises
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus)


def summary_layers(module: nn.Module, limit: int = 32) -> tuple[list[str], str]:
    """The layers a dataset run records :func:`activation_changes` of, and a line saying which.

    The leaf modules that hold parameters (convolutions, linear, normalisation) or are activation
    functions (:data:`ACTIVATIONS`), in registration order; every leaf module when none is; at most
    ``limit`` of them, evenly spaced from the first to the last when there are more (a module
    called twice still gives two entries). Returns ``(names, description)``."""
    leaves = {n: m for n, m in module.named_modules() if n and not any(True for _ in m.children())}
    chosen = [n for n, m in leaves.items()
              if isinstance(m, ACTIVATIONS) or any(True for _ in m.parameters(recurse=False))]
    if not leaves:
        return [], "the model's output (it has no submodules)"
    what = "leaf modules with parameters or an activation function"
    if not chosen:
        chosen, what = list(leaves), "leaf modules"
    if len(chosen) > limit:
        keep = sorted({round(i * (len(chosen) - 1) / (limit - 1)) for i in range(limit)})
        return [chosen[i] for i in keep], f"{len(keep)} of the model's {len(chosen)} {what}, evenly spaced"
    return chosen, f"the model's {len(chosen)} {what}"


class _LayerStats:
    """Running sums over chunks for one (layer, call) output."""

    def __init__(self, name: str, module: str, shape: tuple, conv_like: bool, n_rows: int, per_row: bool = False):
        self.name, self.module, self.shape, self.conv_like, self.per_row = name, module, shape, conv_like, per_row
        # per row: sum |delta| per channel, [n_rows, C] (for each image's own top channels)
        self.row_channel_abs = torch.zeros(n_rows, shape[0], dtype=torch.float64) if per_row and conv_like else None
        self.abs_sum = torch.zeros(n_rows, dtype=torch.float64)     # per row: sum |delta|
        self.delta_sq = torch.zeros(n_rows, dtype=torch.float64)    # per row: sum delta^2
        self.orig_sq = torch.zeros(n_rows, dtype=torch.float64)     # per row: sum a^2
        self.channel_abs = None                                     # per channel: sum |delta| over rows, space
        self.numel = 1
        for s in shape:
            self.numel *= int(s)

    def add(self, a: int, orig: torch.Tensor, cf: torch.Tensor) -> None:
        delta = (cf - orig).double()
        b = orig.shape[0]
        self.abs_sum[a:a + b] = delta.abs().flatten(1).sum(1).cpu()
        self.delta_sq[a:a + b] = delta.square().flatten(1).sum(1).cpu()
        self.orig_sq[a:a + b] = orig.double().square().flatten(1).sum(1).cpu()
        if self.conv_like:
            per_channel = delta.abs().transpose(0, 1).flatten(1).sum(1).cpu()
            self.channel_abs = per_channel if self.channel_abs is None else self.channel_abs + per_channel
            if self.row_channel_abs is not None:
                self.row_channel_abs[a:a + b] = delta.abs().flatten(2).sum(2).cpu()

    def report(self, top: int) -> dict:
        n_rows = self.abs_sum.numel()
        orig_norm = self.orig_sq.sum().sqrt().item()
        delta_norm = self.delta_sq.sum().sqrt().item()
        relative = delta_norm / orig_norm if orig_norm > 0 else (0.0 if delta_norm == 0 else float("inf"))
        per_row_rel = torch.where(self.orig_sq > 0, self.delta_sq.sqrt() / self.orig_sq.sqrt().clamp_min(1e-300),
                                  torch.where(self.delta_sq > 0, float("inf"), 0.0))
        out = {
            "name": self.name,
            "module": self.module,
            "shape": tuple(int(s) for s in self.shape),
            "mean_abs_change": self.abs_sum.sum().item() / (n_rows * self.numel),
            "relative_change": relative,
            "mean_abs_change_per_row": (self.abs_sum / self.numel).tolist(),
            "relative_change_per_row": per_row_rel.tolist(),
            "top_channels": [],
        }
        if self.conv_like and self.channel_abs is not None:
            per_channel = self.channel_abs / (n_rows * (self.numel // self.shape[0]))
            k = min(int(top), per_channel.numel())
            values, idx = per_channel.topk(k)
            out["top_channels"] = [(int(i), float(v)) for i, v in zip(idx, values, strict=True)]
        if self.row_channel_abs is not None:
            per_row = self.row_channel_abs / (self.numel // self.shape[0])
            values, idx = per_row.topk(min(int(top), per_row.shape[1]), dim=1)
            out["top_channels_per_row"] = [[(int(i), float(v)) for i, v in zip(ri, rv, strict=True)]
                                           for ri, rv in zip(idx.tolist(), values.tolist(), strict=True)]
        elif self.per_row:
            out["top_channels_per_row"] = [[] for _ in range(n_rows)]
        return out


@torch.no_grad()
def activation_changes(clf: Classifier, x, x_cf=None, *, layers: Sequence[str] | str | None = None,
                       top: int = 5, batch_size: int = 64, top_per_row: bool = False) -> list[dict]:
    """How far each layer's output moved between the originals and their counterfactuals.

    ``activation_changes(clf, result)`` or ``activation_changes(clf, x, x_cf)`` with
    ``[B, C, *spatial]`` data-space tensors. ``layers``: module names of ``clf.module`` (as in
    ``named_modules()``); default every leaf module whose output is a tensor. ``top``: channels
    listed per conv-like layer. Original and counterfactual go through the model together in
    chunks of ``batch_size`` images, in eval mode, without gradients; the hooks are removed even on
    error and the model's modes are restored.

    Returns one dict per layer output in execution order (a module called twice gives two entries,
    the second named ``"name (call 2)"``)::

        name, module (class name), shape (output shape per image),
        mean_abs_change        mean |a_cf - a| over images and elements,
        relative_change        ||a_cf - a|| / ||a|| over the whole batch (inf if ||a|| = 0 < ||a_cf - a||),
        mean_abs_change_per_row, relative_change_per_row   the same per image (lists of B floats),
        top_channels           [(channel, mean |change|), ...] largest first, for outputs
                               [B, C, *spatial] with at least one spatial axis; [] otherwise;
        top_channels_per_row   with ``top_per_row=True``: each image's own top channels (B lists).
    """
    if not isinstance(clf.module, nn.Module):
        raise MethodError("activation_changes needs the classifier's module to be a torch nn.Module "
                          f"(got {type(clf.module).__name__}); hooks cannot be placed on it")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InputError(f"top={top!r}; pass the number of channels to list per layer (e.g. 5)")
    x, x_cf = _pair(x, x_cf)
    x, x_cf = clf.as_input(x), clf.as_input(x_cf)
    modules = _select_layers(clf.module, layers)
    n_rows = x.shape[0]
    stats: dict[str, _LayerStats] = {}
    state = {"start": 0, "rows": 0, "calls": {}}

    def record(name: str, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != 2 * state["rows"]:
            return      # not a per-image tensor output (a tuple, a shared buffer, ...)
        calls = state["calls"]
        calls[name] = calls.get(name, 0) + 1
        key = name if calls[name] == 1 else f"{name} (call {calls[name]})"
        half = out.shape[0] // 2
        if key not in stats:
            shape = tuple(out.shape[1:])
            stats[key] = _LayerStats(key, type(modules[name]).__name__, shape, out.dim() >= 3, n_rows, top_per_row)
        # stats computed right away: a later in-place op (ReLU(inplace=True)) must not change them
        stats[key].add(state["start"], out[:half].detach(), out[half:].detach())

    def work(a: int, b: int):
        state.update(start=a, rows=b - a, calls={})
        clf.forward(torch.cat([x[a:b], x_cf[a:b]]))

    with clf.eval_mode(), _forward_hooks(modules, record):
        Evaluator(clf, batch_size).run(n_rows, work)
    return [s.report(top) for s in stats.values()]


def format_activation_changes(changes: list[dict], top: int = 3) -> str:
    """A plain-text table of :func:`activation_changes` output, one line per layer."""
    lines = [f"{'layer':<28} {'module':<14} {'mean |change|':>13} {'relative':>9}  top channels"]
    for c in changes:
        chans = ", ".join(f"{i} ({v:.3g})" for i, v in c["top_channels"][:top])
        lines.append(f"{c['name']:<28} {c['module']:<14} {c['mean_abs_change']:>13.4g} "
                     f"{c['relative_change']:>9.3g}  {chans}")
    return "\n".join(lines)


# -- attribution of the difference ----------------------------------------------------------------
def attribute_difference(clf: Classifier, x, x_cf=None, target=None, *, method: str = "integrated_gradients",
                         steps: int = 32, rule: str = "gausslegendre", batch_size: int = 64,
                         return_delta: bool = False):
    """Which edited pixels moved the target logit: IG from the original to the counterfactual.

    ``attribute_difference(clf, result)`` (target = ``result.target``) or
    ``attribute_difference(clf, x, x_cf, target)``; ``target`` is a class index, name or one per
    row. Returns ``[B, *spatial]`` (channels summed, signed) with
    ``attr.sum() ~= logit_t(x_cf) - logit_t(x)`` (completeness; the gap shrinks with ``steps``);
    ``return_delta=True`` also returns that gap per row, ``[B]``. Pixels the edit left alone get
    exactly zero. ``rule``/``steps``/``batch_size`` as in
    :func:`counterlens.attribution.integrated_gradients`.
    """
    if method != "integrated_gradients":
        raise MethodError(f"method={method!r}; attribute_difference supports 'integrated_gradients' "
                          "(the only method with the original as a path baseline)")
    if target is None:
        if x_cf is not None or not hasattr(x, "target"):
            raise TargetError("target is missing: pass the class whose logit change to attribute "
                              "(e.g. the counterfactual's target class) or a counterfactual result")
        target = x.target
    x, x_cf = _pair(x, x_cf)
    x, x_cf = clf.as_input(x), clf.as_input(x_cf)
    tgt = resolve_targets(clf, x_cf, target, batch_size=batch_size)
    out = integrated_gradients(clf, x_cf, tgt, steps=steps, baseline=x, rule=rule, batch_size=batch_size,
                               return_delta=return_delta)
    if return_delta:
        return out[0].detach().cpu(), out[1].detach().cpu()
    return out.detach().cpu()
