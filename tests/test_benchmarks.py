"""The benchmark scripts still run (a smoke run at tiny settings; no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attribution_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attribution.py"), "--quick", "--size", "32", "--images", "1",
         "--repeats", "1", "--models", "small-resnet", "--methods", "saliency,integrated_gradients,occlusion,lime",
         "--json", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["saliency", "integrated_gradients", "occlusion", "lime"]
    for r in rows:
        assert r["floor_s"] > 0 and r["ours_auto_s"] > 0 and r["captum_best_s"] > 0
        assert r["evals_per_image"] >= 1
    assert "| integrated_gradients |" in proc.stdout


@pytest.mark.slow
def test_counterfactual_benchmark_smoke(tmp_path):
    """benchmarks/counterfactual.py at its quick settings: both searches run on the digits CNN and the
    results agree with what each method reported."""
    out = tmp_path / "cf.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "counterfactual.py"), "--quick", "--models", "digits", "--no-im1",
         "--json", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["naive loop", "counterlens"]
    for r in rows:
        assert r["images"] == 8 and r["seconds"] > 0 and 0 <= r["validity"] <= 1
        assert r["reported_valid_agrees"]
    assert rows[1]["validity"] >= 0.75
