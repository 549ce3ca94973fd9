"""Data-space preprocessing inside a :class:`~counterlens.model.Classifier`: normalisation and grey
to RGB, with a portable JSON form (stored in model cards and ``run.yaml``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InputError


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
