"""The classifier wrapper: a module, its preprocessing, its class names and its device.

Everything counterlens explains is in *data space*: the pixel values as loaded (0..1, Hounsfield
units, raw features). Whatever the network needs on top (normalisation, grey to RGB) lives in
``preprocess`` inside the wrapper, so gradients, heatmaps and counterfactuals refer to the image
the user sees.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from .errors import InputError
from .heads import (Capture, activation_modules, check_output, graph_activation, head_scores, probabilities,
                    resolve_head, static_head)
from .preprocessing import Normalize, RepeatChannels, preprocess_from_spec, preprocess_to_spec  # noqa: F401 (re-exported)


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
    output : "auto" (default), "logits", "probabilities", "sigmoid" or "multilabel"
        What the module's output is (see :mod:`counterlens.heads`). Every method differentiates
        the *scores* :meth:`logits` returns: the module's logits; for a softmax-ended module the
        pre-softmax logits (a final softmax is stripped, else log-probabilities; never softmaxed
        twice); for one sigmoid output the logit ``z`` as the two classes ``[-z/2, z/2]``
        (``"not X"`` / ``"X"``); for ``"multilabel"`` (one sigmoid per finding) the ``K`` per-finding
        logits. ``"auto"`` detects a final ``nn.Softmax`` / ``nn.LogSoftmax`` / ``nn.Sigmoid`` module
        or softmax / sigmoid call on the first forward pass; :attr:`output` is the resolved head.
    precision : None, "bf16" or "fp16"
        None (default): the module runs in its own dtype (a ``module.to(torch.bfloat16)`` model in
        bfloat16). ``"bf16"`` / ``"fp16"``: the module runs under ``torch.autocast`` in that dtype
        (on the CPU prefer ``"bf16"``: fp16 autocast runs there but is not faster). Either way the
        input is cast to the module's dtype where it enters the module and the logits come back as
        float32, so every method's maths, baselines, masks and thresholds stay float32.

    Calls run the module in eval mode (dropout off, BatchNorm running statistics) and give it
    back its own mode afterwards. ``logits`` keeps the autograd graph; ``probs`` and ``predict``
    do not.
    """

    def __init__(self, module: nn.Module, preprocess=None, classes: Sequence[str] | None = None,
                 device: str | torch.device | None = "auto", in_channels: int | None = None,
                 input_size: Sequence[int] | None = None, value_range: tuple[float, float] | None = None,
                 logits_output: int | str | None = None, precision: str | None = None, output: str = "auto"):
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
        self.precision = check_precision(precision)
        if self.precision == "fp16" and self.device.type == "cpu":
            import warnings
            warnings.warn("precision='fp16' on the CPU: autocast runs but was measured 5-25x slower than float32 "
                          "(benchmarks/precision.py); use precision='bf16' on the CPU", stacklevel=2)
        self.n_classes: int | None = None     # known after the first forward pass
        # the head: asked for, resolved on the first forward pass (see counterlens.heads)
        self._output_asked = check_output(output)
        if self.classes is not None and len(self.classes) == 1 and self._output_asked != "multilabel":
            # one name: a one-output binary classifier named by its positive class
            self.classes = [f"not {self.classes[0]}", self.classes[0]]
        self._output: str | None = None
        self._activation: str | None = None   # the final activation undone ("softmax", "sigmoid", ...)
        self._final = None                    # its module (hooked on every pass), or None
        self._functional = False              # or a function call (watched by a TorchFunctionMode)
        self.head_note: str | None = None     # how the scores are obtained, in words
        static = static_head(module)          # an nn.Sequential ending in Linear (+ activation): known now
        decided = resolve_head(self._output_asked, static[0], None, static[1]) if static else None
        if decided is not None:
            self._output, self._activation, self.head_note = decided
            self._final = static[0][2] if (static[0] and self._activation) else None

    # -- the output head -------------------------------------------------------------------------
    @property
    def output(self) -> str:
        """The resolved head: ``"logits"``, ``"probabilities"``, ``"sigmoid"`` or ``"multilabel"``.

        Resolved on the first forward pass; asked before one, a probe of zeros resolves it when
        ``in_channels`` and ``input_size`` are known (else ``"auto"`` until the first pass).
        """
        if self._output is None and self.in_channels and self.input_size:
            try:
                with torch.no_grad():
                    self.logits(torch.zeros(1, self.in_channels, *self.input_size))
            except Exception:      # noqa: BLE001 - the real first pass will say what is wrong
                pass
        return self._output or self._output_asked

    @property
    def multilabel(self) -> bool:
        """True for a multi-label head (one sigmoid per finding)."""
        return self.output == "multilabel"

    def _capture(self):
        if self._output is None:    # the probe: every activation module and function call
            return Capture(activation_modules(self.module), functions=True)
        if self._activation is None:
            return contextlib.nullcontext()
        return Capture([self._final] if self._final is not None else [], functions=self._functional)

    def _scores(self, raw: torch.Tensor, cap) -> torch.Tensor:
        """The head's float32 scores from the module's output (resolving the head on the first pass)."""
        found = cap.find(raw) if cap is not None else None
        if self._output is None:
            graph = graph_activation(self.module) if found is None else None
            output, act, note = resolve_head(self._output_asked, found, raw.detach(), graph=graph)
            self._final = found[2] if (found and act and found[0] == act) else None
            self._functional = bool(found and act and found[0] == act and found[2] is None)
            self._activation, self.head_note, self._output = act, note, output
        pre = found[1] if (found and self._activation and found[0] == self._activation) else None
        raw, pre = (_float32(t) for t in (raw, pre))
        return head_scores(self._output, self._activation, raw, pre)

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
        """Scores ("logits") of data-space ``x`` on the current autograd tape, without touching modes.

        The scores of the head (see ``output``): logits, pre-softmax logits of a softmax-ended
        module, ``[-z/2, z/2]`` for one sigmoid output ``z`` (softmax of which is
        ``[1 - sigmoid(z), sigmoid(z)]``, and each class has a gradient), per-finding logits for a
        multi-label module; always float32. A tuple or list output must be named with
        ``logits_output`` (which element holds the logits); an output object or dict with
        ``logits`` is taken by that name. Non-finite logits raise an :class:`InputError` instead of
        giving NaN maps.
        """
        z = self.preprocess(x) if self.preprocess is not None else x
        with autocast(self.precision, z.device), self._capture() as cap:
            out = _pick_logits(self.module(to_module_dtype(self.module, z)), self.logits_output)
        out = self._scores(out, cap)      # the head's scores, float32 (see `output`)
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
        """Probabilities ``[B, n_classes]``: softmax, or per-finding sigmoid for ``"multilabel"``."""
        return self.probs_of(self.logits(x))

    def probs_of(self, scores: torch.Tensor) -> torch.Tensor:
        """Probabilities of scores already computed by :meth:`logits` / :meth:`forward`."""
        return probabilities(scores, self.multilabel)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """Predicted class index per row, ``[B]`` (int64); multi-label: the most probable finding."""
        return self.logits(x).argmax(dim=1)

    @torch.no_grad()
    def positive(self, x, threshold: float = 0.5) -> torch.Tensor:
        """``[B, K]`` bool: the findings whose sigmoid probability is at least ``threshold`` (multi-label)."""
        if not 0.0 < float(threshold) < 1.0:
            raise InputError(f"threshold={threshold!r}; pass a probability between 0 and 1, e.g. 0.5")
        probs = self.probs(x)
        if not self.multilabel:
            raise InputError(f"positive() is for multi-label models; this one's head is {self.output!r} "
                             "(use predict(), or Classifier(..., output='multilabel'))")
        return probs >= float(threshold)

    __call__ = logits

    @classmethod
    def from_keras(cls, model, *, convert: bool = True, trust_model_file: bool = False, **kwargs) -> "Classifier":
        """A Keras 3 ``keras.Model`` (or a ``.keras`` / ``.h5`` path; a Lambda layer's code loads only
        with ``trust_model_file``) as a classifier (see :mod:`counterlens.keras_models`): converted
        to native torch modules (``convert=False``, or a layer it cannot convert: the Keras model
        wrapped, with a warning). ``in_channels``, ``input_size``, ``output`` and ``value_range``
        default to the Keras model's input shape, final activation and first Rescaling layer;
        other ``kwargs`` as for ``Classifier``."""
        from .keras_models import keras_module
        module, info = keras_module(model, convert=convert, trust_model_file=trust_model_file)
        for key in ("in_channels", "input_size", "output", "value_range"):
            if kwargs.get(key) is None:
                kwargs[key] = info[key]
        clf = cls(module, **kwargs)
        clf.keras = info
        return clf

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
        head = self._output or self._output_asked          # no probe pass for a repr
        return f"Classifier({name}, classes={self.classes}, output={head!r}, device={self.device})"


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision) -> str | None:
    """``None``, ``"bf16"`` or ``"fp16"`` (also ``"bfloat16"``, ``"float16"``, ``"half"``, ``"fp32"``)."""
    if precision is None:
        return None
    key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "fp32": None, "float32": None}.get(
        str(precision).lower(), str(precision).lower())
    if key is not None and key not in PRECISIONS:
        raise InputError(f"precision={precision!r}; pass None (the module's own dtype), 'bf16' or 'fp16'")
    return key


def autocast(precision: str | None, device: torch.device):
    """``torch.autocast`` in ``precision`` on ``device`` (a no-op context for None)."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def module_dtype(module) -> torch.dtype | None:
    """The floating dtype of the module's first floating parameter or buffer (None: no tensors)."""
    if not isinstance(module, nn.Module):
        return None
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def to_module_dtype(module, z):
    """``z`` cast to the module's floating dtype (bf16 / fp16 / float64 models), differentiably."""
    dtype = module_dtype(module) if isinstance(z, torch.Tensor) and z.is_floating_point() else None
    return z.to(dtype) if dtype is not None and dtype != z.dtype else z


def _float32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32 else t


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
