"""The benchmarks that run on the session's Ray cluster or write to the local S3 server, run in a quick mode: each
must measure what it says it measures. Every figure it promises is there; both sides of a comparison did the same
work, in the counts asked for; every rate, ratio and difference it prints is recomputed here from the raw counts
and seconds it records (an inverted or mistaken formula fails); and what is true by construction holds (a command's
wall time holds its loop's, the first step after a restart comes after the kill). A benchmark with two halves runs
here only the half whose output is checked: the plain sweep beside ASHA's is the sweep tests' (test_tune_e2e.py),
the minimal Ray Train loop beside this service's recovery is Ray's own. Their timing targets are the benchmarks'
and docs/performance.md's: on a shared, loaded 2-core machine a ratio of two timings is no verdict on the code, so
nothing here bounds a time. The benchmarks without Ray: tests/unit/test_benchmarks.py."""

from __future__ import annotations

from typing import Any

import pytest
from pytest import approx

from raytrain_app.checkpoint.format import checkpoint_problem
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.storage.location import parse_location
from tests.conftest import make_bucket, s3_uri
from tests.helpers import positive


def test_checkpoint_stall_writes_the_checkpoints_asked_for_and_computes_its_ratios(benchmark: Any,
                                                                                   s3_endpoint: str) -> None:
    uri = s3_uri(make_bucket(s3_endpoint, "stall"), "bench", s3_endpoint)
    # A 19 MB state: big enough that the copy into host memory is well below a plain save (about 0.2 of it
    # locally here, far less to S3), small enough for seconds.
    figures = benchmark("checkpoint_stall.py", "--hidden-dim", "256", "--num-layers", "2", "--num-heads", "4",
                        "--seq-len", "16", "--checkpoints", "2", "--steps-between", "3", "--s3-uri", uri)
    assert set(figures) == {"device", "model", "local", "s3"}
    assert figures["device"] == "cpu" and figures["model"] == "hidden 256, 2 layers"
    params = sum(p.numel() for p in SequenceTransformer(TrainConfig(
        hidden_dim=256, num_layers=2, num_heads=4, feature_dim=32, seq_len=16, num_classes=8)).parameters())
    for storage in ("local", "s3"):
        f = figures[storage]
        raw = f["raw"]
        assert set(f) == {"state_mb", "sync_torch_save_s", "blocked_per_checkpoint_s",
                          "background_write_per_checkpoint_s", "blocked_vs_sync_save_ratio", "target_ratio",
                          "step_slowdown_beside_background_writes", "raw"}, storage
        # The full training state: at least the fp32 weights and AdamW's two moments, 12 bytes a parameter.
        assert f["state_mb"] >= round(12 * params / 1e6, 1), (storage, f, params)
        # Both sides as asked: 2 plain saves; 2 checkpoints, each reported once written, in order; 6 steps with no
        # checkpoint and the same 6 beside the background writes.
        assert len(raw["sync_torch_save_s_each"]) == 2 and raw["checkpoints"] == 2, (storage, raw)
        assert raw["reported"] == ["checkpoint-0", "checkpoint-1"], (storage, raw)
        assert raw["plain_steps"] == raw["steps_beside_writes"] == 6, (storage, raw)
        for seconds in (*raw["sync_torch_save_s_each"], raw["blocked_s"], raw["background_write_s"],
                        raw["plain_steps_s"], raw["steps_beside_writes_s"]):
            assert positive(seconds), (storage, raw)
        # The figures, from those seconds.
        sync_s = sum(raw["sync_torch_save_s_each"]) / 2
        assert f["sync_torch_save_s"] == approx(sync_s), storage
        assert f["blocked_per_checkpoint_s"] == approx(raw["blocked_s"] / 2), storage
        assert f["background_write_per_checkpoint_s"] == approx(raw["background_write_s"] / 2), storage
        assert f["blocked_vs_sync_save_ratio"] == approx(raw["blocked_s"] / 2 / sync_s), storage
        assert f["step_slowdown_beside_background_writes"] == approx(
            raw["steps_beside_writes_s"] / raw["plain_steps_s"] - 1), storage
    assert figures["local"]["state_mb"] == figures["s3"]["state_mb"]  # the same state, to both storages
    # Every save asked for reached the bucket: 2 plain saves and 2 checkpoint folders, each whole (its manifest
    # lists every file with its size and SHA-256).
    bench = parse_location(uri)
    assert [entry.base_name for entry in bench.list()] == ["checkpoint-0", "checkpoint-1", "plain-0.pt", "plain-1.pt"]
    for name in ("checkpoint-0", "checkpoint-1"):
        assert checkpoint_problem(bench.join(name)) is None, name


