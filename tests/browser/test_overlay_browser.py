"""The report's display settings in a real browser (Chromium through Playwright): written with the
brain-tumour notebook's overlays (jet, alpha 0.4, |map|), the map-opacity slider and each slice
viewer's start at 40% and the maps are drawn at that opacity, the maps' colour bars are jet while
the counterfactual difference keeps its red-blue scale, on every page of the gallery."""
import numpy as np
from test_report import make_run

from counterlens.runs.records import Case, CaseResult
from counterlens.runs.store import ShardWriter
from counterlens.viz.report import write_report

NOTEBOOK = {"cmap": "jet", "alpha": 0.4, "absolute": True, "clip_percentile": 0.5}
JET_TOP, RDBU_TOP = "rgb(127, 0, 0) 0%", "rgb(103, 0, 31) 0%"


def _opacities(page, selector):
    return set(page.locator(selector).evaluate_all("l => l.map(e => getComputedStyle(e).opacity)"))


def test_notebook_settings_in_the_browser(tmp_path, watched, artifacts):
    run = make_run(tmp_path / "run", n=26, n_cf=2, failed=0, extras=False)
    page = watched.open(write_report(run, **NOTEBOOK))
    assert page.locator("#f-opacity").input_value() == "40" and page.locator("#o-opacity").text_content() == "40%"
    assert _opacities(page, "#gallery img.map") == {"0.4"}
    strip = "e => getComputedStyle(e).backgroundImage"
    assert JET_TOP in page.locator("#gallery figure.ov .strip").first.evaluate(strip)
    assert RDBU_TOP in page.locator("#gallery figure.cf .strip").first.evaluate(strip)
    assert page.locator("#map-display").text_content().startswith("|map| on jet, clipped at the 99.5th percentile")
    page.locator("[data-pager] button[data-step='1']").first.click()       # page 2: cloned from its templates
    assert "cases 25" in page.locator("[data-pager] .count").first.text_content()
    assert _opacities(page, "#gallery img.map") == {"0.4"}
    page.locator("#f-opacity").fill("70")                                   # the slider still works
    assert _opacities(page, "#gallery img.map") == {"0.7"}
    page.screenshot(path=str(artifacts / "report-notebook-overlays.png"))

    vol = tmp_path / "volume"
    z, y, x = np.mgrid[:8, :16, :16]
    amap = (np.exp(-((z - 4) ** 2 + (y - 6) ** 2 + (x - 10) ** 2) / 6.0)
            - np.exp(-((z - 3) ** 2 + (y - 11) ** 2 + (x - 5) ** 2) / 6.0)).astype(np.float32)
    with ShardWriter(vol) as writer:
        writer.write([CaseResult(case=Case(id="a.nii", file="/v/a.nii"), prediction=1, prediction_name="1",
                                 probs=[0.2, 0.8], image=np.random.default_rng(0).random((1, 8, 16, 16), np.float32),
                                 maps={"saliency": amap}, targets={"saliency": 1}, seconds={"saliency": 0.01})])
    page = watched.open(write_report(vol, **NOTEBOOK))
    viewer = page.locator("figure.sv").first
    assert viewer.locator(".sv-opacity").input_value() == "40"
    assert viewer.locator(".sv-opacity-out").text_content() == "40%"
    assert _opacities(page, "figure.sv .sv-map:not([hidden])") == {"0.4"}
    assert "saliency scale 0 .. " in viewer.locator("figcaption").text_content()      # |map|: from 0
    assert watched.problems == [] and watched.dialogs == []
