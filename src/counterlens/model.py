"""The classifier wrapper: a module, its preprocessing, its class names and its device.

Everything counterlens explains is in *data space*: the pixel values as loaded (0..1, Hounsfield
units, raw features). Whatever the network needs on top (normalisation, grey to RGB) lives in
``preprocess`` inside the wrapper, so gradients, heatmaps and counterfactuals refer to the image
the user sees.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .errors import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device={device!r} is not a device; pass 'auto', 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but no CUDA GPU is available; pass device='cpu' or 'auto'")
    return dev


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for inputs ``[B, C, *spatial]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.numel() != std_t.numel():
            raise InputError(f"Normalize: mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise InputError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def to_spec(self) -> dict:
        return {"normalize": {"mean": self.mean.tolist(), "std": self.std.tolist()}}


class RepeatChannels(nn.Module):
    """Grey ``[B, 1, ...]`` to ``[B, channels, ...]`` (a model trained on RGB fed a grey image)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.channels != 1:
            return x.expand(-1, self.channels, *x.shape[2:])
        return x

    def to_spec(self) -> dict:
        return {"repeat_channels": self.channels}


def preprocess_from_spec(spec: list[dict] | None) -> nn.Module | None:
    """Build preprocessing from its JSON form (as stored in a model card or ``run.yaml``).

    ``[{"repeat_channels": 3}, {"normalize": {"mean": [...], "std": [...]}}]``
    """
    if not spec:
        return None
    steps: list[nn.Module] = []
    for step in spec:
        if not isinstance(step, dict) or len(step) != 1:
            raise InputError(f"preprocessing step {step!r}: expected one of "
                             "{'normalize': {'mean': [...], 'std': [...]}} or {'repeat_channels': N}")
        (name, arg), = step.items()
        if name == "normalize":
            steps.append(Normalize(arg["mean"], arg["std"]))
        elif name == "repeat_channels":
            steps.append(RepeatChannels(int(arg)))
        else:
            raise InputError(f"unknown preprocessing step {name!r}; known: normalize, repeat_channels")
    return steps[0] if len(steps) == 1 else nn.Sequential(*steps)


def preprocess_to_spec(preprocess: nn.Module | None) -> list[dict] | None:
    """The JSON form of preprocessing built from :class:`Normalize` / :class:`RepeatChannels`.

    Returns None for no preprocessing; raises for a custom module (it has no portable form).
    """
    if preprocess is None:
        return None
    modules = list(preprocess) if isinstance(preprocess, nn.Sequential) else [preprocess]
    spec = []
    for m in modules:
        if not hasattr(m, "to_spec"):
            raise InputError(f"preprocessing {type(m).__name__} has no portable description; "
                             "use counterlens.Normalize / RepeatChannels or save the model yourself")
        spec.append(m.to_spec())
    return spec


