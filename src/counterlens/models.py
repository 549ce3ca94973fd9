"""Reference classifiers: small, well-known CNNs for medical images, every one returning logits.

All factories take the same arguments:

``num_classes``
    Number of logits.
``in_channels``
    Channels of the (preprocessed) input, 1 for grey, 3 for RGB.
``input_size``
    Spatial size: an int (a square 2D image) or a tuple. Its length picks the convolution
    (1D, 2D or 3D), so ``input_size=(64, 64, 64)`` builds the 3D version of the same network.
``width``
    Multiplies every channel count and dense size (rounded, at least 4); ``1.0`` keeps the
    published numbers.

``pneumonia_cnn`` and ``brain_tumor_cnn`` are :class:`PlainCNN`: an ``nn.Sequential`` named
``features`` (the convolutions; its last module is the last spatial one) followed by an
``nn.Sequential`` named ``classifier`` (flatten and dense layers). ReLUs are modules, not in place.

>>> net = build_model("brain-tumor-cnn", num_classes=4, input_size=128)
>>> net(torch.zeros(2, 1, 128, 128)).shape
torch.Size([2, 4])
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import InputError

__all__ = ["ARCHITECTURES", "PlainCNN", "BasicBlock", "SmallResNet", "build_model", "pneumonia_cnn",
           "brain_tumor_cnn", "brain_tumor_cnn3d", "small_resnet",
           "chest_findings_cnn"]


# -- helpers -------------------------------------------------------------------------------------
def _size(input_size, name: str, min_size: int) -> tuple[int, ...]:
    """``input_size`` as a tuple of 1..3 ints, each at least ``min_size``."""
    if isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        try:
            size = tuple(int(s) for s in input_size)
        except TypeError as exc:
            raise InputError(f"{name}: input_size={input_size!r}; pass an int or a tuple such as "
                             "(128, 128)") from exc
    if not 1 <= len(size) <= 3:
        raise InputError(f"{name}: input_size={input_size!r} has {len(size)} axes; pass 1, 2 or 3 spatial sizes")
    if min(size) < min_size:
        raise InputError(f"{name}: input_size={size} is too small; every side must be at least {min_size}")
    return size


def _check(name: str, num_classes: int, in_channels: int, width: float) -> None:
    if int(num_classes) < 1:
        raise InputError(f"{name}: num_classes={num_classes!r}; pass a positive number of classes")
    if int(in_channels) < 1:
        raise InputError(f"{name}: in_channels={in_channels!r}; pass 1 (grey) or 3 (RGB)")
    if not width > 0:
        raise InputError(f"{name}: width={width!r}; pass a positive multiplier such as 1.0 or 0.5")


def _w(channels: int, width: float) -> int:
    """Scaled channel count, rounded, at least 4."""
    return max(4, int(round(channels * width)))


def _conv(ndim: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def _pool(ndim: int):
    return (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[ndim - 1]


def _bn(ndim: int):
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1]


# -- plain CNNs ----------------------------------------------------------------------------------
class PlainCNN(nn.Module):
    """``classifier(features(x))`` with a clear error when the input size does not fit.

    Input ``[B, in_channels, *input_size]``, output logits ``[B, num_classes]``. ``feature_shape``
    is the spatial shape ``features`` must produce for the first dense layer.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential,
                 input_size: Sequence[int], feature_shape: Sequence[int]):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.input_size = [int(s) for s in input_size]  # lists, so TorchScript can compare them
        self.feature_shape = [int(s) for s in feature_shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        if list(z.shape[2:]) != self.feature_shape:
            raise InputError(f"input of spatial size {list(x.shape[2:])} does not fit this network, "
                             f"built for input_size={self.input_size}; resize the images or "
                             f"build the model with that input_size")
        return self.classifier(z)


def _plain_cnn(name: str, blocks: list[list[int]], dense: int, num_classes: int, in_channels: int,
               input_size, width: float) -> PlainCNN:
    """Blocks of 3x3 convs (padding 1, ReLU), a 2x max-pool after each block, then the dense head."""
    _check(name, num_classes, in_channels, width)
    size = _size(input_size, name, 2 ** len(blocks))
    conv, pool = _conv(len(size)), _pool(len(size))
    layers: list[nn.Module] = []
    channels = int(in_channels)
    for block in blocks:
        for out in block:
            layers += [conv(channels, _w(out, width), kernel_size=3, padding=1), nn.ReLU()]
            channels = _w(out, width)
        layers.append(pool(2))
    feature_shape = size
    for _ in blocks:
        feature_shape = tuple(s // 2 for s in feature_shape)
    flat = channels * math.prod(feature_shape)
    hidden = _w(dense, width)
    head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(hidden, int(num_classes)))
    return PlainCNN(nn.Sequential(*layers), head, size, feature_shape)


def pneumonia_cnn(num_classes: int = 2, in_channels: int = 1, input_size=(128, 128),
                  width: float = 1.0) -> PlainCNN:
    """The 3-conv pneumonia CNN of the Kaggle chest X-ray tutorials.

    conv3x3 32 - ReLU - maxpool2, conv 64 - ReLU - maxpool2, conv 128 - ReLU - maxpool2, flatten,
    dense 512 - ReLU - dropout 0.5 - dense ``num_classes``. About 16.9 M parameters at 128x128
    (most in the first dense layer). Input sides must be at least 8.
    """
    return _plain_cnn("pneumonia_cnn", [[32], [64], [128]], 512, num_classes, in_channels, input_size, width)


def brain_tumor_cnn(num_classes: int = 4, in_channels: int = 1, input_size=(128, 128),
                    width: float = 1.0) -> PlainCNN:
    """The brain-tumour MRI CNN (glioma / meningioma / pituitary / no tumour).

    conv 32 - ReLU - conv 64 - ReLU - maxpool2, conv 128 - ReLU - conv 128 - ReLU - maxpool2,
    flatten, dense 64 - ReLU - dropout 0.5 - dense ``num_classes``. About 8.6 M parameters at
    128x128. Input sides must be at least 4.
    """
    return _plain_cnn("brain_tumor_cnn", [[32, 64], [128, 128]], 64, num_classes, in_channels, input_size, width)


def brain_tumor_cnn3d(num_classes: int = 4, in_channels: int = 1, input_size=(32, 32, 32),
                      width: float = 1.0) -> PlainCNN:
    """The reference 3D CNN for MRI volumes (``[B, C, D, H, W]``), light enough for the CPU.

    conv3x3x3 16 - ReLU - maxpool2, conv 32 - ReLU - maxpool2, conv 64 - ReLU (``features``, the
    last spatial module at 1/4 of the input side, where CAM methods look), then global average pool,
    dense 64 - ReLU - dropout 0.3 - dense ``num_classes``. About 80 k parameters at any size; about
    0.1 GFLOP a 32^3 volume. ``input_size``: an int (a cube) or (D, H, W); sides at least 4.
    """
    _check("brain_tumor_cnn3d", num_classes, in_channels, width)
    size = (int(input_size),) * 3 if isinstance(input_size, int) else _size(input_size, "brain_tumor_cnn3d", 4)
    if len(size) != 3 or min(size) < 4:
        raise InputError(f"brain_tumor_cnn3d: input_size={input_size!r}; pass an int or (D, H, W), each at least 4")
    c1, c2, c3, hidden = _w(16, width), _w(32, width), _w(64, width), _w(64, width)
    features = nn.Sequential(
        nn.Conv3d(int(in_channels), c1, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(c2, c3, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(c3, hidden), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(hidden, int(num_classes)))
    return PlainCNN(features, head, size, tuple(s // 4 for s in size))


def chest_findings_cnn(num_classes: int = 3, in_channels: int = 1, input_size=(64, 64),
                       width: float = 1.0) -> PlainCNN:
    """The reference multi-label chest CNN: one logit per finding (train it with a sigmoid per
    finding, ``BCEWithLogits``; load it with ``output="multilabel"``), as CheXNet on a small scale.

    conv3x3 16 - ReLU - maxpool2, conv 32 - ReLU - maxpool2, conv 64 - ReLU - conv 64 - ReLU
    (``features``, at 1/4 of the input side, where CAM methods look), global average pool,
    dropout 0.2, dense ``num_classes``: each finding's logit is a spatial average of evidence, so
    its maps point at the finding. About 65 k parameters at any size (2D; 1D or 3D by
    ``input_size``); sides at least 4.
    """
    _check("chest_findings_cnn", num_classes, in_channels, width)
    size = _size(input_size, "chest_findings_cnn", 4)
    conv, pool = _conv(len(size)), _pool(len(size))
    c1, c2, c3 = _w(16, width), _w(32, width), _w(64, width)
    features = nn.Sequential(conv(int(in_channels), c1, 3, padding=1), nn.ReLU(), pool(2),
                             conv(c1, c2, 3, padding=1), nn.ReLU(), pool(2),
                             conv(c2, c3, 3, padding=1), nn.ReLU(), conv(c3, c3, 3, padding=1), nn.ReLU())
    gap = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[len(size) - 1](1)
    head = nn.Sequential(gap, nn.Flatten(), nn.Dropout(0.2), nn.Linear(c3, int(num_classes)))
    return PlainCNN(features, head, size, tuple(s // 4 for s in size))


# -- small ResNet --------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, ndim: int = 2):
        super().__init__()
        conv, bn = _conv(ndim), _bn(ndim)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=False),
                                          bn(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem (conv3x3 16 - BN - ReLU), stages ``layer1..3`` (16, 32/2, 64/2), global average pool,
    ``fc``. Input ``[B, in_channels, *spatial]`` of any size, output logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int, in_channels: int, ndim: int, width: float):
        super().__init__()
        c1, c2, c3 = _w(16, width), _w(32, width), _w(64, width)
        self.stem = nn.Sequential(_conv(ndim)(in_channels, c1, 3, padding=1, bias=False), _bn(ndim)(c1), nn.ReLU())
        self.layer1 = BasicBlock(c1, c1, 1, ndim)
        self.layer2 = BasicBlock(c1, c2, 2, ndim)
        self.layer3 = BasicBlock(c2, c3, 2, ndim)
        self.pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[ndim - 1](1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(z), 1))


def small_resnet(num_classes: int = 2, in_channels: int = 1, input_size=(128, 128),
                 width: float = 1.0) -> SmallResNet:
    """A small ResNet with BatchNorm (about 78 k parameters at width 1).

    Fully convolutional up to the global average pool, so it runs at any input size of at least
    16 per side; ``input_size`` only sets the number of spatial axes (and is checked).
    """
    _check("small_resnet", num_classes, in_channels, width)
    size = _size(input_size, "small_resnet", 16)
    return SmallResNet(int(num_classes), int(in_channels), len(size), width)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "pneumonia-cnn": pneumonia_cnn,
    "brain-tumor-cnn": brain_tumor_cnn,
    "brain-tumor-cnn3d": brain_tumor_cnn3d,
    "small-resnet": small_resnet,
    "chest-findings-cnn": chest_findings_cnn,
}


#: Architectures that take volumes ``[B, C, D, H, W]`` only (``counterlens train`` reads 3-D data for them).
VOLUME_ARCHITECTURES = ("brain-tumor-cnn3d",)


def architecture_name(name: str) -> str:
    """The key of :data:`ARCHITECTURES` for ``name`` (``Small_ResNet`` -> ``small-resnet``)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in ARCHITECTURES:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return key


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the reference architecture ``name`` (a key of :data:`ARCHITECTURES`) with ``kwargs``."""
    key = architecture_name(name)
    factory = ARCHITECTURES[key]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise InputError(f"architecture {key!r}: {exc}; it takes "
                         f"{', '.join(inspect.signature(factory).parameters)}") from exc
    return factory(**kwargs)
