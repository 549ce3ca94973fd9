"""The report's first screen (:mod:`counterlens.viz.report_verdict`): the verdict rules on
fabricated runs (passed, failed, missing metrics, multi-label, no labels), the recommended map of
each case, and user data escaped. tests/browser/test_first_screen.py opens it in Chromium."""
import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from test_report import EVIL_CLASS, make_run

from counterlens.viz import report_verdict as rv
from counterlens.viz.plots import randomisation_figure
from counterlens.viz.report import write_report

LAYERS = ["classifier.3", "classifier.0", "features.6", "features.3", "features.0"]


def entry(similarity, passed, threshold=0.5, **extra):
    return {"layers": LAYERS[:len(similarity)], "similarity": similarity, "passed": passed, "threshold": threshold,
            "measure": "spearman", **extra}


def cases_frame(outcomes, labels, predictions, **columns):
    return pd.DataFrame({"status": ["done"] * len(outcomes), "outcome": outcomes, "label": labels,
                         "prediction": predictions, **columns})


def pairs_frame(rows):
    """rows: (method, deletion, insertion, room, mufidelity), one per case x method."""
    return pd.DataFrame(rows, columns=["method", "deletion_auc", "insertion_auc", "insertion_room", "mufidelity"])


# -- sanity ----------------------------------------------------------------------------------------
def test_sanity_verdict_states_the_rule_and_its_numbers():
    ok = rv.sanity_verdict(entry([0.7, 0.45, 0.2, 0.1, 0.05], True))
    assert ok["passed"] is True and ok["text"] == ("passed: similarity after randomising all 5 layers 0.05 < 0.5 "
                                                   "and its mean over the cascade 0.30 < 0.5")
    flat = rv.sanity_verdict(entry([0.98, 0.95, 0.93, 0.9, 0.88], False))
    assert flat["passed"] is False and "all 5 layers 0.88 \u2265 0.5" in flat["text"]
    # the case: ends at 0.09 (below the threshold) yet fails, because the cascade's mean is
    # above it; the page says which half of the rule failed, with both numbers
    smooth = rv.sanity_verdict(entry([0.97, 0.96, 0.95, 0.9, 0.09], False, cascade_mean=0.774))
    assert smooth["passed"] is False and smooth["final"] == 0.09
    assert "all 5 layers 0.09 < 0.5, but its mean over the cascade 0.77 \u2265 0.5" in smooth["text"]
    assert "survived the randomisation of the top layers" in smooth["text"]
    # a stored verdict that its numbers contradict (an older rule): the rule wins, and the page says so
    old = rv.sanity_verdict(entry([0.97, 0.96, 0.95, 0.9, 0.09], True))
    assert old["passed"] is False and "sanity.json says passed" in old["text"]
    assert rv.checked_sanity({"smoothgrad": entry([0.97, 0.96, 0.95, 0.9, 0.09], True)})["smoothgrad"]["passed"] is False
    # the plot's legend carries the same two numbers and the same verdict
    legend = randomisation_figure(rv.checked_sanity({"smoothgrad": entry([0.97, 0.96, 0.95, 0.9, 0.09], True)}))
    assert [t.get_text() for t in legend.axes[0].get_legend().get_texts()] == [
        "smoothgrad \u2717 failed (last 0.09, mean 0.77)"]
    plt.close(legend)
    broken = rv.sanity_verdict({"layers": [], "similarity": [], "passed": None, "error": "no spatial layer"})
    assert broken["passed"] is None and broken["text"] == "could not run: no spatial layer"
    assert rv.sanity_verdict(None) is None
    assert rv.sanity_verdict(entry([None, None], None))["passed"] is None           # NaN similarities: no verdict


# -- faithfulness ----------------------------------------------------------------------------------
def test_faithfulness_test_uses_curves_where_insertion_can_separate_maps():
    pairs = pairs_frame([("gradcam", 0.1, 0.8, 0.9, 0.2), ("gradcam", 0.2, 0.6, 0.9, 0.3),
                         ("gradcam", 0.9, 0.1, 0.02, 0.1),          # room 0.02: left out, not counted against it
                         ("guided_backprop", 0.6, 0.3, 0.9, 0.5), ("guided_backprop", 0.5, 0.4, 0.9, 0.5)])
    v = rv.faithfulness_verdicts(pairs)
    assert v["gradcam"]["passed"] and v["gradcam"]["score"] == pytest.approx(0.55)
    assert v["gradcam"]["text"] == "passed: insertion AUC \u2212 deletion AUC +0.55 > 0 (mean over 2 maps, 2 above 0)"
    assert not v["guided_backprop"]["passed"] and v["guided_backprop"]["score"] == pytest.approx(-0.2)
    assert "no better than its reverse" in v["guided_backprop"]["text"]
    # no curves: MuFidelity above 0; nothing at all: no verdict
    mu = rv.faithfulness_verdicts(pairs.assign(deletion_auc=np.nan))
    assert mu["guided_backprop"]["passed"] and mu["guided_backprop"]["text"].startswith("passed: MuFidelity +0.50 > 0")
    assert rv.faithfulness_verdicts(pairs[["method"]]) == {}


