"""The report in a real browser (Chromium through Playwright): it opens offline without errors,
the filters, toggles, slider and pages change what is shown, user data stays text, 1,000 cases
render one page at a time, and a run above ``single_file_max`` opens as an index whose links
lead to gallery pages (files of their own, opened from file:// without a server)."""
import json
import math
import time

import pytest
from test_report import EVIL_CLASS, EVIL_NAME, make_run

from counterlens.viz.report import write_report

pytestmark = pytest.mark.slow

ALL_IMAGES_DECODED = """() => Array.from(document.querySelectorAll('#gallery img'))
    .every(i => i.complete && i.naturalWidth > 0)"""


def shown(page):
    return page.locator("#gallery article.case")


def visible_count(page, selector):
    return page.evaluate("s => Array.from(document.querySelectorAll(s)).filter(e => e.offsetParent !== null).length",
                         selector)


def test_demo_report_opens_offline_without_errors(demo_run, watched, artifacts):
    run, facts = demo_run
    page = watched.open(run / "report.html")
    assert shown(page).count() == 8
    page.wait_for_function(ALL_IMAGES_DECODED)
    for heading in ("Run summary", "Method comparison", "Shortcut audit", "Counterfactuals", "Cases"):
        assert page.get_by_role("heading", name=heading, exact=True).count() == 1
    # every overlay has its image underneath (copied from the case's image when the page is built)
    bases = page.locator("#gallery img.base")
    assert bases.count() == 8 * len(facts["methods"])
    assert all(src.startswith("data:image/png;base64,") for src in bases.evaluate_all("l => l.map(i => i.src)"))
    assert page.locator("#gallery figure.cf").count() == 3
    assert page.locator("#gallery .cbar").count() == 8 * len(facts["methods"]) + 3
    assert "cases 1\u20138 of 8" in page.locator("[data-pager] .count").first.text_content()
    # a "look first" link shows its case, on whichever page of the gallery it is
    link = page.locator("#look-first a").first
    anchor = link.get_attribute("href")[1:]
    link.click()
    page.wait_for_function(ALL_IMAGES_DECODED)
    assert page.locator(f"#gallery article#{anchor}").count() == 1
    assert page.locator(f"#gallery article#{anchor} h3").text_content() == link.text_content()
    shot = artifacts / "report-demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    assert watched.problems == [] and watched.dialogs == []


def test_filters_toggles_slider_and_confusion_matrix(demo_run, watched):
    run, facts = demo_run
    page = watched.open(run / "report.html")
    for outcome in ("correct", "incorrect"):
        page.select_option("#f-outcome", outcome)
        assert shown(page).count() == facts["outcomes"].get(outcome, 0)
        assert all(outcome in c for c in shown(page).evaluate_all("l => l.map(a => a.className)"))
    page.select_option("#f-outcome", "")
    for label, n in facts["labels"].items():
        page.select_option("#f-label", label)
        assert shown(page).count() == n
        assert set(page.locator("#gallery .meta b:first-of-type").all_text_contents()) == {label}
    page.click("#f-reset")
    assert shown(page).count() == 8
    # method toggles hide that method's overlays, on this page and on the next render
    first, second = facts["methods"]
    page.uncheck(f"input.method-toggle[value='{first}']")
    assert visible_count(page, f"figure.ov[data-method='{first}']") == 0
    assert visible_count(page, f"figure.ov[data-method='{second}']") == 8
    page.select_option("#f-outcome", "correct")
    assert visible_count(page, f"figure.ov[data-method='{first}']") == 0
    page.check(f"input.method-toggle[value='{first}']")
    assert visible_count(page, f"figure.ov[data-method='{first}']") == shown(page).count()
    page.select_option("#f-outcome", "")
    page.uncheck("#f-show-cf")
    assert visible_count(page, "figure.cf") == 0
    page.check("#f-show-cf")
    assert visible_count(page, "figure.cf") == 3
    # the opacity slider sets the maps' opacity
    page.locator("#f-opacity").fill("30")
    opacities = page.locator("#gallery img.map").evaluate_all("l => l.map(i => getComputedStyle(i).opacity)")
    assert set(opacities) == {"0.3"} and page.locator("#o-opacity").text_content() == "30%"
    # a confusion-matrix cell shows its cases
    cell = page.locator("#confusion td:not(.zero)").first
    n = int(cell.text_content())
    cell.click()
    assert shown(page).count() == n
    assert page.locator("#f-label").input_value() == cell.get_attribute("data-label")
    assert watched.problems == [] and watched.dialogs == []


