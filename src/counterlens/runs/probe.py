"""What a model takes, found by running it: one random image of a given shape through the classifier
(:func:`try_shape`), the channels its error names, the input an exported program declares, its first
convolution, and the spatial size a fixed-input model (Flatten + Linear) takes. Used by
:mod:`counterlens.runs.diagnose` before the first image of a run."""
from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import CounterlensError

__all__ = ["try_shape", "said", "channels_in", "declared_input", "first_conv", "find_size"]

_COMMON_SIDES = (28, 32, 48, 64, 96, 112, 128, 160, 192, 224, 227, 256, 299, 320, 384, 448, 512)


def said(exc: BaseException) -> str:
    """The line of an error that says what went wrong (TorchScript puts it after its own traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^\w*(Error|Exception): ", ln):
            return ln.split(": ", 1)[1]
    return lines[0] if lines else type(exc).__name__


def try_shape(clf, channels: int, shape) -> str | None:
    """None when the model runs on one random image ``[1, channels, *shape]``, else what it said."""
    lo, hi = clf.value_range or (0.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, int(channels), *shape), generator=gen) * (hi - lo) + lo
    try:
        with torch.no_grad():
            clf.logits(x)
    except CounterlensError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on a shape it does not take
        return str(exc)
    return None


def channels_in(error: str) -> int | None:
    """The channels a model's error says it expects (eager conv, TorchScript, torch.export guard)."""
    for pattern in (r"to have (\d+) channels", r"size\(\)\[1\] == (\d+)", r"shape\[1\] to be equal to (\d+)"):
        m = re.search(pattern, error)
        if m:
            return int(m.group(1))
    return None


def declared_input(module) -> tuple[int | None, tuple[int, ...] | None]:
    """``(channels, size)`` fixed by an exported program's input (None where it is dynamic or unknown)."""
    graph = getattr(getattr(module, "program", None), "graph", None)
    for node in getattr(graph, "nodes", ()):
        shape = getattr(node.meta.get("val"), "shape", None) if node.op == "placeholder" else None
        if shape is not None and len(shape) >= 3:
            dims = [d if isinstance(d, int) else None for d in shape]
            return dims[1], (tuple(dims[2:]) if None not in dims[2:] else None)
    return None, None


def first_conv(module) -> tuple[int | None, int | None]:
    """``(input channels, spatial dims)`` of the first convolution (eager or TorchScript); Nones when
    a Linear or an embedding comes first or nothing is found."""
    for _, sub in module.named_modules() if isinstance(module, torch.nn.Module) else ():
        kind = getattr(sub, "original_name", None) or type(sub).__name__
        if kind in ("Conv1d", "Conv2d", "Conv3d"):
            weight, groups = getattr(sub, "weight", None), getattr(sub, "groups", 1)
            if isinstance(weight, torch.Tensor) and weight.dim() >= 3:
                return int(weight.shape[1]) * (groups if isinstance(groups, int) else 1), weight.dim() - 2
            return None, None
        if kind in ("Linear", "Embedding", "MultiheadAttention"):
            return None, None
    return None, None


def find_size(clf, channels: int, shape, error: str | None) -> tuple[int, ...] | None:
    """A spatial size the model takes, near what its Linear layer's in_features imply (square, then
    with the data's aspect), else a common square size; None when none is found. Of several that work (pooling floors sizes), the
    one divisible by the highest power of two."""
    est = list(shape)
    m = re.search(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)", error or "")
    if m and int(m.group(2)) > 0:
        scale = (int(m.group(3)) / int(m.group(2))) ** (1 / len(shape))
        est = [max(1, round(s * scale)) for s in shape]
    side = round(float(np.mean(est)))
    near = [(s,) * len(shape) for s in range(max(1, side - 8), side + 9)]
    works = [s for s in near if try_shape(clf, channels, s) is None]
    if works:
        return max(works, key=lambda s: ((s[0] & -s[0]), -abs(s[0] - side)))
    kept = [tuple(max(q, round(e / q) * q) for e in est) for q in (32, 16, 8, 4)] + [tuple(est)]   # the data's aspect
    for s in dict.fromkeys(kept):
        if len(set(s)) > 1 and try_shape(clf, channels, s) is None:
            return s
    for s in sorted(_COMMON_SIDES, key=lambda v: abs(v - side)):
        if try_shape(clf, channels, (s,) * len(shape)) is None:
            return (s,) * len(shape)
    return None
