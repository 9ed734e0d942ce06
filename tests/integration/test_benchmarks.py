"""The benchmarks that run on the session's Ray cluster or write to the local S3 server run in a quick mode and
print their figures as JSON; here only their shape and consistency are checked: every figure they promise, counts
as asked, the same steps on both sides of a comparison, measurements that are finite and non-zero. Their timing
targets are the benchmarks' and docs/performance.md's: on a shared, loaded 2-core machine a ratio of two timings
is no verdict on the code. The benchmarks without Ray: tests/unit/test_benchmarks.py."""

from __future__ import annotations

import math

import pytest

from raytrain_app.checkpoint.format import checkpoint_problem
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.storage.location import parse_location
from tests.conftest import make_bucket, run_benchmark, s3_uri
from tests.helpers import positive


def test_checkpoint_stall_on_a_local_folder_and_s3(s3_endpoint: str) -> None:
    uri = s3_uri(make_bucket(s3_endpoint, "stall"), "bench", s3_endpoint)
    # A 19 MB state: big enough that the copy into host memory is well below a plain save (about 0.2 of it
    # locally here, far less to S3), small enough for seconds.
    figures = run_benchmark("checkpoint_stall.py", "--hidden-dim", "256", "--num-layers", "2", "--num-heads", "4",
                            "--seq-len", "16", "--checkpoints", "2", "--steps-between", "3", "--s3-uri", uri)
    assert set(figures) == {"device", "model", "local", "s3"}
    assert figures["device"] == "cpu" and figures["model"] == "hidden 256, 2 layers"
    params = sum(p.numel() for p in SequenceTransformer(TrainConfig(
        hidden_dim=256, num_layers=2, num_heads=4, feature_dim=32, seq_len=16, num_classes=8)).parameters())
    for storage in ("local", "s3"):
        f = figures[storage]
        assert set(f) == {"state_mb", "sync_torch_save_s", "blocked_per_checkpoint_s",
                          "background_write_per_checkpoint_s", "blocked_vs_sync_save_ratio", "target_ratio",
                          "step_slowdown_beside_background_writes"}, storage
        # The full training state: at least the fp32 weights and AdamW's two moments, 12 bytes a parameter.
        assert f["state_mb"] >= round(12 * params / 1e6, 1), (storage, f, params)
        for key in ("sync_torch_save_s", "blocked_per_checkpoint_s", "background_write_per_checkpoint_s",
                    "blocked_vs_sync_save_ratio"):
            assert positive(f[key]), (storage, key, f)  # the save, the copy to host memory and the write timed
        assert math.isfinite(f["step_slowdown_beside_background_writes"]), f
    assert figures["local"]["state_mb"] == figures["s3"]["state_mb"]  # the same state, to both storages
    # Every save asked for reached the bucket: 2 plain saves and 2 checkpoint folders, each whole (its manifest
    # lists every file with its size and SHA-256).
    bench = parse_location(uri)
    assert [entry.base_name for entry in bench.list()] == ["checkpoint-0", "checkpoint-1", "plain-0.pt", "plain-1.pt"]
    for name in ("checkpoint-0", "checkpoint-1"):
        assert checkpoint_problem(bench.join(name)) is None, name


@pytest.mark.e2e
def test_ray_overhead_runs_the_same_steps_both_ways(ray_address: str) -> None:
    figures = run_benchmark("ray_overhead.py", "--rows", "1024", "--epochs", "1", "--eval-every", "16",
                            "--hidden-dim", "32", "--repeats", "1", ray_address=ray_address)
    assert set(figures) == {"steps", "bare", "ray_train_1_worker", "steps_per_s_ratio_ray_vs_bare", "target_ratio",
                            "repeats", "all_steps_per_s"}
    bare, ray = figures["bare"], figures["ray_train_1_worker"]
    # The same 32 steps both ways (1024 rows, batch 32, 1 epoch): a comparison of like with like.
    assert bare["steps"] == ray["steps"] == figures["steps"] == 32
    # One run of each, as asked.
    assert figures["repeats"] == 1
    assert {side: len(rates) for side, rates in figures["all_steps_per_s"].items()} == {"bare": 1, "ray": 1}
    assert set(bare) == {"steps", "loop_s", "steps_per_s"}
    assert set(ray) == {"steps", "loop_s", "steps_per_s", "command_s"}
    assert positive(bare["loop_s"]) and positive(ray["loop_s"]) and positive(ray["command_s"]), figures
    assert positive(figures["steps_per_s_ratio_ray_vs_bare"]), figures


