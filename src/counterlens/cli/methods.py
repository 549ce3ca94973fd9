"""``counterlens methods``: every attribution method, a one-line summary and its parameters."""
from __future__ import annotations

from ..attribution.base import METHODS


def methods(args) -> int:
    width = max(len(n) for n in METHODS)
    for name, info in sorted(METHODS.items()):
        print(f"{name:<{width}}  {info.summary}")
        defaults = ", ".join(f"{k}={v!r}" for k, v in info.defaults().items())
        print(f"{'':<{width}}  parameters: {defaults}")
    return 0
