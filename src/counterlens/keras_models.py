"""Keras models: load ``.keras`` / ``.h5`` files, convert them to native torch modules, or wrap them.

Keras 3 runs on the torch backend (``KERAS_BACKEND=torch``, set here before keras is first
imported), so a Keras model is already an ``nn.Module`` that input gradients flow through. But its
layers are not torch child modules (CAM methods cannot hook them, the sanity check finds nothing to
re-initialise), it is channels-last, and it runs slower than native torch. So
:func:`keras_module` **converts** Sequential and Functional graphs of the common layers
(:mod:`counterlens.keras_graph`, :data:`counterlens.keras_layers.CONVERTERS`) into a tree of
named torch modules with the same weights, channels-first inside (Keras' channels-last layers become ``nn.Conv2d`` & co. on
``[B, C, H, W]``; Flatten, Reshape and Permute see the Keras order). A
model with a layer that cannot be converted runs **wrapped** (:class:`KerasWrapped`), with a warning
naming the layers and what does not work then. Either way counterlens feeds ``[B, C, *spatial]``
and the maps come back in that layout.

Nothing here imports keras at module level: counterlens imports without it.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, ModelLoadError, UntrustedModelError
from .keras_graph import InputLayout, convert_keras, input_layout, to_keras_layout
from .keras_layers import Unconvertible, activation_name

KERAS_HINT = "pip install 'counterlens[keras]'"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
CAM_METHODS = ("gradcam", "gradcam_plus_plus", "layercam", "scorecam", "guided_gradcam")


# -- keras itself --------------------------------------------------------------------------------
def import_keras():
    """Keras 3 on the torch backend. ``KERAS_BACKEND`` is set to ``torch`` before the first import;
    keras already imported with another backend is an :class:`InputError` (it cannot be switched)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        try:
            backend = keras.backend.backend()
        except AttributeError as exc:
            raise ModelLoadError(f"keras {getattr(keras, '__version__', '?')} is imported but is not Keras 3; "
                                 f"counterlens reads Keras 3 models: {KERAS_HINT}") from exc
        if backend != "torch":
            raise InputError(f"keras was already imported with the {backend!r} backend; counterlens runs Keras models "
                             "on the torch backend. Set KERAS_BACKEND=torch before keras is first imported "
                             "(os.environ['KERAS_BACKEND'] = 'torch' at the top of the script, or in the shell)")
        return keras
    previous = os.environ.get("KERAS_BACKEND")
    if previous and previous != "torch":
        warnings.warn(f"KERAS_BACKEND={previous!r} replaced by 'torch' in this process: counterlens runs Keras "
                      "models on the torch backend", stacklevel=3)
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as exc:
        raise ModelLoadError(f"Keras models need Keras 3 with h5py ({exc}); install them with {KERAS_HINT}") from exc
    if not hasattr(keras, "backend") or not hasattr(keras.backend, "backend"):
        raise ModelLoadError(f"keras {getattr(keras, '__version__', '?')} is not Keras 3: {KERAS_HINT}")
    return keras


def keras_file_kind(path: Path) -> str | None:
    """``"keras"`` (a Keras 3 zip), ``"h5"`` (HDF5, e.g. a TF-Keras 2 ``.h5``) or None, by content."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head == HDF5_MAGIC:
        return "h5"
    if head[:2] == b"PK" and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
        except (zipfile.BadZipFile, OSError):
            return None
        if "config.json" in names and ("model.weights.h5" in names or "metadata.json" in names):
            return "keras"
    return None


def load_keras_file(path, trust_model_file: bool = False):
    """The Keras model in ``path`` (``.keras`` or ``.h5``), loaded with ``safe_mode=True``: a Lambda
    layer's pickled Python code is refused (:class:`UntrustedModelError`) unless ``trust_model_file``."""
    path = Path(path)
    kind = keras_file_kind(path)
    if kind is None:
        raise ModelLoadError(f"{path}: not a Keras model file (a .keras zip or an HDF5 .h5)")
    keras = import_keras()
    suffix, suffixes = (".keras", (".keras",)) if kind == "keras" else (".h5", (".h5", ".hdf5"))
    with tempfile.TemporaryDirectory(prefix="counterlens-keras-") as tmp:
        if path.suffix.lower() not in suffixes:       # Keras goes by the name; bytes written as model.pt (workers)
            link = Path(tmp) / f"model{suffix}"
            link.symlink_to(path.resolve())
            path_for_keras = link
        else:
            path_for_keras = path
        try:
            return keras.saving.load_model(str(path_for_keras), compile=False, safe_mode=not trust_model_file)
        except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/TypeError/KeyError/OSError alike
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "safe_mode" in str(exc) or "arbitrary code" in str(exc):
                raise UntrustedModelError(
                    f"{path} holds a Lambda layer (or another object) whose Python code Keras would deserialize and "
                    "run; if you trust the file's origin, pass --trust-model-file (CLI) / trust_model_file=True") from exc
            raise ModelLoadError(f"{path}: Keras cannot load it: {text}") from exc


