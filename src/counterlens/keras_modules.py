"""The torch modules a converted Keras model is made of, beyond torch's own (``nn.Conv2d``,
``nn.ReLU`` ...): Keras' ``padding="same"``, global pooling, merges, reshapes in Keras order."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoveChannels(nn.Module):
    """Keras order ``[B, *S, C]`` <-> torch order ``[B, C, *S]`` (``to_front``: the former to the latter)."""

    def __init__(self, to_front: bool):
        super().__init__()
        self.to_front = to_front

    def forward(self, x):
        return x.movedim(-1, 1) if self.to_front else x.movedim(1, -1)


class SamePad(nn.Module):
    """Keras/TensorFlow ``padding="same"``: ``max((ceil(n/s) - 1) s + k_eff - n, 0)`` per spatial
    axis, the odd one after; worked out from each input's size (any stride, any size)."""

    def __init__(self, kernel, strides, dilation, value: float = 0.0):
        super().__init__()
        self.kernel, self.strides, self.dilation, self.value = tuple(kernel), tuple(strides), tuple(dilation), value

    def pads(self, x) -> list[int]:
        """``F.pad``'s list (last axis first): before, after, ..."""
        pads = []
        for i in reversed(range(len(self.kernel))):
            n, s = x.shape[2 + i], self.strides[i]
            total = max((math.ceil(n / s) - 1) * s + (self.kernel[i] - 1) * self.dilation[i] + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return pads

    def forward(self, x):
        pads = self.pads(x)
        return F.pad(x, pads, value=self.value) if any(pads) else x


class AvgPoolSame(nn.Module):
    """Average pooling with ``padding="same"`` as Keras' torch backend does it: with the same padding
    on both sides of every axis, padded positions are left out of each mean; otherwise the edge
    values are repeated into the padding (``mode="replicate"``) and every mean has a full window."""

    def __init__(self, pool: nn.Module, pad: SamePad):
        super().__init__()
        self.pool, self.pad = pool, pad

    def forward(self, x):
        pads = self.pad.pads(x)
        if any(a != b for a, b in zip(pads[::2], pads[1::2])):
            return self.pool(F.pad(x, pads, mode="replicate"))
        ones = torch.ones_like(x[:1, :1])
        return self.pool(self.pad(x)) / self.pool(self.pad(ones))


class GlobalPool(nn.Module):
    def __init__(self, mode: str, keepdims: bool):
        super().__init__()
        self.mode, self.keepdims = mode, keepdims

    def forward(self, x):
        dims = tuple(range(2, x.dim()))
        if self.mode == "max":
            return x.amax(dim=dims, keepdim=self.keepdims)
        return x.mean(dim=dims, keepdim=self.keepdims)


class Affine(nn.Module):
    """``(x - shift) * scale + offset`` with tensors broadcast in the torch layout (Rescaling, Normalization)."""

    def __init__(self, scale, shift=0.0, offset=0.0):
        super().__init__()
        for name, value in (("scale", scale), ("shift", shift), ("offset", offset)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x):
        return (x - self.shift) * self.scale + self.offset


class ChannelNorm(nn.Module):
    """BatchNormalization (inference: moving statistics) on an axis other than torch's channel axis."""

    def __init__(self, mean, var, weight, bias, eps: float):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("var", var)
        self.weight, self.bias, self.eps = nn.Parameter(weight), nn.Parameter(bias), eps

    def forward(self, x):
        return (x - self.mean) * torch.rsqrt(self.var + self.eps) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Keras LayerNormalization over any set of axes (mean and biased variance over ``dims``)."""

    def __init__(self, dims, weight, bias, eps: float):
        super().__init__()
        self.dims, self.eps = tuple(dims), eps
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        mean = x.mean(dim=self.dims, keepdim=True)
        var = x.var(dim=self.dims, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class KerasReLU(nn.Module):
    """Keras ReLU with ``threshold``, ``negative_slope`` or a ``max_value`` other than 6."""

    def __init__(self, max_value, negative_slope: float, threshold: float):
        super().__init__()
        self.max_value, self.negative_slope, self.threshold = max_value, negative_slope, threshold

    def forward(self, x):
        y = torch.where(x >= self.threshold, x, self.negative_slope * (x - self.threshold))
        return y.clamp(max=self.max_value) if self.max_value is not None else y


class PReLU(nn.Module):
    def __init__(self, alpha):
        super().__init__()
        self.alpha = nn.Parameter(alpha)

    def forward(self, x):
        return F.relu(x) - self.alpha * F.relu(-x)


class Merge(nn.Module):
    """Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate of several inputs."""

    def __init__(self, op: str, dim: int = 1):
        super().__init__()
        self.op, self.dim = op, dim

    def forward(self, *xs):
        if self.op == "concatenate":
            return torch.cat(xs, dim=self.dim)
        out = xs[0]
        for x in xs[1:]:
            out = {"add": torch.add, "average": torch.add, "subtract": torch.sub, "multiply": torch.mul,
                   "maximum": torch.maximum, "minimum": torch.minimum}[self.op](out, x)
        return out / len(xs) if self.op == "average" else out


class Reshape(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x):
        return x.permute(0, *self.dims)


class FlattenKerasOrder(nn.Module):
    """``[B, C, *S]`` flattened in Keras' ``[B, *S, C]`` order (a channels-last Flatten fed a moved
    tensor, or Keras' Flatten(data_format="channels_first"), which flattens channels last too)."""

    def forward(self, x):
        return x.movedim(1, -1).flatten(1)


class InKerasOrder(nn.Module):
    """Runs a parameter-free ``layer`` (Reshape, Permute) on the Keras order of a moved tensor and
    gives its output back moved, so every feature map between modules has its channels on axis 1
    (a CAM hooked at any module reads it right). ``layer`` is not a submodule: nothing can hook its
    Keras-order output."""

    def __init__(self, layer: nn.Module, move_in: bool, move_out: bool):
        super().__init__()
        if any(True for _ in layer.parameters()) or any(True for _ in layer.buffers()):
            raise ValueError(f"InKerasOrder takes parameter-free layers, not {type(layer).__name__}")
        self.__dict__["layer"] = layer
        self.move_in, self.move_out = move_in, move_out

    def forward(self, x):
        y = self.layer(x.movedim(1, -1) if self.move_in else x)
        return y.movedim(-1, 1) if self.move_out and y.dim() >= 3 else y


class ChannelLinear(nn.Linear):
    """Keras Dense on a channels-last feature map, held channels-first: a linear map of the channels
    at every position (a 1x1 convolution), ``[B, C, *S] -> [B, units, *S]``."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class Crop(nn.Module):
    def __init__(self, cropping):
        super().__init__()
        self.cropping = tuple(tuple(c) for c in cropping)

    def forward(self, x):
        index = [slice(None), slice(None)]
        index += [slice(a, x.shape[2 + i] - b) for i, (a, b) in enumerate(self.cropping)]
        return x[tuple(index)]


class Resize(nn.Module):
    """Keras Resizing / UpSampling2D(interpolation=...) on the torch backend: ``F.interpolate`` to
    ``size``, or to the input's size times ``factor``."""

    MODES = {"bilinear": "bilinear", "nearest": "nearest-exact", "bicubic": "bicubic"}

    def __init__(self, interpolation: str, size=None, factor=None, antialias: bool = False):
        super().__init__()
        self.mode, self.antialias = self.MODES[interpolation], bool(antialias)
        self.size, self.factor = (tuple(size) if size else None), (tuple(factor) if factor else None)

    def forward(self, x):
        size = self.size or tuple(n * f for n, f in zip(x.shape[2:], self.factor))
        corners = False if self.mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=size, mode=self.mode, align_corners=corners,
                             antialias=self.antialias and self.mode in ("bilinear", "bicubic"))


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


