"""The benchmarks run and print their figures as JSON (small sizes here; the README has full-size figures)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_data_throughput_prints_ratios_as_json() -> None:
    result = subprocess.run([sys.executable, "benchmarks/data_throughput.py", "--rows", "2048", "--seq-len", "8",
                             "--feature-dim", "4"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("throughput_ratio_parquet_vs_pickle_1x", "throughput_ratio_parquet_vs_pickle_4x",
                "peak_memory_growth_1x_to_4x_parquet", "peak_memory_growth_1x_to_4x_pickle"):
        assert isinstance(figures[key], float), key
    assert all(run["samples_per_s"] > 0 and run["peak_rss_mb"] > 0 for run in figures["runs"].values())
    assert len(figures["runs"]) == 8  # 2 readers x 2 sizes x (with step, reader only)