# -- the wrapped model ----------------------------------------------------------------------------
class KerasWrapped(nn.Module):
    """A Keras model run as it is (through ``KERAS_BACKEND=torch``), fed ``[B, C, *S]``.

    The Keras model is kept out of the torch module tree (its layers cannot be hooked anyway), so
    CAM methods and the model-randomisation check say they cannot run instead of hooking nothing.
    It is always called with ``training=False``. ``unconverted`` lists what kept it from conversion.
    """

    def __init__(self, model, layout: InputLayout, unconverted: list[str] | None = None):
        super().__init__()
        self.__dict__["keras_model"] = model
        self.layout = layout.kind               # not a submodule: a CAM must not take its output for a feature map
        self.unconverted = list(unconverted or [])

    def forward(self, x):
        out = self.keras_model(to_keras_layout(x, self.layout), training=False)
        return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out


def final_activation(model) -> str | None:
    """The Keras name of the activation that makes the model's output (``"softmax"``, ``"sigmoid"``,
    ``"linear"`` ...), read from the layer that produces it; None when that is not a layer that
    says (an operation such as ``keras.ops.softmax``, a custom layer)."""
    graph = getattr(model, "_functional", None) if type(model).__name__ == "Sequential" else model
    outputs = getattr(graph, "outputs", None) or []
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    if history is None:
        return None
    layer = history[0]
    if hasattr(layer, "_nodes_by_depth") or type(layer).__name__ == "Sequential":
        return final_activation(layer)
    if type(layer).__name__ == "Softmax":
        return "softmax"
    config = layer.get_config() if hasattr(layer, "get_config") else {}
    if "activation" not in config:
        return None
    try:
        return activation_name(config["activation"])
    except Unconvertible:
        return None


def head_of(model) -> str:
    """The counterlens output head of a Keras model (``Classifier(output=...)``) from its final
    activation; ``"auto"`` (detected on the first forward pass) when the final layer does not say."""
    name = final_activation(model)
    width = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    if name is None:
        return "auto"
    if name == "softmax":
        return "probabilities"
    if name == "sigmoid":
        return "sigmoid" if width == 1 else "multilabel"
    return "logits"


def value_range_of(model) -> tuple[float, float] | None:
    """``(0, 255)`` when the model's first layer is Keras' usual ``Rescaling(1/255)`` or
    ``Rescaling(1/127.5, offset=-1)`` (it takes 8-bit pixel values), else None (not stated)."""
    first = next((layer for layer in getattr(model, "layers", []) if type(layer).__name__ != "InputLayer"), None)
    if type(first).__name__ != "Rescaling":
        return None
    cfg = first.get_config()
    scale, offset = cfg.get("scale"), cfg.get("offset", 0.0)
    if not isinstance(scale, (int, float)) or not isinstance(offset, (int, float)):
        return None
    if (abs(scale * 255 - 1) < 1e-3 and offset == 0) or (abs(scale * 127.5 - 1) < 1e-3 and offset == -1):
        return (0.0, 255.0)
    return None


PROBE_SIZE = 32         # spatial size of the probe for an input axis the model leaves open (None)


def probe_gap(model, module: nn.Module, layout: InputLayout, atol: float = 1e-4, rtol: float = 1e-3) -> float | None:
    """Run two seeded random inputs through the Keras model and the converted ``module``; None
    when the outputs agree (``|a - b| <= atol * max(1, max|a|) + rtol * |a|``), else the largest
    difference. A last guard against a layer configuration converted wrongly."""
    shape = [2] + [s if isinstance(s, int) else PROBE_SIZE for s in model.inputs[0].shape[1:]]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    ours = x.movedim(-1, 1) if layout.kind == "channels_last" else x[:, None] if layout.kind == "no_channels" else x
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.no_grad():
        try:
            expected = torch.as_tensor(model(x, training=False)).detach().float().cpu()
        except Exception:  # noqa: BLE001 - Keras cannot run this probe (e.g. an input range it refuses): skip
            return None
        was = module.training
        got = module.eval()(ours.to(device)).float().cpu()
        module.train(was)
    if got.shape != expected.shape:
        return float("inf")
    scale = float(expected[torch.isfinite(expected)].abs().max()) if torch.isfinite(expected).any() else 1.0
    if torch.allclose(got, expected, atol=atol * max(1.0, scale), rtol=rtol, equal_nan=True):
        return None
    return float((got - expected).abs().nan_to_num(float("inf")).max())


