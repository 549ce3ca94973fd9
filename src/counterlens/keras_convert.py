"""What the Keras layer converters (:mod:`counterlens.keras_layers`) share: their result
(:class:`Converted`) and refusal (:class:`Unconvertible`), where a Keras axis lands in the torch
tensor (:func:`torch_axis`, :func:`broadcast_in_layout`, :func:`shapes_like`), Keras activations as
torch modules (:data:`ACTIVATIONS`), and reading a layer's weights and config (:func:`weight`, kernel
sizes, ``data_format``, the spatial rank of a class name).

Nothing here imports keras either.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .keras_modules import Exp


class Unconvertible(Exception):
    """This Keras layer (or this use of it) has no native torch equivalent here; says why."""


@dataclass
class Converted:
    parts: list[tuple[str, nn.Module]]   # ("", module) is named after the layer; ("relu", ...) -> layer_relu
    want: bool                           # inputs moved (channels first) or in Keras order
    moved: bool                          # the output's layout


def torch_axis(axis: int, rank: int, moved: bool) -> int:
    """Where Keras axis ``axis`` of a rank-``rank`` tensor is in torch (moved or not)."""
    axis = axis % rank
    if not moved or rank < 3 or axis == 0:
        return axis
    return 1 if axis == rank - 1 else axis + 1


def broadcast_in_layout(value, rank: int, moved: bool, axis: int = -1) -> torch.Tensor:
    """A per-``axis`` vector (or a scalar) as a tensor that broadcasts against the torch tensor."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.dim() == 0:
        return t
    t = t.reshape(-1)
    shape = [1] * rank
    shape[torch_axis(axis, rank, moved)] = t.numel()
    return t.reshape(shape)


ACTIVATIONS: dict[str, Callable[[int], nn.Module | None]] = {
    "linear": lambda dim: None, "relu": lambda dim: nn.ReLU(), "relu6": lambda dim: nn.ReLU6(),
    "sigmoid": lambda dim: nn.Sigmoid(), "softmax": lambda dim: nn.Softmax(dim=dim),
    "log_softmax": lambda dim: nn.LogSoftmax(dim=dim), "tanh": lambda dim: nn.Tanh(),
    "elu": lambda dim: nn.ELU(), "selu": lambda dim: nn.SELU(), "gelu": lambda dim: nn.GELU(),
    "silu": lambda dim: nn.SiLU(), "swish": lambda dim: nn.SiLU(),
    "leaky_relu": lambda dim: nn.LeakyReLU(0.2), "softplus": lambda dim: nn.Softplus(),
    "softsign": lambda dim: nn.Softsign(), "hard_sigmoid": lambda dim: nn.Hardsigmoid(),
    "hard_silu": lambda dim: nn.Hardswish(), "hard_swish": lambda dim: nn.Hardswish(),
    "mish": lambda dim: nn.Mish(), "celu": lambda dim: nn.CELU(), "log_sigmoid": lambda dim: nn.LogSigmoid(),
    "hard_tanh": lambda dim: nn.Hardtanh(), "tanh_shrink": lambda dim: nn.Tanhshrink(),
    "exponential": lambda dim: Exp(),
}


def activation_name(activation) -> str:
    """The Keras name of an ``activation=`` config entry (a string, or a serialized dict)."""
    if activation is None:
        return "linear"
    if isinstance(activation, dict):
        activation = activation.get("config") if activation.get("class_name") == "function" else activation
    if isinstance(activation, str):
        return activation.lower()
    raise Unconvertible(f"custom activation {activation!r}")


def activation_part(activation, rank: int, moved: bool) -> list[tuple[str, nn.Module]]:
    name = activation_name(activation)
    if name not in ACTIVATIONS:
        raise Unconvertible(f"activation {name!r}")
    module = ACTIVATIONS[name](torch_axis(-1, rank, moved))
    return [] if module is None else [(name, module)]


def weight(layer, name: str) -> torch.Tensor | None:
    """The layer's variable ``name`` (``kernel``, ``bias``, ``gamma`` ...) as a float32 tensor, or None."""
    w = getattr(layer, name, None)
    if w is None:
        return None
    w = w.value if isinstance(getattr(w, "value", None), torch.Tensor) else w     # a Keras variable on torch
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu()
    elif hasattr(w, "numpy"):
        w = w.numpy()
    return torch.as_tensor(w, dtype=torch.float32).clone()


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _channels_last(cfg: dict) -> bool:
    data_format = cfg.get("data_format") or "channels_last"
    if data_format not in ("channels_last", "channels_first"):
        raise Unconvertible(f"data_format={data_format!r}")
    return data_format == "channels_last"


def _spatial(class_name: str) -> int:
    return int(class_name.rstrip("D")[-1])


def _set(module: nn.Module, **tensors) -> nn.Module:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(module, name).copy_(value)
    return module


def shapes_like(t: torch.Tensor, rank: int) -> list[int]:
    """``t``'s shape left-padded with ones to ``rank`` axes (a Keras broadcast shape)."""
    return [1] * (rank - t.dim()) + list(t.shape)
