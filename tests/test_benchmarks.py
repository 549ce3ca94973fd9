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