def keras_module(model, convert: bool = True, trust_model_file: bool = False) -> tuple[nn.Module, dict]:
    """A torch module for the Keras ``model`` (a ``keras.Model``, or a ``.keras`` / ``.h5`` path
    loaded with ``trust_model_file``, see :func:`load_keras_file`), fed ``[B, C, *spatial]``, and
    what counterlens needs to know about it: ``{"in_channels", "input_size", "output" (the head),
    "value_range" (see :func:`value_range_of`), "converted", "unconverted" (layers that kept it
    wrapped), "layout"}``.

    ``convert=True`` converts the graph to native torch modules; a layer that cannot be converted
    leaves the model wrapped (:class:`KerasWrapped`), with a warning naming the layers and what does
    not work then. ``convert=False`` always wraps.
    """
    keras = import_keras()
    if isinstance(model, (str, os.PathLike)):
        model = load_keras_file(model, trust_model_file)
    if not isinstance(model, keras.Model):
        raise InputError(f"from_keras needs a keras.Model or a .keras / .h5 file, got {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs and type(model).__name__ not in ("Functional", "Sequential"):
        raise InputError(f"Keras model {model.name!r} is a subclassed model ({type(model).__name__}: its call() is "
                         "Python code, not a graph), so its input shape cannot be read nor its layers converted; "
                         "build it as a Functional or Sequential model from keras.Input(shape=...)")
    if not inputs:
        raise InputError(f"Keras model {model.name!r} has no known input shape; build it first "
                         "(keras.Input(shape=...) as its first layer, or model.build((None, *shape)))")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(f"Keras model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
                         "outputs; counterlens explains classifiers with one input and one output")
    default_format = keras.config.image_data_format()
    layout = input_layout(model, default_format)
    module, problems = convert_keras(model, default_format) if convert else (None, ["convert=False"])
    what = f"{len(problems)} layer(s) could not be converted to torch: "
    if module is not None and (gap := probe_gap(model, module, layout)) is not None:
        module, problems = None, [f"the converted model's output differs from Keras' by {gap:.3g} on a probe input"]
        what = "its conversion to torch was refused: "
    if module is None:
        module = KerasWrapped(model, layout, problems)
        if convert:
            warnings.warn(
                f"Keras model {model.name!r}: {what}{'; '.join(problems)}. It runs as the wrapped Keras model (slower); CAM methods "
                f"({', '.join(CAM_METHODS)}) and the model-randomisation sanity check cannot run on it (no torch "
                "layers to hook or re-initialise); gradient, perturbation and surrogate methods, metrics and "
                "counterfactuals do", stacklevel=2)
    module.eval()
    info = {"in_channels": layout.in_channels, "input_size": layout.input_size, "output": head_of(model),
            "value_range": value_range_of(model),
            "converted": not isinstance(module, KerasWrapped), "unconverted": problems, "layout": layout.kind}
    return module, info


def load_keras(path, trust_model_file: bool = False, convert: bool = True, factory=None) -> tuple[nn.Module, dict]:
    """:func:`load_keras_file` then :func:`keras_module`: the module and its card entries
    (``in_channels``, ``input_size``, ``output``, ``value_range``, ``architecture`` (a description),
    ``keras``: the rest)."""
    if factory is not None:
        raise ModelLoadError(f"{path} is a Keras model file and holds its own architecture; drop factory / --factory")
    model = load_keras_file(path, trust_model_file)
    module, info = keras_module(model, convert=convert)
    card = {key: info.pop(key) for key in ("in_channels", "input_size", "output", "value_range")}
    for key in ("input_size", "value_range"):
        card[key] = list(card[key]) if card[key] else None
    card["architecture"] = f"keras {type(model).__name__} {model.name!r} " + \
        ("converted to torch" if info["converted"] else "wrapped (not converted)")
    card["keras"] = info
    return module, card