def test_confidence_filter_sort_and_pages(tmp_path, watched):
    run = make_run(tmp_path / "run", n=30, n_cf=2, failed=1, extras=False)
    page = watched.open(write_report(run, page_size=8))
    confidences = [float(t.get_attribute("data-confidence") or "nan")
                   for t in page.locator("#case-store > template").all()]
    assert shown(page).count() == 8
    assert page.locator("[data-pager] .count").first.text_content() == "cases 1–8 of 31 · page 1 of 4"
    for _ in range(3):
        page.locator("[data-pager] button[data-step='1']").last.click()
    assert shown(page).count() == 7 and page.locator("[data-pager] button[data-step='1']").first.is_disabled()
    page.locator("#f-conf-min").fill("60")
    page.locator("#f-conf-max").fill("90")
    expected = sum(0.6 - 1e-9 <= c <= 0.9 + 1e-9 for c in confidences)   # the failed case (nan) drops out
    assert 0 < expected < 30
    assert f"of {expected} matching (31 in the run)" in page.locator("[data-pager] .count").first.text_content()
    assert page.locator("#o-conf-min").text_content() == "60%" and page.locator("#o-conf-max").text_content() == "90%"
    seen = []
    while True:
        seen += [float(t.split("(")[1].split("%")[0]) for t in page.locator("#gallery .meta").all_text_contents()]
        if page.locator("[data-pager] button[data-step='1']").first.is_disabled():
            break
        page.locator("[data-pager] button[data-step='1']").first.click()
    assert len(seen) == expected and all(60 <= v <= 90 for v in seen)
    page.locator("#f-conf-max").fill("40")                   # below the minimum: the minimum follows
    assert page.locator("#f-conf-min").input_value() == "40"
    page.click("#f-reset")
    page.select_option("#f-sort", "conf-asc")
    first_page = [float(t.split("(")[1].split("%")[0]) for t in page.locator("#gallery .meta").all_text_contents()]
    lowest = min(c for c in confidences if not math.isnan(c))
    assert first_page == sorted(first_page) and first_page[0] == pytest.approx(100 * lowest, abs=0.06)
    page.select_option("#f-sort", "conf-desc")
    first_page = [float(t.split("(")[1].split("%")[0]) for t in page.locator("#gallery .meta").all_text_contents()]
    assert first_page == sorted(first_page, reverse=True)
    assert watched.problems == [] and watched.dialogs == []


def test_user_data_shows_as_text_and_runs_nothing(tmp_path, watched):
    run = make_run(tmp_path / "run", n=5, n_cf=2, evil=True)
    page = watched.open(write_report(run))
    page.wait_for_function(ALL_IMAGES_DECODED)
    assert page.locator("#gallery article h3").first.text_content() == EVIL_NAME
    assert EVIL_CLASS in page.locator("#f-label option").all_text_contents()
    assert EVIL_CLASS in page.locator("#confusion th").all_text_contents()
    assert page.evaluate("() => Array.from(document.images).filter(i => i.getAttribute('src') === 'x').length") == 0
    assert page.evaluate("() => document.scripts.length") == 1
    page.select_option("#f-label", EVIL_CLASS)
    labels = page.locator("#gallery .meta b:first-of-type").all_text_contents()
    assert labels and set(labels) == {EVIL_CLASS}
    page.click("#f-reset")
    page.wait_for_timeout(200)            # an onerror handler would have fired by now
    assert watched.dialogs == [] and watched.problems == []


def test_thousand_cases_render_one_page_at_a_time(tmp_path, watched, artifacts):
    run = make_run(tmp_path / "run", n=1000, size=32, n_cf=0, failed=0)
    t0 = time.perf_counter()
    report = write_report(run)
    build_s = time.perf_counter() - t0
    size = report.stat().st_size
    assert size < 20_000_000                           # about 10 kB a case at 32 x 32 with two maps
    t0 = time.perf_counter()
    page = watched.open(report)
    first_page_s = time.perf_counter() - t0
    (artifacts / "report-1000-cases.json").write_text(json.dumps(
        {"cases": 1000, "report_bytes": size, "build_seconds": round(build_s, 2),
         "load_to_first_page_seconds": round(first_page_s, 2)}))
    print(f"1000 cases: report {size / 1e6:.1f} MB built in {build_s:.1f} s; first page after {first_page_s:.2f} s")
    assert page.locator("#case-store > template").count() == 1000
    assert shown(page).count() == 24
    # only the shown cases' images are in the document: the rest stay inert in their templates
    in_gallery = page.locator("#gallery img").count()
    outside = page.evaluate("() => Array.from(document.images).filter(i => !i.closest('#gallery')).length")
    assert page.evaluate("() => document.images.length") == in_gallery + outside and outside == 2            # the curves and randomisation plots
    assert in_gallery == 24 * 5                           # the image, and a base and a map per method
    page.wait_for_function(ALL_IMAGES_DECODED)
    assert page.locator("[data-pager] .count").first.text_content() == "cases 1\u201324 of 1000 \u00b7 page 1 of 42"
    page.locator("[data-pager] button[data-step='1']").first.click()
    assert page.locator("#gallery h3").first.text_content() != ""
    assert page.locator("[data-pager] .count").first.text_content().startswith("cases 25\u201348 of 1000")
    ids = shown(page).evaluate_all("l => l.map(a => a.id)")
    assert len(ids) == 24 and len(set(ids)) == 24 and ids[0] == "case-25"
    page.select_option("#f-outcome", "incorrect")
    n_wrong = len(page.locator("#case-store > template[data-outcome='incorrect']").evaluate_all("l => l"))
    assert shown(page).count() == min(24, n_wrong)
    assert f"of {n_wrong} matching (1000 in the run)" in page.locator("[data-pager] .count").first.text_content()
    assert watched.problems == [] and watched.dialogs == []