@pytest.mark.e2e
def test_ray_overhead_times_the_same_steps_both_ways_and_computes_its_ratio(benchmark: Any,
                                                                            ray_address: str) -> None:
    figures = benchmark("ray_overhead.py", "--rows", "1024", "--epochs", "1", "--eval-every", "16",
                        "--hidden-dim", "32", "--repeats", "1", ray_address=ray_address)
    assert set(figures) == {"steps", "bare", "ray_train_1_worker", "steps_per_s_ratio_ray_vs_bare", "target_ratio",
                            "repeats", "runs"}
    runs = figures["runs"]
    # One run of each, as asked.
    assert figures["repeats"] == 1 and {side: len(each) for side, each in runs.items()} == {"bare": 1, "ray": 1}
    for side, run in ((side, run) for side, each in runs.items() for run in each):
        assert set(run) == {"steps", "checkpoints", "loop_s", "steps_per_s"} | ({"command_s"} if side == "ray"
                                                                                 else set()), run
        # The same work both ways: 32 steps (1024 rows, batch 32, 1 epoch), checkpoints at step 16 and at the
        # epoch's end, as the Ray run's metrics.jsonl and the bare run's writer count them.
        assert (run["steps"], run["checkpoints"]) == (32, 2), (side, run)
        assert positive(run["loop_s"]), (side, run)
        assert run["steps_per_s"] == approx(run["steps"] / run["loop_s"]), (side, run)
    # The command's wall time holds the loop's, and Ray's start before it.
    assert runs["ray"][0]["command_s"] > runs["ray"][0]["loop_s"], runs
    # The figures are the best run of each side, and their ratio.
    best = {side: max(each, key=lambda run: run["steps"] / run["loop_s"]) for side, each in runs.items()}
    assert figures["bare"] == best["bare"] and figures["ray_train_1_worker"] == best["ray"]
    assert figures["steps"] == 32
    assert figures["steps_per_s_ratio_ray_vs_bare"] == approx(
        (best["ray"]["steps"] / best["ray"]["loop_s"]) / (best["bare"]["steps"] / best["bare"]["loop_s"]))


