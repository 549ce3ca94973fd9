"""Rendering the report's pages: the one Jinja2 environment (autoescaping everything), the
script and style every page shares, its CSP hash, and writing a page piece by piece."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import jinja2
from markupsafe import Markup

from .report_data import fmt
from .plots import OverlayStyle
from .report_images import DIFF_CMAP, css_gradient

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("counterlens.viz", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined)
_ENV.filters["fmt"] = fmt
_ENV.filters["n"] = lambda v: f"{int(v):,}"          # 100,000


def _static(name: str) -> str:
    return (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")


def csp_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


def page_assets(overlay: OverlayStyle = OverlayStyle()) -> dict:
    """What every page of a report shares: the script, its CSP hash, the style sheet, colour scales,
    and how maps are shown (``overlay``: its colour maps for the maps' colour bars, its ``alpha``
    for the opacity sliders' start; ``signed``/``positive``: the counterfactual difference scale)."""
    script = _static("report.js") + "\n" + _static("slice_viewer.js")      # the viewer of 3-D cases
    if "</script" in script.lower():
        raise RuntimeError("report.js must not contain a closing script tag")
    return {"script": Markup(script), "script_hash": Markup(csp_hash(script)), "css": Markup(_static("report.css") + _static("slice_viewer.css")),
            "gradients": {"signed": css_gradient(DIFF_CMAP), "positive": css_gradient("inferno"),
                          "map_signed": css_gradient(overlay.colormap(True)),
                          "map_positive": css_gradient(overlay.colormap(False))},
            "overlay": overlay}


def render_to(path: Path, template: str, context: dict) -> Path:
    """Render ``template`` into ``path`` piece by piece (never the whole page in memory), through a
    temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for chunk in _ENV.get_template(template).generate(**context):
            fh.write(chunk)
    os.replace(tmp, path)
    return path
