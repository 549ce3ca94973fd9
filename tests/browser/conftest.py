"""Browser fixtures: Playwright driving Debian's Chromium (never `playwright install`).

The tests skip, with the reason in the pytest summary and a banner at its end, when the Python
package ``playwright`` or ``/usr/bin/chromium`` is missing; with ``COUNTERLENS_REQUIRE_BROWSER=1``
(set by .ci/run) they fail instead. Screenshots go to ``test-artifacts/`` at the repository root
(``COUNTERLENS_TEST_ARTIFACTS`` overrides).
"""
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM = os.environ.get("COUNTERLENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(os.environ.get("COUNTERLENS_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts")
_SKIPPED: list[str] = []


def browser_unavailable() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (`make test` installs it: pip install playwright)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (`make test` installs it as root: apt-get install chromium)"
    return None


@pytest.fixture(scope="session")
def browser():
    reason = browser_unavailable()
    if reason:
        if os.environ.get("COUNTERLENS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"COUNTERLENS_REQUIRE_BROWSER=1 but the browser tests cannot run: {reason}")
        _SKIPPED.append(reason)
        pytest.skip(f"BROWSER TESTS NOT RUN: {reason}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page with everything that must not happen recorded: console errors, uncaught exceptions,
    dialogs (alert, confirm) and requests for anything but the file itself and data: URIs."""

    def __init__(self, page):
        self.page = page
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.on("dialog", self._dialog)
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:"))
                else self.problems.append(f"network request: {r.url}"))

    def _dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def open(self, path: Path):
        self.page.goto(Path(path).resolve().as_uri(), wait_until="load")
        return self.page


@pytest.fixture
def watched(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, java_script_enabled=True)
    page = context.new_page()
    yield Watched(page)
    context.close()


def add_counterfactuals(run: Path, model_dir: Path, n: int = 3) -> None:
    """Real counterfactuals (a short search) for the first ``n`` cases of a run, stored as
    ``counterlens counterfactual`` stores them."""
    from counterlens.counterfactual import counterfactual
    from counterlens.loading import load_model
    from counterlens.runs.store import RunStore
    clf = load_model(model_dir, device="cpu")
    with RunStore(run, create=False) as store:
        rows = [r for r in store.images() if r["status"] == "done"][:n]
        x = torch.from_numpy(np.stack([store.load_array(r["image_file"]) for r in rows]))
        result = counterfactual(clf, x, "other", steps=10, lam_steps=1, seed=0)   # short: the search is not under test
        names = clf.class_names(result.probs_before.shape[1])
        for j, r in enumerate(rows):
            store.record_counterfactuals(r["id"], [{
                "target": int(result.target[j]), "target_name": names[int(result.target[j])],
                "valid": bool(result.valid[j]), "reason": result.reason[j], "lam": float(result.lam[j]),
                "iterations": int(result.iterations[j]),
                "distance": {k: float(v[j]) for k, v in result.distance.items()},
                "probs_before": result.probs_before[j].tolist(), "probs_after": result.probs_after[j].tolist(),
                "seconds": 0.1, "x": result.x[j].numpy()}])


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo (small: 32 px, one epoch, 8 cases) with three real counterfactuals and the metric
    files of the metrics step (fixtures with plausible values), and its report."""
    from test_report import add_metric_files

    from counterlens.cli import main
    from counterlens.viz.report import write_report
    root = tmp_path_factory.mktemp("browser-demo")
    out = root / "demo-run"
    assert main(["demo", "--out", str(out), "--work", str(root / "work"), "--n-train", "96", "--n-test", "32",
                 "--size", "32", "--epochs", "1", "--cases", "8", "--methods", "gradcam,integrated_gradients",
                 "--counterfactuals", "0", "--quiet"]) == 0
    add_counterfactuals(out, root / "work" / "model", n=3)
    add_metric_files(out)
    write_report(out)
    with sqlite3.connect(out / "results.sqlite") as db:
        facts = {"outcomes": dict(db.execute(
            "SELECT CASE WHEN label = prediction THEN 'correct' ELSE 'incorrect' END, COUNT(*) FROM images "
            "WHERE status = 'done' GROUP BY 1").fetchall()),
            "labels": dict(db.execute("SELECT label_name, COUNT(*) FROM images GROUP BY 1").fetchall()),
            "methods": [r[0] for r in db.execute("SELECT DISTINCT method FROM attributions ORDER BY method")],
            "confidences": [r[0] for r in db.execute("SELECT probability FROM images ORDER BY id")]}
    (out / "facts.json").write_text(json.dumps(facts))
    return out, facts


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots and measurements are kept after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED:
        terminalreporter.write_sep("!", "BROWSER TESTS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(f"tests/browser did not run: {_SKIPPED[0]}", red=True, bold=True)
