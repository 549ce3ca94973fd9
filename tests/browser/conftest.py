"""Browser fixtures: Playwright driving Debian's Chromium (never `playwright install`).

The tests skip, with the reason in the pytest summary and a banner at its end, when the Python
package ``playwright`` or ``/usr/bin/chromium`` is missing; with ``COUNTERLENS_REQUIRE_BROWSER=1``
(set by .ci/run) they fail instead. Screenshots go to ``test-artifacts/`` at the repository root
(``COUNTERLENS_TEST_ARTIFACTS`` overrides).
"""
import json
import os
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


def tiny_classifier(classes, size: int = 32):
    """A small seeded CNN (untrained: the report, not the model, is under test)."""
    import counterlens as cl
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, len(classes))).eval()
    return cl.Classifier(net, classes=list(classes), device="cpu", input_size=(size, size), value_range=(0, 1))


def synthetic_folder(root: Path, n: int, size: int = 32) -> Path:
    """``n`` synthetic brain-MRI slices as PNG files in class folders, their tumour masks in ``root/masks``."""
    from PIL import Image

    from counterlens.data.synthetic import generate
    gen = generate("brain-mri", n, size=size, seed=0, split="test")
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    for i in range(n):
        folder = root / "data" / classes[int(gen.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((gen.images[i, 0] * 255).round().astype(np.uint8)).save(folder / f"{gen.names[i]}.png")
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(gen.masks["tumor"][i].astype(np.uint8) * 255).save(root / "masks" / f"{gen.names[i]}.png")
    return root / "data"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A real dataset run (8 synthetic MRI slices, a tiny CNN, Grad-CAM and integrated gradients),
    three real counterfactuals (a short search), the metric files of the metrics step (fixtures with
    plausible values), and its report."""
    from test_report import add_metric_files

    from counterlens.data.images import ImageFolder
    from counterlens.runs.dataset import counterfactual_folder, explain_folder
    from counterlens.runs.store import open_run
    from counterlens.viz.report import write_report
    root = tmp_path_factory.mktemp("browser-demo")
    data = synthetic_folder(root, 8)
    out = root / "demo-run"
    clf = tiny_classifier(["glioma", "meningioma", "notumor", "pituitary"])
    read = {"channels": 1, "size": 32, "classes": clf.classes, "masks": root / "masks"}
    explain_folder(clf, ImageFolder(data, **read), out, methods=["gradcam", "integrated_gradients"],
                   params={"integrated_gradients": {"steps": 8}}, workers=1, threads=1, progress=False)
    counterfactual_folder(clf, ImageFolder(data, limit=3, **read), out, target="other",
                          params={"steps": 10, "lam_steps": 1, "seed": 0}, workers=1, threads=1, progress=False)
    add_metric_files(out)
    write_report(out)
    cases = open_run(out).cases
    facts = {"outcomes": {"correct": int((cases["label"] == cases["prediction"]).sum()),
                          "incorrect": int((cases["label"] != cases["prediction"]).sum())},
             "labels": {k: int(v) for k, v in cases["label"].value_counts().items()},
             "methods": sorted(open_run(out).methods), "confidences": [float(p) for p in cases["probability"]]}
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