# -- the recommended map ---------------------------------------------------------------------------
def test_recommended_map_is_the_most_faithful_method_that_passed_the_sanity_check():
    methods = ["saliency", "gradcam", "smoothgrad"]
    pairs = pairs_frame([("saliency", 0.1, 0.9, 0.9, 0.3),            # the most faithful, but fails sanity
                         ("gradcam", 0.3, 0.6, 0.9, 0.3), ("smoothgrad", 0.2, 0.8, 0.9, 0.3)])
    sanity = {"saliency": entry([0.9, 0.9, 0.9], False), "gradcam": entry([0.3, 0.2, 0.1], True),
              "smoothgrad": entry([0.4, 0.3, 0.2], True)}
    v = rv.method_verdicts(methods, sanity, pairs)
    assert v["ranked"] == ["smoothgrad", "gradcam", "saliency"] and v["trusted"] == ["gradcam", "smoothgrad"]
    assert v["reason"] == "smoothgrad: the most faithful method that passed the sanity check"
    # none passed the sanity check: the most faithful, saying why
    none = rv.method_verdicts(methods, {m: entry([0.9, 0.9, 0.9], False) for m in methods}, pairs)
    assert none["ranked"][0] == "saliency" and "no method passed the sanity check on this model" in none["reason"]
    assert none["trusted"] == []
    # no sanity.json: the most faithful, and how to get the check
    unchecked = rv.method_verdicts(methods, {}, pairs)
    assert unchecked["ranked"][0] == "saliency" and "counterlens evaluate RUN" in unchecked["reason"]
    # no metrics at all: the run's first method, and how to measure
    bare = rv.method_verdicts(methods, {}, pairs[["method"]])
    assert bare["ranked"][0] == "saliency" and "counterlens evaluate RUN" in bare["reason"]
    # a case without a map of the recommended method shows the next one, saying so
    case = {"overlays": [{"method": "saliency"}, {"method": "gradcam"}]}
    rv.mark_recommended(case, v["ranked"], v["reason"])
    assert [ov["method"] for ov in case["overlays"]] == ["gradcam", "saliency"]
    assert [ov["recommended"] for ov in case["overlays"]] == [True, False]
    assert case["recommend"] == "gradcam: smoothgrad (recommended for this run) has no map for this case"


# -- is the model right ----------------------------------------------------------------------------
def test_accuracy_per_class_per_finding_and_without_labels():
    single = cases_frame(["correct", "incorrect", "correct", "unknown"], ["a", "a", "b", None], ["a", "b", "b", "a"])
    acc = rv.accuracy_verdict(single, ["a", "b"])
    assert acc["overall"] == "The model is right on 2 of 3 labelled images (67%); 1 more have no label."
    assert acc["lines"] == ["a: 1 of 2 right (50%); the others predicted b (1).", "b: 1 of 1 right (100%)."]
    multi = cases_frame(["correct", "incorrect", "incorrect"], ["opacity", "opacity", "none"], ["opacity", "none", "effusion"],
                        label_opacity=[1, 1, 0], pred_opacity=[1, 0, 0], label_effusion=[0, 0, 0], pred_effusion=[0, 0, 1])
    acc = rv.accuracy_verdict(multi, ["opacity", "effusion"], multilabel=True)
    assert acc["overall"] == "The model is with every finding right on 1 of 3 labelled images (33%)."
    assert acc["lines"] == ["opacity: right on 2 of 3 images (67%); found in 1 of the 2 that have it, flagged in 0 "
                            "of the 1 that do not.",
                            "effusion: right on 2 of 3 images (67%), flagged in 1 of the 3 that do not."]
    none = rv.accuracy_verdict(cases_frame(["unknown"] * 2, [None, None], ["a", "b"]), ["a", "b"])
    assert none["lines"] == [] and "have no labels" in none["overall"]