class Classifier:
    """A PyTorch classifier with everything needed to explain it in data space.

    Parameters
    ----------
    module : nn.Module
        Maps ``preprocess(x)`` to logits ``[B, n_classes]``.
    preprocess : nn.Module or callable, optional
        Applied to data-space input before ``module`` (e.g. ``Normalize([0.5], [0.5])``).
        Must be differentiable for gradient methods.
    classes : list of str, optional
        Class names in logit order; default ``["0", "1", ...]`` once the output size is known.
    device : "auto", "cpu", "cuda", torch.device
        Where the module and every evaluation live. ``"auto"`` takes a GPU when present.
    in_channels : int, optional
        Channels the module expects. Grey input is repeated to this many channels.
    input_size : tuple of int, optional
        Spatial size the module expects (used by loaders to resize images).
    value_range : (low, high), optional
        Valid data-space range (e.g. ``(0, 1)``); counterfactuals are clamped to it.
    logits_output : int or str, optional
        Which element of a model's tuple, list or dict output holds the logits (a tuple output
        is refused without it, rather than guessed).

    Calls run the module in eval mode (dropout off, BatchNorm running statistics) and give it
    back its own mode afterwards. ``logits`` keeps the autograd graph; ``probs`` and ``predict``
    do not.
    """

    def __init__(self, module: nn.Module, preprocess=None, classes: Sequence[str] | None = None,
                 device: str | torch.device | None = "auto", in_channels: int | None = None,
                 input_size: Sequence[int] | None = None, value_range: tuple[float, float] | None = None,
                 logits_output: int | str | None = None):
        if not isinstance(module, nn.Module) and not callable(module):
            raise InputError(f"Classifier needs an nn.Module, got {type(module).__name__}")
        self.device = resolve_device(device)
        self.module = module.to(self.device) if isinstance(module, nn.Module) else module
        if in_channels is not None and in_channels != 1 and preprocess is None:
            preprocess = RepeatChannels(in_channels)
        elif in_channels is not None and in_channels != 1 and not _has_repeat(preprocess):
            preprocess = nn.Sequential(RepeatChannels(in_channels), preprocess)
        if isinstance(preprocess, nn.Module):
            preprocess = preprocess.to(self.device)
        self.preprocess = preprocess
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.in_channels = in_channels
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.value_range = tuple(float(v) for v in value_range) if value_range is not None else None
        self.logits_output = logits_output
        self.n_classes: int | None = None     # known after the first forward pass

    # -- mode handling ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def eval_mode(self):
        """Put the module (and preprocessing) in eval mode; restore every submodule's own flag."""
        mods = [m for m in (self.module, self.preprocess) if isinstance(m, nn.Module)]
        saved = [(sub, sub.training) for m in mods for sub in m.modules()]
        try:
            for m in mods:
                m.eval()
            yield self
        finally:
            for sub, flag in saved:
                sub.training = flag

    # -- evaluation ------------------------------------------------------------------------------
    def as_input(self, x) -> torch.Tensor:
        """Validate and move a data-space batch ``[B, C, *spatial]`` to the device as float32."""
        x = torch.as_tensor(x)
        if x.dim() < 3:
            raise InputError(f"x has shape {tuple(x.shape)}; expected [batch, channels, *spatial] "
                             "(add the batch axis with x[None] or the channel axis with x[:, None])")
        if not torch.is_floating_point(x):
            x = x.float()
        if x.dtype == torch.float64:
            x = x.float()
        if not torch.isfinite(x).all():
            raise InputError("x contains NaN or infinite values; clean the input before explaining it")
        return x.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of data-space ``x`` on the current autograd tape, without touching modes.

        A model with one output is a binary classifier with a sigmoid: its logit ``z`` becomes the
        two logits ``[-z/2, z/2]`` (softmax of which is ``[1 - sigmoid(z), sigmoid(z)]``, and each
        class has a gradient). A tuple or list output must be named with ``logits_output`` (which
        element holds the logits); an output object or dict with ``logits`` is taken by that name.
        Non-finite logits raise an :class:`InputError` instead of giving NaN maps.
        """
        z = self.preprocess(x) if self.preprocess is not None else x
        out = _pick_logits(self.module(z), self.logits_output)
        if out.dim() == 2 and out.shape[1] == 1:
            out = torch.cat([-0.5 * out, 0.5 * out], dim=1)
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).any(dim=1).sum()) if out.dim() == 2 else -1
            raise InputError(f"the model returned NaN or infinite logits for {bad} of {out.shape[0]} inputs (data "
                             f"values {float(x.min()):.4g}..{float(x.max()):.4g}); check the model and that the data "
                             "is in the range it was trained on")
        self.n_classes = out.shape[1]
        return out

    def logits(self, x) -> torch.Tensor:
        """Logits ``[B, n_classes]`` in eval mode; differentiable with respect to ``x``."""
        with self.eval_mode():
            return self.forward(self.as_input(x))

    @torch.no_grad()
    def probs(self, x) -> torch.Tensor:
        """Softmax probabilities ``[B, n_classes]``."""
        return torch.softmax(self.logits(x), dim=1)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """Predicted class index per row, ``[B]`` (int64)."""
        return self.logits(x).argmax(dim=1)

    __call__ = logits

    # -- description -----------------------------------------------------------------------------
    def class_names(self, n_classes: int) -> list[str]:
        """Class names, checked against the model's output size."""
        if self.classes is None:
            return [str(i) for i in range(n_classes)]
        if n_classes == 2 and len(self.classes) == 1:      # one sigmoid output named by its positive class
            return [f"not {self.classes[0]}", self.classes[0]]
        if len(self.classes) != n_classes:
            raise InputError(f"the model has {n_classes} outputs but {len(self.classes)} class names "
                             f"were given ({self.classes}); pass one name per output")
        return list(self.classes)

    def __repr__(self) -> str:
        name = type(self.module).__name__
        return f"Classifier({name}, classes={self.classes}, device={self.device})"


def _pick_logits(out, which) -> torch.Tensor:
    """The logits ``[batch, n_classes]`` among a model's outputs (see :meth:`Classifier.forward`)."""
    if which is not None:
        try:
            out = out[which] if isinstance(out, (tuple, list, dict)) else getattr(out, str(which))
        except (IndexError, KeyError, AttributeError, TypeError) as exc:
            raise InputError(f"logits_output={which!r} is not one of the model's outputs ({_describe(out)})") from exc
    elif isinstance(out, (tuple, list)):
        raise InputError(f"the model returned {_describe(out)}; say which one holds the logits with "
                         "logits_output=INDEX (command line: --logits-output INDEX)")
    elif isinstance(out, dict):
        if "logits" not in out:
            raise InputError(f"the model returned {_describe(out)}; say which one holds the logits with "
                             "logits_output=KEY (command line: --logits-output KEY)")
        out = out["logits"]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(f"the model returned {_describe(out)}; a classifier must return logits [batch, n_classes]")
    return out


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: " + ", ".join(_describe(o) for o in out)
    if isinstance(out, dict):
        return "a dict with " + ", ".join(f"{k!r}: {_describe(v)}" for k, v in out.items())
    return type(out).__name__


def _has_repeat(preprocess) -> bool:
    if isinstance(preprocess, RepeatChannels):
        return True
    return isinstance(preprocess, nn.Sequential) and any(isinstance(m, RepeatChannels) for m in preprocess)
