"""Keras models: load ``.keras`` / ``.h5`` files, convert them to native torch modules, or wrap them.

Keras 3 runs on the torch backend (``KERAS_BACKEND=torch``, set here before keras is first
imported), so a Keras model is already an ``nn.Module`` that input gradients flow through. But its
layers are not torch child modules (CAM methods cannot hook them, the sanity check finds nothing to
re-initialise), it is channels-last, and it runs slower than native torch. So
:func:`keras_module` **converts** Sequential and Functional graphs of the common layers
(:data:`counterlens.keras_layers.CONVERTERS`) into a tree of named torch modules with the same
weights, channels-first inside (Keras' channels-last layers become ``nn.Conv2d`` & co. on
``[B, C, H, W]``; Flatten, Dense on feature maps, Reshape and Permute see the Keras order). A
model with a layer that cannot be converted runs **wrapped** (:class:`KerasWrapped`), with a warning
naming the layers and what does not work then. Either way counterlens feeds ``[B, C, *spatial]``
and the maps come back in that layout.

Nothing here imports keras at module level: counterlens imports without it.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, ModelLoadError, UntrustedModelError
from .keras_layers import CONVERTERS, Unconvertible
from .keras_modules import InKerasOrder, MoveChannels

KERAS_HINT = "pip install 'counterlens[keras]'"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
CAM_METHODS = ("gradcam", "gradcam_plus_plus", "layercam", "scorecam", "guided_gradcam")
_SPATIAL = re.compile(r"^(Conv|DepthwiseConv|SeparableConv|MaxPooling|AveragePooling|GlobalMaxPooling|"
                      r"GlobalAveragePooling|ZeroPadding|Cropping|UpSampling|SpatialDropout)([123])D$")


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
    suffix = ".keras" if kind == "keras" else ".h5"
    with tempfile.TemporaryDirectory(prefix="counterlens-keras-") as tmp:
        if path.suffix.lower() not in (suffix, ".hdf5"):   # bytes written under another name (workers)
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


# -- the input's layout --------------------------------------------------------------------------
@dataclass
class InputLayout:
    """How counterlens' ``[B, C, *spatial]`` maps onto the Keras model's input.

    ``kind``: ``"channels_last"`` (Keras ``[B, *S, C]``), ``"channels_first"``, ``"no_channels"``
    (Keras ``[B, *S]``, fed ``[B, 1, *S]``) or ``"features"`` (a table, ``[B, F]``).
    """
    kind: str
    in_channels: int | None
    input_size: tuple[int, ...] | None


def _layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _layers(layer)


def input_layout(model) -> InputLayout:
    keras = import_keras()
    shape = tuple(model.inputs[0].shape)
    rank = len(shape)
    if rank <= 2:
        return InputLayout("features", None, None)
    spatial = [(int(m.group(2)), layer.get_config().get("data_format") or keras.config.image_data_format())
               for layer in _layers(model) if (m := _SPATIAL.match(type(layer).__name__))]
    if not spatial and rank == 3:
        kind = "no_channels"
    elif spatial and spatial[0][0] + 2 != rank:
        kind = "no_channels" if spatial[0][0] + 1 == rank else "channels_last"
    else:
        kind = spatial[0][1] if spatial else keras.config.image_data_format()
    if kind == "no_channels":
        size, channels = shape[1:], 1
    elif kind == "channels_last":
        size, channels = shape[1:-1], shape[-1]
    else:
        size, channels = shape[2:], shape[1]
    known = all(isinstance(s, int) for s in size)
    return InputLayout(kind, channels if isinstance(channels, int) else None, tuple(size) if known else None)


class ToKerasLayout(nn.Module):
    """``[B, C, *S]`` to the Keras model's own input layout (see :class:`InputLayout`)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return to_keras_layout(x, self.kind)


def to_keras_layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return x.movedim(1, -1)
    if kind == "no_channels":
        if x.shape[1] != 1:
            raise InputError(f"the Keras model takes images without a channel axis; got {x.shape[1]} channels "
                             "(pass grey images, or --channels 1)")
        return x[:, 0]
    return x


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


# -- the converted model --------------------------------------------------------------------------
class KerasGraph(nn.Module):
    """A converted Functional graph: named torch submodules run in the graph's order.

    ``steps``: ``(module name, input keys, output key)``; the input is key ``"input"``.
    """

    def __init__(self, modules: "OrderedDict[str, nn.Module]", steps: list[tuple[str, tuple[str, ...], str]],
                 output: str):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.steps, self.output = [tuple(s) for s in steps], output

    def forward(self, x):
        env = {"input": x}
        for name, ins, out in self.steps:
            env[out] = self._modules[name](*(env[k] for k in ins))
        return env[self.output]