def test_audit_in_one_sentence_with_its_rule():
    a = rv.audit_verdict({"relies_on_region": True, "region_flip_rate": 0.64, "random_flip_rate": 0.0, "n_images": 200,
                          "decision_rule": {"text": "relies_on_region = region_flip_rate >= 0.1 and ..."},
                          "verdict": "long. text"})
    assert a["relies"] and a["text"] == ("The model relies on the audited region: 64% of decisions change when it is "
                                         "removed, 0% when a random region of the same size is (200 images).")
    assert a["rule"].startswith("relies_on_region = region_flip_rate >= 0.1")
    assert rv.audit_verdict({"verdict": "Partial. More words"})["text"] == "Partial."
    assert rv.audit_verdict(None) is None


# -- in the report ---------------------------------------------------------------------------------
def verdict_section(html: str) -> str:
    return html.split('<section class="panel" id="verdict">')[1].split("</section>")[0]


def test_report_opens_with_the_verdict_and_recommends_a_map_per_case(tmp_path):
    run = make_run(tmp_path / "run", n=6, n_cf=1, evil=True)
    sanity = json.loads((run / "sanity.json").read_text())
    sanity["guided_backprop"] = {**sanity["guided_backprop"], "passed": True,   # contradicted by its own numbers
                                 "similarity": [0.97, 0.96, 0.95, 0.9, 0.09]}
    (run / "sanity.json").write_text(json.dumps(sanity))
    html = write_report(run).read_text()
    start = html.index('id="verdict"')                      # the first panel, before any other table
    assert start < html.index("<table") and html.index("</section>", start) < html.index('id="summary"')
    v = verdict_section(html)
    assert "labelled images" in v and "&lt;script&gt;" in v and EVIL_CLASS not in v      # class names escaped
    assert "The model relies on the audited region: 62%" in v
    assert "Trust the maps of gradcam" in v and "all 5 layers 0.09 &lt; 0.5, but its mean over the cascade" in v
    assert "sanity.json says passed" in v and re.search(r'href="#lf-[a-z-]+"', v)
    # the sanity table and badges agree with the rule (the method table: one passed, one failed)
    table = html.split('id="method-table"')[1].split("</table>")[0]
    assert table.count("badge good") == 1 and table.count("badge bad") == 1
    # every case: gradcam shown, guided backprop one click away
    articles = re.findall(r'<article class="case (?:correct|incorrect|unknown)".*?</article>', html, flags=re.DOTALL)
    assert len(articles) == 6
    for a in articles:
        shown, other = a.split('<details class="other-maps">')
        assert 'data-method="gradcam"' in shown and 'data-method="guided_backprop"' not in shown
        assert 'data-method="guided_backprop"' in other and "Recommended map: gradcam" in shown
    assert 'id="f-all-maps"' in html


def test_report_without_metrics_says_how_to_get_them_and_escapes_errors(tmp_path):
    run = make_run(tmp_path / "run", n=3, n_cf=0, failed=0, extras=False)
    v = verdict_section(write_report(run).read_text())
    assert "Which maps to trust is not measured yet" in v and "counterlens evaluate RUN" in v
    assert 'class="grid v-methods"' not in v and "Does it rely on a shortcut" not in v
    (run / "sanity.json").write_text(json.dumps({"gradcam": {"passed": None, "error": "<b>no layer</b>"},
                                                  "guided_backprop": entry([0.3, 0.1], True)}))
    html = write_report(run).read_text()
    v = verdict_section(html)
    assert "could not run: &lt;b&gt;no layer&lt;/b&gt;" in v and "<b>no layer</b>" not in html
    assert "no faithfulness metrics" in v and "guided_backprop passed the sanity check" in v


def test_paged_report_has_the_verdict_on_its_index_and_recommended_maps_on_its_pages(tmp_path):
    run = make_run(tmp_path / "run", n=5, n_cf=0, failed=0)
    index = write_report(run, single_file_max=3, page_size=2)
    v = verdict_section(index.read_text())
    assert "Trust the maps of gradcam" in v and "labelled images" in v
    page = (run / "report" / "gallery" / "page-00001.html").read_text()
    assert page.count("Recommended map: gradcam") == 2 and page.count('<details class="other-maps">') == 2
    assert 'id="f-all-maps"' in page
