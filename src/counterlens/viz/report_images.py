"""Small PNGs for the HTML report, encoded with Pillow at the image's own resolution (no matplotlib).

The report layers an attribution map over its image in the browser, so the opacity can be
changed there: the grey image is one PNG, the map another with transparency. A map is stored as
an 8-bit palette PNG: its values, clipped at the ``100 - clip_percentile`` percentile of
``|map|`` (the same rule as :func:`counterlens.viz.plots.map_scale`), are quantised to 256 levels;
each level has the colour of the map's colour scale and an alpha proportional to ``|value|``, so
unimportant regions show the image. Signed maps use the diverging scale centred on zero, unless
a colour map is named; ``absolute`` shows ``|map|`` (see :class:`counterlens.viz.plots.OverlayStyle`).
The map's overall opacity (``alpha``) is the page's: a CSS opacity that the reader can change.

``max_side``: images larger than that (pixels a side) are area-averaged down first; the report
shows them 200 px wide, so a gallery of 512 x 512 scans does not carry 512 x 512 PNGs (the
colour scale of a map is still taken from the full-resolution map).
"""
from __future__ import annotations

import base64
import functools
import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .plots import OverlayStyle, display_image, display_map

DIFF_CMAP = "RdBu_r"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _encode(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, **kwargs)
    return buf.getvalue()


def shrink(a: np.ndarray, max_side: int | None) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` float, area-averaged to at most ``max_side`` pixels a side."""
    if max_side is None or max(a.shape[:2]) <= max_side:
        return a
    scale = max_side / max(a.shape[:2])
    size = (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale)))
    planes = [a] if a.ndim == 2 else [a[..., c] for c in range(a.shape[2])]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32), mode="F").resize(size, Image.BOX))
           for p in planes]
    return out[0] if a.ndim == 2 else np.stack(out, axis=-1)


def grey_png(image, value_range=None, max_side: int | None = None) -> bytes:
    """``[C, *spatial]`` in data space -> PNG, higher values brighter, ``value_range`` black to white
    (default: the image's own range). RGB images stay RGB; volumes show their middle slice."""
    shown = np.round(np.clip(shrink(display_image(image, value_range), max_side), 0, 1) * 255).astype(np.uint8)
    return _encode(Image.fromarray(np.ascontiguousarray(shown)))   # [H, W] -> "L", [H, W, 3] -> "RGB"


def _indexed(levels: np.ndarray) -> Image.Image:
    levels = np.ascontiguousarray(levels, dtype=np.uint8)
    return Image.frombytes("P", (levels.shape[1], levels.shape[0]), levels.tobytes())


@functools.lru_cache(maxsize=8)
def _palette(cmap_name: str, signed: bool) -> tuple[bytes, bytes]:
    """Palette (256 RGB triples) and per-level opacity of a map PNG: level ``i`` has the colour
    ``cmap(i / 255)``; opacity grows with the distance from zero (the middle level for signed maps)."""
    rgba = colormaps[cmap_name](np.linspace(0, 1, 256))
    alpha = np.abs(np.linspace(-1, 1, 256)) if signed else np.linspace(0, 1, 256)
    return (bytes(np.round(rgba[:, :3] * 255).astype(np.uint8).reshape(-1)),
            bytes(np.round(alpha * 255).astype(np.uint8)))


def _palette_png(levels: np.ndarray, cmap_name: str, signed: bool) -> bytes:
    palette, alpha = _palette(cmap_name, signed)
    img = _indexed(levels)
    img.putpalette(palette)
    return _encode(img, transparency=alpha)


def map_png(attribution, clip_percentile: float = 0.5, max_side: int | None = None, *, cmap: str | None = None,
            absolute: bool = False) -> tuple[bytes, dict]:
    """An attribution map ``[*spatial]`` as a transparent PNG, and its colour scale
    ``{"vmin", "vmax", "signed", "cmap"}`` (the values at the ends of the colour bar).
    ``cmap``, ``absolute``: see :class:`counterlens.viz.plots.OverlayStyle`."""
    amap = display_map(attribution)
    amap = np.nan_to_num(amap, nan=0.0, posinf=0.0, neginf=0.0)
    amap, vmin, vmax, signed, cmap = OverlayStyle(cmap, absolute=absolute, clip_percentile=clip_percentile).scale(amap)
    amap = shrink(amap, max_side)
    if signed:
        unit = (np.clip(amap, -vmax, vmax) / vmax + 1) / 2          # 0 .. 1, zero at 0.5
    else:
        unit = np.clip(amap, 0, vmax) / vmax
    levels = np.round(unit * 255).astype(np.uint8)
    return _palette_png(levels, cmap, signed), {"vmin": vmin, "vmax": vmax, "signed": signed, "cmap": cmap}


def difference_png(diff, max_side: int | None = None) -> tuple[bytes, float]:
    """A signed difference ``[*spatial]`` (counterfactual - original) as a transparent PNG on a
    symmetric diverging scale (red: brighter, blue: darker), and its limit ``vmax``. Unchanged
    pixels are fully transparent; changed ones at least 15% opaque (as in the counterfactual figure)."""
    d = shrink(np.nan_to_num(display_map(diff).astype(np.float32)), max_side)
    vmax = float(np.abs(d).max()) or 1.0
    levels = np.round((np.clip(d, -vmax, vmax) / vmax + 1) / 2 * 254).astype(np.uint8) + 1   # 1..255
    levels[d == 0] = 0                                                                     # transparent
    palette, alpha = _difference_palette()
    img = _indexed(levels)
    img.putpalette(palette)
    return _encode(img, transparency=alpha), vmax


@functools.lru_cache(maxsize=1)
def _difference_palette() -> tuple[bytes, bytes]:
    """Level 0: unchanged (transparent); levels 1..255: -vmax .. +vmax, at least 15% opaque."""
    alpha = np.concatenate([[0.0], np.clip(0.15 + np.abs(np.linspace(-1, 1, 255)), 0, 1)])
    rgba = colormaps[DIFF_CMAP](np.concatenate([[0.5], np.linspace(0, 1, 255)]))
    return (bytes(np.round(rgba[:, :3] * 255).astype(np.uint8).reshape(-1)),
            bytes(np.round(alpha * 255).astype(np.uint8)))


def css_gradient(cmap_name: str, stops: int = 11) -> str:
    """A CSS ``linear-gradient`` from the top (high values) to the bottom of a colour map."""
    rgba = colormaps[cmap_name](np.linspace(1, 0, stops))
    parts = [f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {100 * i / (stops - 1):.0f}%"
             for i, (r, g, b, _) in enumerate(rgba)]
    return "linear-gradient(to bottom, " + ", ".join(parts) + ")"


def scale_labels(vmin: float, vmax: float, signed: bool) -> list[str]:
    """Three tick labels for a colour bar, top to bottom."""
    return [f"{vmax:+.2g}" if signed else f"{vmax:.2g}", "0" if signed else f"{(vmin + vmax) / 2:.2g}",
            f"{vmin:+.2g}" if signed else f"{vmin:.2g}"]
