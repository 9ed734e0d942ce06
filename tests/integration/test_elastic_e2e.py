"""Elastic training on a real two-node cluster on this machine: the node running one of two workers is announced
for preemption (the workers save the current step) and then lost mid-training, and a `--num-workers 1-2` run
continues from its latest checkpoint on the node that is left, with the same effective batch (so the same
number of steps), and finishes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raytrain_app.checkpoint.format import load_state
from raytrain_app.cli.flags import parse_config
from tests.conftest import (
    REPO_ROOT,
    base_env,
    finish_process,
    latest_checkpoint_step,
    start_process,
    write_dataset,
)
from tests.helpers import TINY_MODEL, ckpt

pytestmark = pytest.mark.e2e

EPOCHS, BATCH, ROWS = 3, 8, 2048
STEPS_PER_EPOCH = ROWS // (2 * BATCH)  # 2 workers, or 1 worker accumulating 2 micro-batches: 128 either way
LAST_STEP = EPOCHS * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Long enough (about 10 s of training here) for the notice and the loss to land mid-run."""
    return write_dataset(tmp_path_factory.mktemp("elastic-data") / "train.pkl", num_train=ROWS)


def cluster_env() -> dict[str, str]:
    # A lost node is declared dead after about 1.5 s instead of Ray's default of about 15 s. Right after the
    # loss Ray Train may still see the lost node's CPU and try two workers again until its worker-group start
    # timeout (60 s by default; README, "Elastic training") before it settles on one: 10 s here.
    # Ray Train's preemption watcher (off on the session cluster) looks for notices (drained nodes) every 0.5 s
    # instead of every 5 s.
    return {**base_env(), "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}


@pytest.fixture
def two_nodes():  # noqa: ANN201
    """A head and a second node with one CPU each (tests.helpers.two_node_cluster, a process of its own), so two
    1-CPU workers land one per node. Yields (address, the second node's id, a function that drains or removes the
    second node)."""
    temp_dir = tempfile.mkdtemp(prefix="rt2-", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers", "two-node-cluster", temp_dir], cwd=REPO_ROOT,
                            env=cluster_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)

    def second_node(command: str) -> None:
        """`drain` it (a preemption notice) or `remove` it (lost)."""
        proc.stdin.write(f"{command}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == {"drain": "drained", "remove": "removed"}[command]

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


def test_losing_a_node_shrinks_the_run_which_resumes_from_its_latest_checkpoint_and_finishes(
        tmp_path: Path, dataset: Path, two_nodes) -> None:  # noqa: ANN001
    address, second_node_id, second_node = two_nodes
    args = ["--data", str(dataset), "--save-dir", str(tmp_path), "--num-workers", "1-2", "--batch-size", str(BATCH),
            "--epochs", str(EPOCHS), "--eval-every", "32", *TINY_MODEL]
    run_dir = tmp_path / parse_config(args)[0].default_run_name()
    log_path = tmp_path / "train.log"
    proc, log = start_process(args, address, extra_env=cluster_env(), log_path=log_path)
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint_step(run_dir) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the node was lost"
            time.sleep(0.05)
        # The cloud announces the reclaim (Ray drains the node for preemption): the workers checkpoint the step
        # they are at and keep training.
        second_node("drain")
        # Ray places the two workers on the two nodes in either order: the lost one runs rank 0 or rank 1.
        notice = re.compile(rf"Preemption notice for node\(s\) {second_node_id} \(ranks \[[01]\]\): checkpointing "
                            r"global step (\d+)")
        while not (match := notice.search(log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, "the preemption notice did not arrive"
            time.sleep(0.05)
        saved_on_notice = int(match.group(1))
        while (killed_at := latest_checkpoint_step(run_dir) or 0) < saved_on_notice:  # registered by Ray
            assert proc.poll() is None and time.monotonic() < deadline, "the notice's checkpoint was not registered"
            time.sleep(0.05)
        second_node("remove")
    finally:
        output = finish_process(proc, log, timeout=300)
    assert proc.returncode == 0, output
    assert "Workers: 1-2 x CPU, batch 8 per worker, accumulation 1 (effective batch 16" in output
    loads = re.findall(r"Workers loaded .*? global step (\d+), batch \d+; (\d+) worker\(s\), (\d+) micro", output)
    assert loads, output
    step, world, accumulation = loads[-1]
    assert int(step) >= killed_at >= saved_on_notice, output  # from the latest checkpoint when the node went
    assert f"step {saved_on_notice} train_ema_loss" in output  # a checkpoint of that step was written
    assert (world, accumulation) == ("1", "2"), output  # one worker left, accumulating for two
    final = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))
    assert final["global_step"] == LAST_STEP and final["epoch"] == EPOCHS  # the same steps with one worker
    assert final["data_position"]["world_size"] == 1
    assert len(final["rng_states"]) == 1  # the checkpoint holds what the current world size needs
