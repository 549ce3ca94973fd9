"""How the HTML report scales with the number of cases: build time, size, files, and how fast
Chromium opens it.

    python benchmarks/report_scale.py                       # N = 1,000, 10,000, 100,000
    python benchmarks/report_scale.py --sizes 1000 --keep   # one size, keep the run directory

For each N a run directory is fabricated with :class:`~counterlens.runs.store.ShardWriter` (no
model: 64x64 synthetic grey images with a round "lesion" and its mask, two methods whose maps are
a blob near the lesion (non-negative) and signed noise, six metrics per case and method, 16
counterfactuals, curves.json and sanity.json as the metrics step writes them), then
:func:`~counterlens.viz.report.write_report` builds the report (one file up to
``single_file_max`` = 2,000 cases, beyond it ``report/index.html`` with paged gallery files).
Measured: build seconds (and peak RSS of the build), total bytes and files of the report, and
the time Chromium takes to open the page a reader opens first (``report/index.html``, or
``report.html`` for one file): ``page.goto`` until the load event, median of 3, each in a fresh
browser context. Results: a Markdown table on stdout and ``benchmarks/results/report-scale.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
METHODS = ("gradcam", "integrated_gradients")
SIZE = 64
BATCH = 64                    # cases per written batch (one .npz each)
CHROMIUM = os.environ.get("COUNTERLENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
RESULTS = Path(__file__).resolve().parent / "results" / "report-scale.json"


def _blobs(rng, n: int, size: int, sigma):
    """``n`` Gaussian blobs ``[n, size, size]`` at random centres, and the centres."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(12, size - 12, (2, n)).astype(np.float32)
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), (n,))
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return np.exp(-d2 / (2 * sigma[:, None, None] ** 2)), cy, cx


def fabricate(root: Path, n: int, seed: int = 0) -> Path:
    """A run directory of ``n`` explained cases written the way the pipeline writes them."""
    from counterlens.runs.records import Case, CaseResult
    from counterlens.runs.store import ShardWriter, prepare_run

    rng = np.random.default_rng(seed)
    spec = {"model": {"source": "fabricated", "sha256": "ab" * 32, "description": "fabricated (benchmark)",
                      "classes": CLASSES, "value_range": [0, 1]},
            "data": {"path": "/data/fabricated", "classes": CLASSES}, "target": "predicted", "seed": seed,
            "methods": {"gradcam": {"layer": "auto"}, "integrated_gradients": {"steps": 32}}, "device": "cpu",
            "versions": {"counterlens": "bench"}}
    prepare_run(root, spec, compare=())
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    head = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (0.45 * SIZE) ** 2).astype(np.float32)
    with ShardWriter(root, name="bench") as writer:
        metric_rows = []
        for start in range(0, n, BATCH):
            b = min(BATCH, n - start)
            lesion, cy, cx = _blobs(rng, b, SIZE, rng.uniform(2.5, 5, b))
            images = (0.35 * head + 0.55 * lesion + 0.08 * rng.random((b, SIZE, SIZE), dtype=np.float32))
            images = np.clip(images, 0, 1).astype(np.float32)[:, None]
            masks = lesion > 0.5
            cam = _blobs(rng, b, SIZE, 6.0)[0] * 0.7 + 0.3 * lesion
            signed = (images[:, 0] - 0.4) * rng.normal(size=(b, SIZE, SIZE)).astype(np.float32) * (0.2 + lesion)
            labels = (np.arange(start, start + b) * len(CLASSES)) // n   # class folders, sorted as a folder reads
            wrong = rng.random(b) < 0.15
            preds = np.where(wrong, (labels + rng.integers(1, len(CLASSES), b)) % len(CLASSES), labels)
            logits = rng.normal(size=(b, len(CLASSES)))
            logits[np.arange(b), preds] = logits.max(1) + rng.uniform(0.05, 4, b)
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            results = []
            for j in range(b):
                i = start + j
                case = Case(id=f"{CLASSES[labels[j]]}/case-{i:06d}.png", file=f"/data/fabricated/{i}.png",
                            label=int(labels[j]), label_name=CLASSES[labels[j]])
                cf = None
                if i < 16:
                    t = int((preds[j] + 1) % len(CLASSES))
                    after = probs[j][::-1].copy()
                    after[t] = 0.8
                    x = np.clip(images[j] - 0.3 * lesion[j][None], 0, 1).astype(np.float32)
                    d = (x - images[j]).ravel()
                    cf = {"target": t, "target_name": CLASSES[t], "valid": i % 3 != 2, "reason": "", "lam": 0.1,
                          "iterations": 40, "probs_before": probs[j].tolist(), "probs_after": (after / after.sum()).tolist(),
                          "distance": {"l0": float((np.abs(d) > 1e-3).sum()), "l1": float(np.abs(d).sum()),
                                       "l2": float(np.sqrt((d ** 2).sum())), "linf": float(np.abs(d).max())},
                          "seconds": 0.4, "x": x}
                results.append(CaseResult(
                    case=case, prediction=int(preds[j]), prediction_name=CLASSES[preds[j]], probs=probs[j].tolist(),
                    image=images[j], mask=masks[j], maps={"gradcam": cam[j], "integrated_gradients": signed[j]},
                    targets={m: int(preds[j]) for m in METHODS}, seconds={"gradcam": 0.004, "integrated_gradients": 0.03},
                    counterfactual=cf))
                for k, method in enumerate(METHODS):
                    good = k == 0
                    dele = rng.uniform(0.05, 0.3) if good else rng.uniform(0.2, 0.6)
                    ins = rng.uniform(0.4, 0.9) if good else rng.uniform(0.2, 0.6)
                    metric_rows += [(case.id, method, "deletion_auc", dele), (case.id, method, "insertion_auc", ins),
                                    (case.id, method, "mufidelity", rng.uniform(-0.2, 0.6)),
                                    (case.id, method, "relevance_mass", rng.uniform(0.1, 0.9)),
                                    (case.id, method, "pointing_game", float(rng.random() < 0.7)),
                                    (case.id, method, "insertion_room", 0.8)]
            if start < 16:                      # the counterfactual cases in a batch of their own
                writer.write(results[:16])
                writer.write(results[16:])
            else:
                writer.write(results)
            if len(metric_rows) > 200_000:
                writer.write_metrics(metric_rows)
                metric_rows = []
        writer.write_metrics(metric_rows)
    x = np.linspace(0, 1, 21)
    curves = {m: {"deletion": {"x": x.tolist(), "y": (0.9 * np.exp(-(6 if m == "gradcam" else 2) * x)).tolist()},
                  "insertion": {"x": x.tolist(), "y": (0.2 + 0.7 * (1 - np.exp(-(6 if m == "gradcam" else 1.5) * x))).tolist()}}
              for m in METHODS}
    (root / "curves.json").write_text(json.dumps(curves))
    sanity = {m: {"layers": ["fc", "conv2", "conv1"], "similarity": [0.6, 0.3, 0.1] if m == "gradcam" else [0.95, 0.9, 0.88],
                  "passed": m == "gradcam", "threshold": 0.5, "random_logit": 0.3, "measure": "spearman"} for m in METHODS}
    (root / "sanity.json").write_text(json.dumps(sanity))
    return root