@pytest.mark.e2e
def test_tune_asha_stops_the_diverging_trial_early(benchmark: Any, ray_address: str) -> None:
    # Only the ASHA sweep (the plain one is the sweep tests'). One trial at a time, the sensible one first: ASHA
    # never stops the first trial to reach a rung.
    figures = benchmark("tune_asha.py", "--rows", "256", "--epochs", "3", "--lrs", "1e-3,3", "--eval-every", "2",
                        "--max-concurrent-trials", "1", "--only", "asha", ray_address=ray_address)
    assert set(figures) == {"trials", "asha"}  # no plain sweep, so no ratio
    asha = figures["asha"]
    assert set(asha) == {"wall_s", "stopped_early", "trials"}
    assert positive(asha["wall_s"]), asha
    # The two learning rates asked for, as the sweep's results.csv lists them.
    assert figures["trials"] == len(asha["trials"]) == 2, figures
    sensible, diverging = sorted(asha["trials"], key=lambda trial: trial["lr"])
    assert (sensible["lr"], diverging["lr"]) == (1e-3, 3.0), asha
    # A whole trial trains from the base (1 of 3 epochs) to the end: 2 epochs of 256 rows in batches of 32.
    assert sensible == {"lr": 1e-3, "status": "finished", "steps_trained": 2 * 256 // 32}, asha
    # ASHA stopped the diverging one at a rung (one of its reports, every 2 steps), before the end.
    assert diverging["status"] == "stopped early", asha
    assert 0 < diverging["steps_trained"] < 16 and diverging["steps_trained"] % 2 == 0, asha
    assert asha["stopped_early"] == 1


@pytest.mark.e2e
def test_recovery_times_the_restart_from_the_kill_to_the_first_step(benchmark: Any, ray_address: str) -> None:
    # Only this service's run (the minimal Ray Train loop it is compared with is Ray's own cost).
    figures = benchmark("recovery.py", "--rows", "1024", "--eval-every", "5", "--kill-after-step", "10",
                        "--kill-delay", "0.2", "--only", "service", ray_address=ray_address)
    assert set(figures) == {"service"}  # no minimal loop, so no difference
    ours = figures["service"]
    assert set(ours) == {"restored_step", "step_at_kill_at_least", "steps_lost", "kill_to_first_step_s", "cause",
                         "killed_at", "first_step_at"}
    # Ray Train restarted the workers, and the run resumed from the checkpoint registered before the kill (at step
    # 10 or later) or a later one: every 5 steps, or at the end of the first epoch (32 steps).
    assert ours["cause"].startswith("worker restart"), ours
    assert ours["restored_step"] >= 10 and (ours["restored_step"] % 5 == 0 or ours["restored_step"] == 32), ours
    assert ours["steps_lost"] == ours["step_at_kill_at_least"] - ours["restored_step"], ours
    # The first step after the restart came after the kill, and the figure is the time between them.
    assert ours["first_step_at"] > ours["killed_at"], ours
    assert ours["kill_to_first_step_s"] == approx(ours["first_step_at"] - ours["killed_at"]), ours


@pytest.mark.e2e
def test_predict_throughput_scores_the_same_rows_both_ways_and_computes_its_ratio(benchmark: Any,
                                                                                  ray_address: str) -> None:
    figures = benchmark("predict_throughput.py", "--rows", "2000", "--files", "2", "--seq-len", "8",
                        "--feature-dim", "4", "--hidden-dim", "16", "--num-heads", "2", "--num-replicas", "2",
                        "--repeats", "1", ray_address=ray_address)
    assert set(figures) == {"rows", "batch_size", "model", "bare", "ray_data", "rows_per_s_ratio_ray_vs_bare",
                            "target_ratio", "repeats", "runs"}
    runs = figures["runs"]
    assert figures["repeats"] == 1 and {side: len(each) for side, each in runs.items()} == {"bare": 1, "ray": 1}
    (bare,), (ray,) = runs["bare"], runs["ray"]
    assert set(bare) == {"rows", "loop_s", "rows_per_s", "read_s", "threads"}
    assert set(ray) == {"rows", "pipeline_s", "rows_per_s", "command_s", "replicas"}
    # The same 2000 rows both ways: every one scored by the bare loop, and by the command (its _SUCCESS summary
    # counts the rows it wrote).
    assert figures["rows"] == bare["rows"] == ray["rows"] == 2000
    assert ray["replicas"] == "2 x 1 CPU, batch 256"  # the pool asked for
    for value in (bare["loop_s"], bare["read_s"], ray["pipeline_s"]):
        assert positive(value), figures
    assert bare["rows_per_s"] == approx(bare["rows"] / bare["loop_s"])
    assert ray["rows_per_s"] == approx(ray["rows"] / ray["pipeline_s"])
    # The command's wall time holds its pipeline's, and joining Ray before it.
    assert ray["command_s"] > ray["pipeline_s"], ray
    assert figures["bare"] == bare and figures["ray_data"] == ray
    assert figures["rows_per_s_ratio_ray_vs_bare"] == approx(
        (ray["rows"] / ray["pipeline_s"]) / (bare["rows"] / bare["loop_s"]))
