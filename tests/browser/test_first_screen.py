"""The report's first screen in Chromium at 1280x800: the verdicts (is the model right, the audit,
which maps to trust, what to look at first) are visible without scrolling, each case shows its
recommended map with the others one click away, and nothing goes to the console. The screenshot
is kept in the browser tests' artifacts folder (test-artifacts/first-screen.png)."""
import pytest

pytestmark = pytest.mark.slow

VIEWPORT = {"width": 1280, "height": 800}
VERDICTS = ("#v-accuracy", "#v-audit", "#v-trust", "#v-look")


def test_first_screen_shows_the_verdicts_above_the_fold(demo_run, watched, artifacts):
    run, facts = demo_run
    watched.page.set_viewport_size(VIEWPORT)           # a laptop screen, not the fixture's 1400x1000
    page = watched.open(run / "report.html")
    assert page.viewport_size == VIEWPORT
    assert page.evaluate("window.scrollY") == 0
    for selector in VERDICTS:
        box = page.locator(selector).bounding_box()
        assert box is not None and page.locator(selector).is_visible(), selector
        assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], (selector, box)
        assert page.locator(selector).inner_text().strip()
    assert "of 8 labelled images" in page.locator("#v-accuracy").inner_text()
    assert "audited region" in page.locator("#v-audit").inner_text()
    trust = page.locator("#v-trust").inner_text()
    assert "Trust the maps of gradcam" in trust and "similarity after randomising all 5 layers" in trust
    assert "insertion AUC \u2212 deletion AUC" in trust
    shot = artifacts / "first-screen.png"
    page.screenshot(path=str(shot))                       # the first screen only, as a reader sees it
    assert shot.stat().st_size > 20_000
    # each case: the recommended map shown, the other one behind one click, "all maps" opens them all
    first, other = "gradcam", next(m for m in facts["methods"] if m != "gradcam")
    article = page.locator("#gallery article.case").first
    assert article.locator(f"figure.ov[data-method='{first}']").first.is_visible()
    assert not article.locator(f"figure.ov[data-method='{other}']").first.is_visible()
    article.locator("details.other-maps > summary").click()
    assert article.locator(f"figure.ov[data-method='{other}']").first.is_visible()
    page.check("#f-all-maps")
    assert page.evaluate("Array.from(document.querySelectorAll('#gallery details.other-maps')).every(d => d.open)")
    page.select_option("#f-outcome", "correct")            # a re-render keeps them open
    assert page.evaluate("Array.from(document.querySelectorAll('#gallery details.other-maps')).every(d => d.open)")
    assert watched.problems == [] and watched.dialogs == []