def build(root: Path, profile: bool = False) -> dict:
    """Build the report in a process of its own: seconds and that process's peak RSS."""
    code = (
        "import json, resource, sys, time\n"
        "from counterlens.viz.report import write_report\n"
        "t0 = time.perf_counter()\n"
        + ("import cProfile, pstats\nprof = cProfile.Profile()\nprof.enable()\n" if profile else "")
        + f"path = write_report({str(root)!r})\n"
        "seconds = time.perf_counter() - t0\n"
        + ("prof.disable()\npstats.Stats(prof, stream=sys.stderr).sort_stats('tottime').print_stats(15)\n" if profile else "")
        + "print(json.dumps({'seconds': seconds, 'path': str(path),"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    if profile:
        print(out.stderr[-6000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_files(root: Path) -> list[Path]:
    files = [root / "report.html"] if (root / "report.html").exists() else []
    return files + ([p for p in (root / "report").rglob("*") if p.is_file()] if (root / "report").is_dir() else [])


def load_seconds(page_path: Path, repeats: int = 3) -> list[float]:
    """Seconds from ``page.goto`` to the load event, each in a fresh browser context."""
    from playwright.sync_api import sync_playwright
    times = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                errors = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                t0 = time.perf_counter()
                page.goto(page_path.resolve().as_uri(), wait_until="load")
                times.append(time.perf_counter() - t0)
                if errors:
                    raise RuntimeError(f"{page_path}: {errors[:3]}")
                context.close()
        finally:
            browser.close()
    return times


def measure(n: int, work: Path, keep: bool, profile: bool) -> dict:
    root = work / f"run-{n}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    fabricate(root, n)
    fabricate_s = time.perf_counter() - t0
    built = build(root, profile)
    opened = Path(built["path"])
    files = report_files(root)
    first_page = root / "report" / "gallery" / "page-00001.html"
    row = {"cases": n, "layout": "folder" if opened.name == "index.html" else "one file",
           "fabricate_seconds": round(fabricate_s, 1), "build_seconds": round(built["seconds"], 1),
           "build_ms_per_case": round(1000 * built["seconds"] / n, 2), "build_peak_rss_mb": round(built["peak_rss_mb"]),
           "report_bytes": sum(f.stat().st_size for f in files), "report_files": len(files),
           "opened": str(opened.relative_to(root)), "opened_bytes": opened.stat().st_size,
           "results_csv_bytes": (root / "results.csv").stat().st_size}
    loads = load_seconds(opened)
    row["load_seconds_median"] = round(statistics.median(loads), 3)
    row["load_seconds"] = [round(v, 3) for v in loads]
    if first_page.exists():
        pages = load_seconds(first_page)
        row["gallery_page_load_seconds_median"] = round(statistics.median(pages), 3)
        row["gallery_page_bytes"] = first_page.stat().st_size
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| cases | layout | build s | ms / case | peak RSS MB | report size | files | page opened (size) "
            "| Chromium load s (median of 3) | gallery page load s |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        gp = r.get("gallery_page_load_seconds_median")
        lines.append(f"| {r['cases']:,} | {r['layout']} | {r['build_seconds']} | {r['build_ms_per_case']} "
                     f"| {r['build_peak_rss_mb']} | {r['report_bytes'] / 1e6:,.1f} MB | {r['report_files']:,} "
                     f"| {r['opened']} ({r['opened_bytes'] / 1e3:,.0f} kB) | {r['load_seconds_median']} "
                     f"| {gp if gp is not None else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="numbers of cases, comma-separated")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--profile", action="store_true", help="print where the build's time goes (cProfile)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="report-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append(measure(n, work, args.keep, args.profile))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "report_scale", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                 "python": platform.python_version()},
        "chromium": CHROMIUM, "image": f"{SIZE}x{SIZE}", "methods": list(METHODS), "page_size": 24,
        "single_file_max": 2000, "rows": rows}, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
