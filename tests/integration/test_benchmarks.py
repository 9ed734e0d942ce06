"""The benchmarks run in a quick mode and print their figures as JSON; here only their shape and consistency are
checked. Their timing targets are the benchmarks' and docs/performance.md's: on a shared, loaded 2-core machine
a ratio of two timings is no verdict on the code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raytrain_app.storage.location import parse_location
from tests.conftest import REPO_ROOT, base_env, make_bucket, s3_uri


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


def run_benchmark(script: str, *args: str, ray_address: str | None = None, timeout: float = 600) -> dict:
    env = base_env()
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def test_checkpoint_stall_on_a_local_folder_and_s3(s3_endpoint: str) -> None:
    uri = s3_uri(make_bucket(s3_endpoint, "stall"), "bench", s3_endpoint)
    # A 19 MB state: big enough that the copy into host memory is well below a plain save (about 0.2 of it
    # locally here, far less to S3), small enough for seconds.
    figures = run_benchmark("checkpoint_stall.py", "--hidden-dim", "256", "--num-layers", "2", "--num-heads", "4",
                            "--seq-len", "16", "--checkpoints", "2", "--steps-between", "3", "--s3-uri", uri)
    for storage in ("local", "s3"):
        f = figures[storage]
        assert f["state_mb"] > 10 and f["sync_torch_save_s"] > 0 and f["background_write_per_checkpoint_s"] > 0
        assert f["blocked_per_checkpoint_s"] > 0  # the copy into host memory was timed
    assert figures["local"]["state_mb"] == figures["s3"]["state_mb"]  # the same state, to both storages
    assert parse_location(uri).join("checkpoint-1", "manifest.json").is_file()  # written to the bucket, whole


@pytest.mark.e2e
def test_ray_overhead_runs_the_same_steps_both_ways(ray_address: str) -> None:
    figures = run_benchmark("ray_overhead.py", "--rows", "1024", "--epochs", "1", "--eval-every", "16",
                            "--hidden-dim", "32", "--repeats", "1", ray_address=ray_address)
    # The same 32 steps both ways (1024 rows, batch 32, 1 epoch): a comparison of like with like.
    assert figures["bare"]["steps"] == figures["ray_train_1_worker"]["steps"] == figures["steps"] == 32
    assert figures["bare"]["loop_s"] > 0 and figures["ray_train_1_worker"]["loop_s"] > 0


@pytest.mark.e2e
def test_tune_asha_stops_the_diverging_trial_and_times_both_sweeps(ray_address: str) -> None:
    # One trial at a time, the sensible one first: ASHA never stops the first trial to reach a rung.
    figures = run_benchmark("tune_asha.py", "--rows", "256", "--epochs", "3", "--lrs", "1e-3,3", "--eval-every", "2",
                            "--max-concurrent-trials", "1", ray_address=ray_address)
    assert figures["statuses"]["none"] == ["finished", "finished"]
    # ASHA stops the diverging trial (lr 3) and lets the sensible one finish, through the real sweep command.
    assert sorted(figures["statuses"]["asha"]) == ["finished", "stopped early"]
    assert figures["trials"] == 2 and figures["stopped_early_by_asha"] == 1


@pytest.mark.e2e
def test_recovery_kills_a_worker_of_both_runs_and_times_the_restart(ray_address: str) -> None:
    figures = run_benchmark("recovery.py", "--rows", "1024", "--eval-every", "5", "--kill-after-step", "10",
                            "--kill-delay", "0.2", ray_address=ray_address)
    ours, minimal = figures["service"], figures["minimal_ray_train_loop"]
    assert ours["cause"].startswith("worker restart") and ours["restored_step"] >= 10
    assert minimal["restored_step"] >= 10
    assert ours["kill_to_first_step_s"] > 0 and minimal["kill_to_first_step_s"] > 0


def test_gpu_throughput_runs_the_training_step_without_ray_on_cpu() -> None:
    figures = run_benchmark("gpu_throughput.py", "--hidden-dim", "32", "--num-layers", "1", "--num-heads", "2",
                            "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                            "--variants", "bf16,fp16+compile")
    assert figures["bf16"]["tokens_per_s"] > 0 and figures["fp16+compile"]["tokens_per_s"] > 0
    assert figures["bf16"]["mfu"] is None  # no known peak on a CPU
    assert figures["checkpoint"]["save_gb_per_s"] > 0 and figures["checkpoint"]["load_gb_per_s"] > 0