class _Builder:
    """Walks a Keras graph, converting each layer, inserting layout moves where two layers disagree."""

    def __init__(self, prefer_moved: bool):
        self.prefer_moved = prefer_moved          # channels-last model: feature maps held channels-first
        self.modules: OrderedDict[str, nn.Module] = OrderedDict()
        self.steps: list[tuple[str, tuple[str, ...], str]] = []
        self.problems: list[str] = []
        self._reuse: dict = {}

    def name(self, base: str) -> str:
        base = re.sub(r"\W", "_", base) or "layer"
        if base[0].isdigit() or hasattr(nn.Module, base) or base in ("steps", "output", "input"):
            base = f"k_{base}"
        name, i = base, 1
        while name in self.modules:
            name, i = f"{base}_{i}", i + 1
        return name

    def step(self, base: str, module: nn.Module, ins: tuple[str, ...]) -> str:
        name = self.name(base)
        self.modules[name] = module
        self.steps.append((name, ins, name))
        return name

    def layout(self, key: str, moved: bool, rank: int, want: bool, base: str) -> str:
        if rank < 3 or moved == want:
            return key
        return self.step(f"{base}_{'to_channels_first' if want else 'to_keras_order'}", MoveChannels(want), (key,))

    def graph(self, model, key: str, moved: bool, prefix: str = "") -> tuple[str | None, bool]:
        """Add ``model``'s layers fed by ``key``; returns the output's key and layout."""
        graph = getattr(model, "_functional", None) if type(model).__name__ == "Sequential" else model
        nodes = getattr(graph, "_nodes_by_depth", None)
        if graph is None or nodes is None:
            self.problems.append(f"{model.name} ({type(model).__name__}: a subclassed or unbuilt model, not a graph)")
            return None, False
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            self.problems.append(f"{model.name} ({len(graph.inputs)} inputs, {len(graph.outputs)} outputs)")
            return None, False
        env = {id(graph.inputs[0]): (key, moved)}
        for depth in sorted(nodes, reverse=True):
            for node in nodes[depth]:
                if node.operation is None or node.is_input:
                    continue
                op = node.operation
                if any(id(t) not in env for t in node.input_tensors):
                    self.problems.append(f"{op.name} (an input the graph does not compute)")
                    return None, False
                ins = [env[id(t)] for t in node.input_tensors]
                if len(node.outputs) != 1:
                    self.problems.append(f"{op.name} ({len(node.outputs)} outputs)")
                    out = None
                elif any(k is None for k, _ in ins):          # after a layer that could not be converted:
                    out = None                                 # only list this one too if it cannot be
                    if type(op).__name__ not in CONVERTERS and not hasattr(op, "_nodes_by_depth"):
                        self.problems.append(f"{op.name} ({type(op).__name__})")
                else:
                    out = self.layer(op, ins, [tuple(t.shape) for t in node.input_tensors],
                                     len(node.outputs[0].shape), prefix)
                for t in node.outputs:
                    env[id(t)] = out if out is not None else (None, False)
        return env.get(id(graph.outputs[0]), (None, False))

    def layer(self, layer, ins, shapes, out_rank: int, prefix: str):
        cls = type(layer).__name__
        if hasattr(layer, "_nodes_by_depth") or cls == "Sequential":       # a nested model
            if len(ins) == 1:
                key, moved = self.graph(layer, *ins[0], prefix=f"{prefix}{layer.name}_")
                return None if key is None else (key, moved)
            self.problems.append(f"{layer.name} (a nested model with {len(ins)} inputs)")
            return None
        if cls not in CONVERTERS:
            self.problems.append(f"{layer.name} ({cls})")
            return None
        try:
            cfg = layer.get_config()
            converted = CONVERTERS[cls](layer, cfg, shapes, [m for _, m in ins])
        except Unconvertible as exc:
            self.problems.append(f"{layer.name} ({cls}: {exc})")
            return None
        base = prefix + layer.name
        # a layer on the Keras order (Dense on feature maps, Reshape, Permute) moves its input and output
        # itself: every feature map between modules keeps its channels on axis 1
        move_in = len(ins) == 1 and not converted.want and ins[0][1] and len(shapes[0]) >= 3
        move_out = not converted.moved and out_rank >= 3 and self.prefer_moved
        reuse_key = (id(layer), converted.want, move_in, move_out)
        if reuse_key in self._reuse:                                   # a shared layer: the same modules
            parts = self._reuse[reuse_key]
        elif move_in or move_out:
            modules = [module for _, module in converted.parts]
            inner = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
            parts = self._reuse[reuse_key] = [(base, InKerasOrder(inner, bool(move_in), move_out))]
        else:
            parts = [(f"{base}_{suffix}" if suffix else base, module) for suffix, module in converted.parts]
            self._reuse[reuse_key] = parts
        if move_in:
            keys = (ins[0][0],)
        else:
            keys = tuple(self.layout(k, m, len(s), converted.want, base) for (k, m), s in zip(ins, shapes))
        for name, module in parts:
            keys = (self.step(name, module, keys),)
        return keys[0], (converted.moved or move_out) and out_rank >= 3