def decoded(page) -> bool:
    return page.evaluate("""() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)""")


def test_paged_report_index_look_first_and_gallery_pages(tmp_path, watched, artifacts):
    """121 cases, at most 50 in one file: an index and 6 gallery pages of 24, joined by links."""
    run = make_run(tmp_path / "run", n=120, size=32, n_cf=2, failed=1, evil=True)
    index = write_report(run, single_file_max=50, page_size=24)
    assert index == run / "report" / "index.html"
    page = watched.open(run / "report.html")                       # the usual path forwards to the index
    page.wait_for_url("**/report/index.html")
    page.wait_for_load_state("load")
    assert decoded(page) and page.locator("#look-first").count() == 1
    assert page.locator("#confusion th").filter(has_text=EVIL_CLASS).count() == 2
    page.screenshot(path=str(artifacts / "report-paged-index.png"), full_page=True)
    # a "look first" link: the gallery page that holds the case, scrolled to it
    link = page.locator("#lf-misclassified a").first
    href, name = link.get_attribute("href"), link.text_content()
    link.click()
    page.wait_for_load_state("load")
    assert page.url.endswith(href) and "/report/gallery/page-" in page.url
    anchor = href.split("#")[1]
    article = page.locator(f"article#{anchor}")
    assert article.locator("h3").text_content() == name and article.is_visible()
    assert page.evaluate("a => { const r = document.getElementById(a).getBoundingClientRect(); "
                         "return r.top < window.innerHeight && r.bottom > 0; }", anchor)
    assert decoded(page)
    # its overlays have their image underneath; opacity slider and method toggle work on the page
    assert page.locator("#gallery img.base").evaluate_all("l => l.every(i => i.src.startsWith('data:image/png'))")
    page.locator("#f-opacity").fill("30")
    assert set(page.locator("#gallery img.map").evaluate_all("l => l.map(i => getComputedStyle(i).opacity)")) == {"0.3"}
    page.uncheck("input.method-toggle[value='gradcam']")
    assert visible_count(page, "figure.ov[data-method='gradcam']") == 0
    # pager links: the next page, then page 1 (the hostile file name shows as text) and the last one
    current = int(page.url.split("page-")[1][:5])
    page.locator("nav.pages a[rel='next']").first.click() if current < 6 else \
        page.locator("nav.pages a[rel='prev']").first.click()
    page.wait_for_load_state("load")
    expected = current + 1 if current < 6 else current - 1
    assert page.url.endswith(f"page-{expected:05d}.html") and decoded(page)
    assert shown(page).count() == (24 if expected < 6 else 1)
    page.locator("input.goto-page").first.fill("1")
    page.locator("input.goto-page").first.press("Enter")
    page.wait_for_url("**/page-00001.html")
    page.wait_for_load_state("load")
    assert decoded(page) and shown(page).count() == 24
    assert page.locator("#gallery article h3").first.text_content() == EVIL_NAME
    assert page.evaluate("() => Array.from(document.images).filter(i => i.getAttribute('src') === 'x').length") == 0
    page.select_option("#f-outcome", "incorrect")
    assert all("incorrect" in c for c in shown(page).evaluate_all(
        "l => l.filter(a => !a.hidden).map(a => a.className)"))
    page.screenshot(path=str(artifacts / "report-paged-gallery.png"), full_page=True)
    page.locator("nav.toc a", has_text="Report index").click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/report/index.html")
    # a confusion-matrix cell lists its cases; each row links into the gallery
    page.locator("#confusion td.off a").first.click()
    page.wait_for_load_state("load")
    assert "/report/lists/cell-" in page.url and page.locator("#list td.path a").count() >= 1
    page.locator("#list td.path a").first.click()
    page.wait_for_load_state("load")
    assert "/report/gallery/page-" in page.url and decoded(page)
    page.wait_for_timeout(200)                # an onerror handler would have fired by now
    assert watched.problems == [] and watched.dialogs == []
