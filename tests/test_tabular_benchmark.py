"""The tabular benchmark script still runs (counterlens side only: DiCE lives in .venv-bench)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tabular_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tabular_benchmark", ROOT / "benchmarks" / "tabular_counterfactual.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--no-dice", "--tasks", "credit", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["counterlens", "counterlens (plausibility 0.8)"]
    for row in rows:
        assert row["violations"] == 0 and row["found"] == 1.0 and row["s_per_query"] > 0
    assert rows[1]["ynn"] > rows[0]["ynn"]
    assert "| credit | counterlens |" in capsys.readouterr().out
