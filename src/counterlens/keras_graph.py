"""A Keras graph as native torch modules: the walk over a Sequential or Functional model's nodes.

Each Keras layer goes through its converter (:data:`counterlens.keras_layers.CONVERTERS`); the
tensors between them are held channels-first where Keras has them channels-last ("moved"), and a
layer on the Keras order (Flatten, Reshape, Permute) moves its input and output inside its own
module and Dense on a feature map is a linear map of the channels (:class:`ChannelLinear`), so every
feature map a CAM can hook has its channels on axis 1.
Keras *operations* on tensors (``x * 0.5 + 3``, ``keras.ops.mean``: stateless, no weights) run as
they are, on the Keras order, inside a :class:`KerasOp` module. A nested model is walked in place.

keras itself is not imported here: the model's objects are read (``_nodes_by_depth``,
``get_config()``, weights; Keras 3's Functional internals).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError
from .keras_layers import CONVERTERS, Unconvertible
from .keras_modules import InKerasOrder, MoveChannels

_SPATIAL = re.compile(r"^(Conv|DepthwiseConv|SeparableConv|MaxPooling|AveragePooling|GlobalMaxPooling|"
                      r"GlobalAveragePooling|ZeroPadding|Cropping|UpSampling|SpatialDropout)([123])D$")


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


def input_layout(model, default_format: str = "channels_last") -> InputLayout:
    """The layout of the model's input; ``default_format``: ``keras.config.image_data_format()``,
    for layers that do not say theirs."""
    shape = tuple(model.inputs[0].shape)
    rank = len(shape)
    if rank <= 2:
        return InputLayout("features", None, None)
    spatial = [(int(m.group(2)), layer.get_config().get("data_format") or default_format)
               for layer in _layers(model) if (m := _SPATIAL.match(type(layer).__name__))]
    if not spatial and rank == 3:
        kind = "no_channels"
    elif spatial and spatial[0][0] + 2 != rank:
        kind = "no_channels" if spatial[0][0] + 1 == rank else "channels_last"
    else:
        kind = spatial[0][1] if spatial else default_format
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


KERAS_ORDER = ("Reshape", "Permute")       # layers that need the Keras order and move in and out themselves


def _is_layer(op) -> bool:
    """A Keras layer (weights, a config), as opposed to a stateless operation on tensors."""
    return any(c.__name__ == "Layer" and c.__module__.startswith("keras.") for c in type(op).__mro__)


def _is_model(op) -> bool:
    return hasattr(op, "_nodes_by_depth") or type(op).__name__ == "Sequential"


class KerasOp(nn.Module):
    """A stateless Keras operation (``keras.src.ops``) run by Keras on torch tensors in the Keras order.

    ``moves``: per input, whether it arrives moved (channels first) and goes back to the Keras order
    first; ``move_out``: whether the output (rank >= 3) is moved. The operation is called with the
    node's own arguments (constants kept, tensors filled in). Autograd flows through it as through
    any torch code; it has no parameters.
    """

    def __init__(self, op, arguments, tensor_ids, moves, move_out: bool):
        super().__init__()
        self.__dict__["op"], self.__dict__["arguments"] = op, arguments    # Keras objects, not submodules
        self.tensor_ids, self.moves, self.move_out = list(tensor_ids), tuple(moves), move_out

    def __deepcopy__(self, memo):      # stateless: a copy (sanity checks copy the model) may share it
        return self

    def forward(self, *xs):
        xs = [x.movedim(1, -1) if move else x for x, move in zip(xs, self.moves)]
        args, kwargs = self.arguments.fill_in(dict(zip(self.tensor_ids, xs)))
        out = self.op(*args, **kwargs)
        return out.movedim(-1, 1) if self.move_out and out.dim() >= 3 else out


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
                    if _is_layer(op) and type(op).__name__ not in CONVERTERS and not _is_model(op):
                        self.problems.append(f"{op.name} ({type(op).__name__})")
                elif not _is_layer(op):
                    out = self.operation(node, ins, len(node.outputs[0].shape), prefix)
                else:
                    out = self.layer(op, ins, [tuple(t.shape) for t in node.input_tensors],
                                     len(node.outputs[0].shape), prefix)
                for t in node.outputs:
                    env[id(t)] = out if out is not None else (None, False)
        return env.get(id(graph.outputs[0]), (None, False))

    def operation(self, node, ins, out_rank: int, prefix: str):
        """A Keras operation (not a layer: ``x * 0.5``, ``keras.ops.mean``) run as is on the Keras order."""
        op = node.operation
        moves = tuple(bool(m) and len(t.shape) >= 3 for (_, m), t in zip(ins, node.input_tensors))
        module = KerasOp(op, node.arguments, [id(t) for t in node.input_tensors], moves,
                         self.prefer_moved and out_rank >= 3)
        key = self.step(f"{prefix}{op.name}", module, tuple(k for k, _ in ins))
        return key, self.prefer_moved and out_rank >= 3

    def layer(self, layer, ins, shapes, out_rank: int, prefix: str):
        cls = type(layer).__name__
        if not _is_layer(layer):
            return None
        if _is_model(layer):                                              # a nested model
            if len(ins) == 1:
                key, moved = self.graph(layer, *ins[0], prefix=f"{prefix}{layer.name}_")
                return None if key is None else (key, moved)
            self.problems.append(f"{layer.name} (a nested model with {len(ins)} inputs)")
            return None
        if cls not in CONVERTERS or not type(layer).__module__.startswith("keras."):   # a custom layer
            self.problems.append(f"{layer.name} ({cls})")
            return None
        try:
            cfg = layer.get_config()
            converted = CONVERTERS[cls](layer, cfg, shapes, [m for _, m in ins])
        except Unconvertible as exc:
            self.problems.append(f"{layer.name} ({cls}: {exc})")
            return None
        except Exception as exc:  # noqa: BLE001 - a configuration no converter foresaw: wrap, do not crash
            self.problems.append(f"{layer.name} ({cls}: cannot convert, {type(exc).__name__}: {exc})")
            return None
        base = prefix + layer.name
        # a layer on the Keras order (Reshape, Permute) moves its input and output
        # itself: every feature map between modules keeps its channels on axis 1
        fused = cls in KERAS_ORDER
        move_in = fused and len(ins) == 1 and not converted.want and ins[0][1] and len(shapes[0]) >= 3
        move_out = fused and not converted.moved and out_rank >= 3 and self.prefer_moved
        reuse_key = (id(layer), converted.want, move_in, move_out)
        if reuse_key in self._reuse:                                   # a shared layer: the same modules
            parts = self._reuse[reuse_key]
        elif move_in or move_out:                                      # Reshape, Permute: one part, no weights
            (_, inner), = converted.parts
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


def convert_keras(model, default_format: str = "channels_last") -> tuple[nn.Module | None, list[str]]:
    """``model`` as native torch modules fed ``[B, C, *S]`` (None when it cannot be), and the layers
    that could not be converted (``"name (Class: why)"``)."""
    layout = input_layout(model, default_format)
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


