"""Keras layers as native torch modules: one converter per Keras layer class.

A converter gets the Keras layer, the Keras shapes of its inputs (batch axis included, as Keras
sees them) and, per input, its *layout* in torch: ``moved`` when the torch tensor holds the Keras
tensor with its last axis moved to position 1 (a channels-last ``[B, H, W, C]`` image held as
``[B, C, H, W]``), plain otherwise. It returns :class:`Converted`: the modules to run in order
(named ``layer`` or ``layer_<part>``), the layout they want their inputs in and the layout of their
output. Keras layers with ``data_format="channels_last"`` (the default) run as native NCHW torch
layers on moved tensors; Flatten, Reshape and Permute get the Keras order.

Nothing here imports keras: layers are read through their ``get_config()`` and weights. What the
converters share (:class:`Converted`, :class:`Unconvertible`, the axis and layout helpers, the
activations, reading weights and config) is in :mod:`counterlens.keras_convert`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .keras_convert import ACTIVATIONS, Converted, Unconvertible, activation_name  # noqa: F401  (re-exported)
from .keras_convert import (_channels_last, _set, _spatial, _tuple, activation_part, broadcast_in_layout, shapes_like,
                            torch_axis, weight)
from .keras_modules import (Affine, AvgPoolSame, ChannelLinear, ChannelNorm, Crop, FlattenKerasOrder, GlobalPool, KerasReLU,
                            LayerNorm, Merge, Permute, PReLU, Reshape, Resize, SamePad)

CONVERTERS: dict[str, Callable] = {}


def converts(*class_names: str):
    def register(fn):
        for name in class_names:
            CONVERTERS[name] = fn
        return fn
    return register


def _same_or_valid(cfg: dict, k, s, d, causal_ok: bool = False):
    """``(padding for the torch layer, a padding module or None)`` of a Keras ``padding=``."""
    padding = cfg.get("padding", "valid")
    if padding == "valid":
        return 0, None
    if padding == "causal" and causal_ok:
        return 0, nn.ConstantPad1d(((k[0] - 1) * d[0], 0), 0.0)
    if padding != "same":
        raise Unconvertible(f"padding={padding!r}")
    totals = [(k[i] - 1) * d[i] for i in range(len(k))]
    if all(si == 1 for si in s) and all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals), None           # symmetric: the torch layer pads itself
    return 0, SamePad(k, s, d)


# -- converters ---------------------------------------------------------------------------------
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@converts("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D")
def _conv(layer, cfg, shapes, moved):
    cls, last, rank = type(layer).__name__, _channels_last(cfg), len(shapes[0])
    n = _spatial(cls)
    c_in = shapes[0][-1] if last else shapes[0][1]
    k, s, d = _tuple(cfg["kernel_size"], n), _tuple(cfg["strides"], n), _tuple(cfg["dilation_rate"], n)
    if not isinstance(c_in, int):
        raise Unconvertible("input channels unknown")
    pad, pad_module = _same_or_valid(cfg, k, s, d, causal_ok=(n == 1))
    parts = [("pad", pad_module)] if pad_module is not None else []
    bias = weight(layer, "bias") if cfg.get("use_bias", True) else None
    Conv = _CONVS[n]
    if cls.startswith("Conv"):
        w = weight(layer, "kernel")                               # (*k, in / groups, out)
        w = w.permute(n + 1, n, *range(n))
        conv = Conv(c_in, w.shape[0], k, s, pad, d, groups=int(cfg.get("groups", 1)), bias=bias is not None)
        parts.append(("", _set(conv, weight=w, bias=bias)))
    else:
        mult = int(cfg["depth_multiplier"])
        dw = weight(layer, "kernel" if cls.startswith("Depthwise") else "depthwise_kernel")   # (*k, in, mult)
        dw = dw.reshape(*k, c_in * mult).permute(n, *range(n)).unsqueeze(1)
        if cls.startswith("Depthwise"):
            conv = Conv(c_in, c_in * mult, k, s, pad, d, groups=c_in, bias=bias is not None)
            parts.append(("", _set(conv, weight=dw, bias=bias)))
        else:
            pw = weight(layer, "pointwise_kernel")                # (1, ..., in * mult, out)
            pw = pw.reshape(c_in * mult, -1).t().reshape(-1, c_in * mult, *([1] * n))
            parts.append(("depthwise", _set(Conv(c_in, c_in * mult, k, s, pad, d, groups=c_in, bias=False), weight=dw)))
            parts.append(("", _set(Conv(c_in * mult, pw.shape[0], 1, bias=bias is not None), weight=pw, bias=bias)))
    parts += activation_part(cfg.get("activation"), rank, last)
    return Converted(parts, last, last)


@converts(*(f"{kind}Pooling{n}D" for kind in ("Max", "Average") for n in (1, 2, 3)))
def _pool(layer, cfg, shapes, moved):
    cls, last = type(layer).__name__, _channels_last(cfg)
    n, is_max = _spatial(cls), cls.startswith("Max")
    k = _tuple(cfg["pool_size"], n)
    s = _tuple(cfg.get("strides") or k, n)
    pool = {1: (nn.MaxPool1d, nn.AvgPool1d), 2: (nn.MaxPool2d, nn.AvgPool2d),
            3: (nn.MaxPool3d, nn.AvgPool3d)}[n][0 if is_max else 1](k, s)
    if cfg.get("padding", "valid") == "valid":
        return Converted([("", pool)], last, last)
    if cfg["padding"] != "same":
        raise Unconvertible(f"padding={cfg['padding']!r}")
    pad = SamePad(k, s, (1,) * n, value=-math.inf if is_max else 0.0)
    parts = [("pad", pad), ("", pool)] if is_max else [("", AvgPoolSame(pool, pad))]
    return Converted(parts, last, last)


@converts(*(f"Global{kind}Pooling{n}D" for kind in ("Max", "Average") for n in (1, 2, 3)))
def _global_pool(layer, cfg, shapes, moved):
    last, keep = _channels_last(cfg), bool(cfg.get("keepdims", False))
    mode = "max" if type(layer).__name__.startswith("GlobalMax") else "mean"
    return Converted([("", GlobalPool(mode, keep))], last, last and keep)


@converts("BatchNormalization")
def _batchnorm(layer, cfg, shapes, moved):
    rank, m = len(shapes[0]), moved[0]
    axis = cfg["axis"]
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise Unconvertible(f"axis={axis}")
        axis = axis[0]
    ta = torch_axis(axis, rank, m)
    mean, var = weight(layer, "moving_mean"), weight(layer, "moving_variance")
    gamma = weight(layer, "gamma") if cfg.get("scale", True) else torch.ones_like(mean)
    beta = weight(layer, "beta") if cfg.get("center", True) else torch.zeros_like(mean)
    eps = float(cfg["epsilon"])
    if ta == 1 and 2 <= rank <= 5:
        bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank](mean.numel(), eps=eps)
        module = _set(bn, running_mean=mean, running_var=var, weight=gamma, bias=beta)
    else:
        shape = [1] * rank
        shape[ta] = -1
        module = ChannelNorm(*(t.reshape(shape) for t in (mean, var, gamma, beta)), eps)
    return Converted([("", module)], m, m)


@converts("LayerNormalization")
def _layernorm(layer, cfg, shapes, moved):
    if cfg.get("rms_scaling"):
        raise Unconvertible("rms_scaling=True")
    rank, m = len(shapes[0]), moved[0]
    axes = cfg["axis"] if isinstance(cfg["axis"], (list, tuple)) else [cfg["axis"]]
    axes = sorted(a % rank for a in axes)
    shape = [1] * rank
    for a in axes:
        shape[a] = shapes[0][a]
    ones = torch.ones([s for s in shape])
    gamma = weight(layer, "gamma").reshape(shape) if cfg.get("scale", True) else ones
    beta = weight(layer, "beta").reshape(shape) if cfg.get("center", True) else torch.zeros_like(ones)
    if m and rank >= 3:
        gamma, beta = gamma.movedim(-1, 1), beta.movedim(-1, 1)
    dims = [torch_axis(a, rank, m) for a in axes]
    return Converted([("", LayerNorm(dims, gamma, beta, float(cfg["epsilon"])))], m, m)


@converts("Dense")
def _dense(layer, cfg, shapes, moved):
    if getattr(layer, "quantization_mode", None):
        raise Unconvertible(f"quantized ({layer.quantization_mode})")
    kernel, bias = weight(layer, "kernel"), weight(layer, "bias") if cfg.get("use_bias", True) else None
    rank, on_map = len(shapes[0]), moved[0] and len(shapes[0]) >= 3      # Dense on a channels-last feature map
    linear = _set((ChannelLinear if on_map else nn.Linear)(kernel.shape[0], kernel.shape[1], bias=bias is not None),
                  weight=kernel.t(), bias=bias)
    return Converted([("", linear)] + activation_part(cfg.get("activation"), rank, on_map), on_map, on_map)


@converts("Flatten")
def _flatten(layer, cfg, shapes, moved):
    rank = len(shapes[0])
    want = False if not _channels_last(cfg) else moved[0]
    keras_order = rank > 2 and (want or not _channels_last(cfg))
    return Converted([("", FlattenKerasOrder() if keras_order else nn.Flatten(1))], want, False)


@converts("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "PReLU")
def _activation(layer, cfg, shapes, moved):
    cls, rank, m = type(layer).__name__, len(shapes[0]), moved[0]
    if cls == "Activation":
        parts = activation_part(cfg["activation"], rank, m)
        module = parts[0][1] if parts else nn.Identity()
    elif cls == "ReLU":
        top, slope, threshold = cfg.get("max_value"), float(cfg.get("negative_slope") or 0), float(cfg.get("threshold") or 0)
        if slope == 0 and threshold == 0 and top is None:
            module = nn.ReLU()
        elif slope == 0 and threshold == 0 and float(top) == 6.0:
            module = nn.ReLU6()
        else:
            module = KerasReLU(None if top is None else float(top), slope, threshold)
    elif cls == "LeakyReLU":
        module = nn.LeakyReLU(float(cfg["negative_slope"]))
    elif cls == "ELU":
        module = nn.ELU(float(cfg.get("alpha", 1.0)))
    elif cls == "Softmax":
        axis = cfg.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise Unconvertible(f"axis={axis}")
            axis = axis[0]
        module = nn.Softmax(dim=torch_axis(axis, rank, m))
    else:
        alpha = weight(layer, "alpha").unsqueeze(0)
        module = PReLU(alpha.movedim(-1, 1) if m and rank >= 3 else alpha)
    return Converted([("", module)], m, m)


_IDENTITY = ("GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
             "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness")


@converts("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", *_IDENTITY)
def _dropout(layer, cfg, shapes, moved):
    cls, m = type(layer).__name__, moved[0]
    if cls == "Dropout":
        return Converted([("", nn.Dropout(float(cfg["rate"])))], m, m)
    if cls.startswith("SpatialDropout"):
        last = _channels_last(cfg)
        module = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}[_spatial(cls)](float(cfg["rate"]))
        return Converted([("", module)], last, last)
    return Converted([("", nn.Identity())], m, m)              # identity at inference


def _pairs(value, n: int) -> list[tuple[int, int]]:
    if isinstance(value, int):
        return [(value, value)] * n
    return [tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v)) for v in value] \
        if n > 1 else [tuple(value) if isinstance(value, (tuple, list)) else (value, value)]


@converts("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D")
def _pad_crop(layer, cfg, shapes, moved):
    cls, last = type(layer).__name__, _channels_last(cfg)
    n = _spatial(cls)
    if cls.startswith("ZeroPadding"):
        pads = [p for pair in reversed(_pairs(cfg["padding"], n)) for p in pair]
        module = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}[n](tuple(pads), 0.0)
    else:
        module = Crop(_pairs(cfg["cropping"], n))
    return Converted([("", module)], last, last)


@converts("UpSampling1D", "UpSampling2D", "UpSampling3D")
def _upsample(layer, cfg, shapes, moved):
    cls, last = type(layer).__name__, _channels_last(cfg)
    size, interpolation = _tuple(cfg["size"], _spatial(cls)), cfg.get("interpolation", "nearest")
    if interpolation == "nearest":                        # Keras repeats each value
        return Converted([("", nn.Upsample(scale_factor=tuple(float(v) for v in size), mode="nearest"))], last, last)
    if cls != "UpSampling2D" or interpolation not in Resize.MODES:
        raise Unconvertible(f"interpolation={interpolation!r}")
    return Converted([("", Resize(interpolation, factor=size))], last, last)


@converts("Resizing")
def _resizing(layer, cfg, shapes, moved):
    last = _channels_last(cfg)
    if cfg.get("crop_to_aspect_ratio") or cfg.get("pad_to_aspect_ratio") or cfg["interpolation"] not in Resize.MODES:
        raise Unconvertible("crop_to_aspect_ratio / pad_to_aspect_ratio / interpolation "
                            f"{cfg['interpolation']!r}")
    module = Resize(cfg["interpolation"], size=(cfg["height"], cfg["width"]), antialias=cfg.get("antialias", False))
    return Converted([("", module)], last, last)


@converts("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate")
def _merge(layer, cfg, shapes, moved):
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise Unconvertible(f"inputs of different ranks {sorted(ranks)}")
    m = moved[0]
    op = type(layer).__name__.lower()
    dim = torch_axis(int(cfg.get("axis", -1)), len(shapes[0]), m) if op == "concatenate" else 1
    return Converted([("", Merge(op, dim))], m, m)


@converts("LayerScale")                               # keras.applications.convnext: x * gamma (per channel)
def _layer_scale(layer, cfg, shapes, moved):
    rank, m = len(shapes[0]), moved[0]
    return Converted([("", Affine(broadcast_in_layout(weight(layer, "gamma"), rank, m)))], m, m)


@converts("Rescaling", "Normalization")
def _rescale(layer, cfg, shapes, moved):
    rank, m = len(shapes[0]), moved[0]
    if type(layer).__name__ == "Rescaling":
        scale = broadcast_in_layout(cfg["scale"], rank, m)
        module = Affine(scale, 0.0, broadcast_in_layout(cfg.get("offset", 0.0), rank, m))
    else:
        if cfg.get("invert"):
            raise Unconvertible("invert=True")
        mean, var = weight(layer, "mean"), weight(layer, "variance")
        if mean is None or var is None:
            raise Unconvertible("not adapted (no mean / variance)")
        mean, var = mean.reshape(shapes_like(mean, rank)), var.reshape(shapes_like(var, rank))
        if m and rank >= 3:
            mean, var = mean.movedim(-1, 1), var.movedim(-1, 1)
        module = Affine(1.0 / var.sqrt().clamp(min=1e-7), mean, 0.0)
    return Converted([("", module)], m, m)


@converts("Reshape", "Permute")
def _reshape(layer, cfg, shapes, moved):
    if type(layer).__name__ == "Reshape":
        return Converted([("", Reshape(cfg["target_shape"]))], False, False)
    return Converted([("", Permute(cfg["dims"]))], False, False)
