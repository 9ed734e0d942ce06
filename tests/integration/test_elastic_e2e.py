"""Elastic training on a real two-node cluster on this machine: the node running one of two workers is announced
for preemption (the workers save the current step) and then lost mid-training; a `--num-workers 1-2` run
continues from its latest checkpoint on the node that is left, with the same effective batch (so the same
number of steps), grows back to two workers when a replacement node joins, and finishes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raytrain_app.checkpoint.format import load_state
from raytrain_app.cli.flags import parse_config
from tests.conftest import (
    REPO_ROOT,
    base_env,
    finish_process,
    latest_checkpoint_step,
    slow_resource,
    start_process,
    wait_until,
    write_dataset,
)
from tests.helpers import TINY_MODEL, ckpt

pytestmark = pytest.mark.e2e

EPOCHS, BATCH, ROWS = 4, 8, 256
STEPS_PER_EPOCH = ROWS // (2 * BATCH)  # 2 workers, or 1 worker accumulating 2 micro-batches: 16 either way
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
# The workers' fault-injection delay after each step, read from a file at every step: slow (64 steps would take
# 45 s, asleep: the other test worker has the cores) until the notice, the loss, the restart on one node and the
# growth back to two have landed mid-run, then none. Growth waits for Ray Train's view of the cluster's resources,
# which its autoscaling coordinator refreshes every 20 s (ray.data's _AutoscalingCoordinatorActor.TICK_INTERVAL_S),
# then for the resize check (every 2 s here).
STEP_DELAY_S = "0.7"


def cluster_env(delay_file: Path | None = None) -> dict[str, str]:
    # A lost node is declared dead after about 1.5 s instead of Ray's default of about 15 s. Right after the
    # loss Ray Train may still see the lost node's CPU and try two workers again until its worker-group start
    # timeout (60 s by default; README, "Elastic training") before it settles on one: 10 s here.
    # Ray Train's preemption watcher (off on the session cluster) looks for notices (drained nodes) every 0.5 s
    # instead of every 5 s.
    # An elastic run looks for more room every 2 s instead of every 60 s (RAYTRAIN_ELASTIC_RESIZE_INTERVAL_S).
    return {**base_env(), "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
            "RAYTRAIN_ELASTIC_RESIZE_INTERVAL_S": "2",
            **({"RAYTRAIN_TEST_STEP_DELAY_S": f"@{delay_file}"} if delay_file else {})}


@pytest.fixture
@slow_resource
def two_nodes():
    """A head and a second node with one CPU each (tests.helpers.two_node_cluster, a process of its own), so two
    1-CPU workers land one per node. Yields (address, the second node's id, a function that drains or removes the
    second node)."""
    temp_dir = tempfile.mkdtemp(prefix="rt2-", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers", "two-node-cluster", temp_dir], cwd=REPO_ROOT,
                            env=cluster_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)

    def second_node(command: str) -> None:
        """`drain` it (a preemption notice), `remove` it (lost) or `add` a new one (its replacement)."""
        proc.stdin.write(f"{command}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == {"drain": "drained", "remove": "removed", "add": "added"}[command]

    try:
        address, second_node_id = proc.stdout.readline().split()
        yield address, second_node_id, second_node
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_losing_a_node_shrinks_the_run_which_grows_back_when_a_node_returns_and_finishes(
        tmp_path: Path, two_nodes) -> None:
    address, second_node_id, second_node = two_nodes
    dataset = write_dataset(tmp_path / "train.pkl", num_train=ROWS)
    args = ["--data", str(dataset), "--save-dir", str(tmp_path), "--num-workers", "1-2", "--batch-size", str(BATCH),
            "--epochs", str(EPOCHS), "--eval-every", "4", *TINY_MODEL]
    run_dir = tmp_path / parse_config(args)[0].default_run_name()
    log_path, delay = tmp_path / "train.log", tmp_path / "step-delay"
    delay.write_text(STEP_DELAY_S)
    loads = re.compile(r"Workers loaded .*? global step (\d+), batch \d+; (\d+) worker\(s\), (\d+) micro")
    proc, log = start_process(args, address, extra_env=cluster_env(delay), log_path=log_path)
    try:
        wait_until(lambda: latest_checkpoint_step(run_dir), "a checkpoint before the node is lost", proc=proc,
                   log=log_path, timeout=180)
        # The cloud announces the reclaim (Ray drains the node for preemption): the workers checkpoint the step
        # they are at and keep training.
        second_node("drain")
        # Ray places the two workers on the two nodes in either order: the lost one runs rank 0 or rank 1.
        notice = re.compile(rf"Preemption notice for node\(s\) {second_node_id} \(ranks \[[01]\]\): checkpointing "
                            r"global step (\d+)")
        saved_on_notice = int(wait_until(lambda: notice.search(log_path.read_text()), "the preemption notice",
                                         proc=proc, log=log_path).group(1))
        killed_at = wait_until(lambda: (latest_checkpoint_step(run_dir) or 0) >= saved_on_notice
                               and latest_checkpoint_step(run_dir), "the notice's checkpoint registered by Ray",
                               proc=proc, log=log_path)
        second_node("remove")
        # Restarted on the node that is left, then a replacement node joins: the run grows back to two workers.
        wait_until(lambda: [m for m in loads.findall(log_path.read_text()) if m[1] == "1"],
                   "a restart with one worker", proc=proc, log=log_path, timeout=180)
        second_node("add")
        wait_until(lambda: [m for m in loads.findall(log_path.read_text()) if m[1] == "2"],
                   "a restart with two workers again", proc=proc, log=log_path, timeout=180)
        delay.write_text("0")  # seen: the rest at full speed
    finally:
        output = finish_process(proc, log, timeout=300)
    assert proc.returncode == 0, output
    assert "Workers: 1-2 x CPU, batch 8 per worker, accumulation 1 (effective batch 16" in output
    restarts = [(int(step), int(world), int(accumulation)) for step, world, accumulation in loads.findall(output)]
    assert [(world, accumulation) for _, world, accumulation in restarts] == [(1, 2), (2, 1)], output
    (shrunk_at, _, _), (grown_at, _, _) = restarts
    assert shrunk_at >= killed_at >= saved_on_notice, output  # from the latest checkpoint when the node went
    assert f"step {saved_on_notice} train_ema_loss" in output  # a checkpoint of that step was written
    assert shrunk_at <= grown_at < LAST_STEP, output  # grown back before the end, from a checkpoint
    final = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))
    assert final["global_step"] == LAST_STEP and final["epoch"] == EPOCHS  # the same steps at every size
    assert final["data_position"]["world_size"] == 2
    assert len(final["rng_states"]) == 2  # the checkpoint holds what the current world size needs
