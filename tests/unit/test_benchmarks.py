"""The benchmarks that need no Ray run in a quick mode and print their figures as JSON; here only their shape and
consistency are checked: every figure they promise, counts as asked, the same model on both sides of a comparison,
measurements that are finite and non-zero. Their timing targets are the benchmarks' and docs/performance.md's: on a
shared, loaded 2-core machine a ratio of two timings is no verdict on the code. The benchmarks on a cluster or on
S3: tests/integration/test_benchmarks.py."""

from __future__ import annotations

import math

import pytest

from tests.conftest import run_benchmark
from tests.helpers import positive


def test_data_throughput_prints_ratios_as_json() -> None:
    figures = run_benchmark("data_throughput.py", "--rows", "2048", "--seq-len", "8", "--feature-dim", "4",
                            timeout=300)
    assert set(figures) == {"dataset_1x_mb", "throughput_ratio_parquet_vs_pickle_1x",
                            "throughput_ratio_parquet_vs_pickle_4x", "reader_only_ratio_parquet_vs_pickle_1x",
                            "peak_memory_growth_1x_to_4x_parquet", "peak_memory_growth_1x_to_4x_pickle", "runs"}
    # The size asked for: 2048 rows of 8 x 4 float32 features at 1x.
    assert figures["dataset_1x_mb"] == pytest.approx(2048 * 8 * 4 * 4 / 2**20, abs=0.05)
    # Both readers at both sizes, each with the training step and as the reader alone.
    assert set(figures["runs"]) == {f"{reader}_{scale}x{alone}" for reader in ("pickle", "parquet")
                                    for scale in (1, 4) for alone in ("", "_reader_only")}
    for name, run in figures["runs"].items():
        assert set(run) == {"samples_per_s", "open_s", "peak_rss_mb"}, name
        assert all(positive(value) for value in run.values()), (name, run)
    for key in ("throughput_ratio_parquet_vs_pickle_1x", "throughput_ratio_parquet_vs_pickle_4x",
                "reader_only_ratio_parquet_vs_pickle_1x"):
        assert positive(figures[key]), key
    for key in ("peak_memory_growth_1x_to_4x_parquet", "peak_memory_growth_1x_to_4x_pickle"):
        assert math.isfinite(figures[key]) and figures[key] > -1, key  # a ratio of two peaks, minus 1


def test_gpu_throughput_runs_the_training_step_without_ray_on_cpu() -> None:
    figures = run_benchmark("gpu_throughput.py", "--hidden-dim", "32", "--num-layers", "1", "--num-heads", "2",
                            "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                            "--variants", "bf16,fp16+compile")
    assert set(figures) == {"device", "torch", "ray_installed", "target_mfu_bf16", "bf16", "fp16+compile",
                            "checkpoint"}
    assert figures["device"] == "cpu"  # the project's torch is the CPU wheel (pyproject.toml)
    bf16, compiled = figures["bf16"], figures["fp16+compile"]
    for variant in (bf16, compiled):
        assert set(variant) == {"params", "step_s", "tokens_per_s", "mfu"}, variant
        assert positive(variant["step_s"]) and positive(variant["tokens_per_s"]), variant
        # Every step trained the batch asked for: 2 sequences of 16 tokens.
        assert variant["tokens_per_s"] * variant["step_s"] == pytest.approx(2 * 16)
        assert variant["mfu"] is None  # no known peak on a CPU
    assert bf16["params"] == compiled["params"] > 0  # the same model both ways
    checkpoint = figures["checkpoint"]
    assert set(checkpoint) == {"state_gb", "copy_to_host_gb_per_s", "save_gb_per_s", "load_gb_per_s"}
    assert all(positive(value) for value in checkpoint.values()), checkpoint
    # The full training state was written: at least the fp32 weights and AdamW's two moments, 12 bytes a parameter.
    assert checkpoint["state_gb"] * 1e9 >= 12 * bf16["params"]