def convert_keras(model) -> tuple[nn.Module | None, list[str]]:
    """``model`` as native torch modules fed ``[B, C, *S]`` (None when it cannot be), and the layers
    that could not be converted (``"name (Class: why)"``)."""
    layout = input_layout(model)
    builder = _Builder(prefer_moved=layout.kind in ("channels_last", "no_channels"))
    key, moved = "input", layout.kind == "channels_last"
    if layout.kind == "no_channels":
        key = builder.step("input_without_channels", ToKerasLayout("no_channels"), ("input",))
    out, out_moved = builder.graph(model, key, moved)
    if builder.problems or out is None:
        return None, builder.problems or [f"{model.name} (its output is not computed from its input)"]
    if out_moved:
        out = builder.step("output_to_keras_order", MoveChannels(False), (out,))
    steps = builder.steps
    chain = all(ins == ((steps[i - 1][2],) if i else ("input",)) for i, (_, ins, _) in enumerate(steps))
    if chain and steps[-1][2] == out and len(builder.modules) == len(steps):
        return nn.Sequential(builder.modules), []
    return KerasGraph(builder.modules, steps, out), []


def final_activation(model) -> str:
    """The Keras name of the activation that makes the model's output (``"softmax"``, ``"sigmoid"``,
    ``"linear"`` ...), read from the layer that produces it."""
    from .keras_layers import activation_name
    graph = getattr(model, "_functional", None) if type(model).__name__ == "Sequential" else model
    outputs = getattr(graph, "outputs", None) or []
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    if history is None:
        return "linear"
    layer = history[0]
    if hasattr(layer, "_nodes_by_depth") or type(layer).__name__ == "Sequential":
        return final_activation(layer)
    if type(layer).__name__ == "Softmax":
        return "softmax"
    try:
        return activation_name(layer.get_config().get("activation"))
    except Unconvertible:
        return "custom"


def head_of(model) -> str:
    """The counterlens output head of a Keras model (``Classifier(output=...)``) from its final activation."""
    name = final_activation(model)
    width = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    if name == "softmax":
        return "probabilities"
    if name == "sigmoid":
        return "sigmoid" if width == 1 else "multilabel"
    return "logits"


def keras_module(model, convert: bool = True) -> tuple[nn.Module, dict]:
    """A torch module for the Keras ``model``, fed ``[B, C, *spatial]``, and what counterlens needs
    to know about it: ``{"in_channels", "input_size", "output" (the head), "converted",
    "unconverted" (layers that kept it wrapped), "layout"}``.

    ``convert=True`` converts the graph to native torch modules; a layer that cannot be converted
    leaves the model wrapped (:class:`KerasWrapped`), with a warning naming the layers and what does
    not work then. ``convert=False`` always wraps.
    """
    keras = import_keras()
    if not isinstance(model, keras.Model):
        raise InputError(f"from_keras needs a keras.Model, got {type(model).__name__}; load a file with "
                         "counterlens.loading.load_model('model.keras')")
    if not getattr(model, "inputs", None):
        raise InputError(f"Keras model {model.name!r} has no known input shape; build it first "
                         "(keras.Input(shape=...) as its first layer, or model.build((None, *shape)))")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(f"Keras model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
                         "outputs; counterlens explains classifiers with one input and one output")
    layout = input_layout(model)
    module, problems = convert_keras(model) if convert else (None, ["convert=False"])
    if module is None:
        module = KerasWrapped(model, layout, problems)
        if convert:
            warnings.warn(
                f"Keras model {model.name!r}: {len(problems)} layer(s) could not be converted to torch: "
                f"{'; '.join(problems)}. It runs as the wrapped Keras model (slower); CAM methods "
                f"({', '.join(CAM_METHODS)}) and the model-randomisation sanity check cannot run on it (no torch "
                "layers to hook or re-initialise); gradient, perturbation and surrogate methods, metrics and "
                "counterfactuals do", stacklevel=2)
    module.eval()
    info = {"in_channels": layout.in_channels, "input_size": layout.input_size, "output": head_of(model),
            "converted": not isinstance(module, KerasWrapped), "unconverted": problems, "layout": layout.kind}
    return module, info


def load_keras(path, trust_model_file: bool = False, convert: bool = True, factory=None) -> tuple[nn.Module, dict]:
    """:func:`load_keras_file` then :func:`keras_module`: the module and its card entries
    (``in_channels``, ``input_size``, ``output``, ``architecture`` (a description), ``keras``: the rest)."""
    if factory is not None:
        raise ModelLoadError(f"{path} is a Keras model file and holds its own architecture; drop factory / --factory")
    model = load_keras_file(path, trust_model_file)
    module, info = keras_module(model, convert=convert)
    card = {key: info.pop(key) for key in ("in_channels", "input_size", "output")}
    card["input_size"] = list(card["input_size"]) if card["input_size"] else None
    card["architecture"] = f"keras {type(model).__name__} {model.name!r} " + \
        ("converted to torch" if info["converted"] else "wrapped (not converted)")
    card["keras"] = info
    return module, card