@pytest.mark.e2e
def test_tune_asha_stops_the_diverging_trial_and_times_both_sweeps(ray_address: str) -> None:
    # One trial at a time, the sensible one first: ASHA never stops the first trial to reach a rung.
    figures = run_benchmark("tune_asha.py", "--rows", "256", "--epochs", "3", "--lrs", "1e-3,3", "--eval-every", "2",
                            "--max-concurrent-trials", "1", ray_address=ray_address)
    assert set(figures) == {"trials", "wall_s_asha", "wall_s_none", "wall_ratio_asha_vs_none",
                            "stopped_early_by_asha", "statuses"}
    assert figures["trials"] == 2  # the two learning rates asked for, in each sweep
    assert figures["statuses"]["none"] == ["finished", "finished"]  # without a scheduler every trial finishes
    # ASHA stops the diverging trial (lr 3) and lets the sensible one finish, through the real sweep command.
    assert sorted(figures["statuses"]["asha"]) == ["finished", "stopped early"]
    assert figures["stopped_early_by_asha"] == 1
    assert positive(figures["wall_s_asha"]) and positive(figures["wall_s_none"]), figures


@pytest.mark.e2e
def test_recovery_kills_a_worker_of_both_runs_and_times_the_restart(ray_address: str) -> None:
    figures = run_benchmark("recovery.py", "--rows", "1024", "--eval-every", "5", "--kill-after-step", "10",
                            "--kill-delay", "0.2", ray_address=ray_address)
    assert set(figures) == {"service", "minimal_ray_train_loop", "extra_recovery_s_vs_minimal"}
    ours, minimal = figures["service"], figures["minimal_ray_train_loop"]
    assert set(ours) == {"restored_step", "step_at_kill_at_least", "steps_lost", "kill_to_first_step_s", "cause"}
    assert set(minimal) == {"restored_step", "step_at_kill", "steps_lost", "kill_to_first_step_s"}
    # Both were killed once a checkpoint at step 10 or later was registered, and resumed from it or a later one.
    assert ours["cause"].startswith("worker restart") and ours["restored_step"] >= 10
    # The minimal loop checkpoints every 5 steps (--eval-every) and rewrites its step file before each report: it
    # resumed from one of those checkpoints, written no later than the step it was killed at.
    assert minimal["restored_step"] >= 10 and minimal["restored_step"] % 5 == 0
    assert minimal["step_at_kill"] >= minimal["restored_step"], minimal
    # The first step after the restart came after the kill.
    assert positive(ours["kill_to_first_step_s"]) and positive(minimal["kill_to_first_step_s"]), figures
    assert math.isfinite(figures["extra_recovery_s_vs_minimal"])


@pytest.mark.e2e
def test_predict_throughput_scores_the_same_rows_both_ways(ray_address: str) -> None:
    figures = run_benchmark("predict_throughput.py", "--rows", "2000", "--files", "2", "--seq-len", "8",
                            "--feature-dim", "4", "--hidden-dim", "16", "--num-heads", "2", "--num-replicas", "2",
                            "--repeats", "1", ray_address=ray_address)
    assert set(figures) == {"rows", "batch_size", "model", "bare", "ray_data", "rows_per_s_ratio_ray_vs_bare",
                            "target_ratio", "repeats", "all_rows_per_s"}
    bare, ray = figures["bare"], figures["ray_data"]
    # The same 2000 rows both ways, every one scored by the command (its _SUCCESS summary counts them).
    assert figures["rows"] == bare["rows"] == ray["rows"] == 2000
    assert set(bare) == {"rows", "loop_s", "rows_per_s", "read_s", "threads"}
    assert set(ray) == {"rows", "pipeline_s", "rows_per_s", "command_s", "replicas"}
    assert ray["replicas"] == "2 x 1 CPU, batch 256"  # the pool asked for
    assert {side: len(rates) for side, rates in figures["all_rows_per_s"].items()} == {"bare": 1, "ray": 1}
    for value in (bare["loop_s"], bare["rows_per_s"], ray["pipeline_s"], ray["command_s"],
                  figures["rows_per_s_ratio_ray_vs_bare"]):
        assert positive(value), figures
