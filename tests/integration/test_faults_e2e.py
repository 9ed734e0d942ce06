"""Faults injected for real on the session's Ray cluster: workers SIGKILLed at random moments, a worker killed
in the middle of writing a checkpoint, a damaged latest checkpoint, and a run that diverges. Nothing is lost:
each run ends bit-identical to an uninterrupted one, or says exactly how to continue."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest

from raytrain_app.checkpoint.format import checkpoint_problem, load_state
from raytrain_app.cli.flags import parse_config
from raytrain_app.observability.metrics import read_rows
from raytrain_app.storage.location import parse_location
from tests.conftest import (
    computed_once,
    finish_process,
    latest_checkpoint_step,
    run_main,
    run_until_checkpoint,
    start_process,
)
from tests.helpers import (
    LAST_STEP,
    MID_EPOCH_2,
    assert_resumed_mid_epoch,
    assert_same_training_state,
    ckpt,
    flip_a_byte,
    train_args,
)

pytestmark = pytest.mark.e2e

CHAOS_SEED = 2026


def wait_for(condition, what: str, proc, log_path: Path, timeout: float = 120) -> object:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {what}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.002)
    return value


def restores(log_path: Path) -> list[str]:
    """What the workers loaded at each (re)start, as rank 0 prints it."""
    return re.findall(r"Workers loaded (\S+):", log_path.read_text())


def train_workers(log_path: Path) -> dict[int, int]:
    """rank -> pid of the run's current Ray Train workers, from the group Ray Train last said it started (other
    RayTrainWorker processes on the cluster may be a finished run's, still exiting)."""
    ranks: dict[int, int] = {}
    for pid, rank in re.findall(r"- \(ip=[\d.]+, pid=(\d+)\) world_rank=(\d+)", log_path.read_text()):
        ranks[int(rank)] = int(pid)
    assert ranks, "Ray Train has not started a worker group yet"
    return ranks


def kill_a_train_worker(log_path: Path, rank: int) -> None:
    os.kill(train_workers(log_path)[rank], signal.SIGKILL)


def registered_step(run_dir: Path) -> int:
    """The step of the run's latest registered checkpoint, read again if caught while Ray rewrites its record."""
    while (step := latest_checkpoint_step(run_dir)) is None:
        time.sleep(0.01)
    return step


def test_workers_killed_three_times_at_random_moments_and_the_run_ends_bit_exact(
        tmp_path: Path, dataset: Path, ray_address: str, uninterrupted) -> None:  # noqa: ANN001
    """Three SIGKILLs of a Ray Train worker in one run, at seeded random checkpoints and random delays after them:
    Ray Train restarts the worker group each time from the latest checkpoint (the default --max-failures is 3),
    and the run ends with the same bits as one never interrupted."""
    reference = uninterrupted(2)
    rng = random.Random(CHAOS_SEED)
    args = train_args(dataset, tmp_path / "runs", 2)
    assert parse_config(args)[0].max_failures >= 3  # the default
    run_dir = tmp_path / "runs" / parse_config(args)[0].default_run_name()
    log_path = tmp_path / "train.log"
    proc, log = start_process(args, ray_address, log_path=log_path)
    killed_after = []
    try:
        for kill, window in enumerate([(3, 12), (18, 27), (30, 39)]):
            target = rng.randint(*window)
            wait_for(lambda kill=kill, target=target: len(restores(log_path)) == kill
                     and (latest_checkpoint_step(run_dir) or 0) >= target,
                     f"a checkpoint at step {target} after {kill} restart(s)", proc, log_path)
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the steps after it
            killed_after.append(registered_step(run_dir))
            kill_a_train_worker(log_path, rank=rng.choice(sorted(train_workers(log_path))))
        output = finish_process(proc, log, timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    loaded = restores(log_path)
    assert len(loaded) == 3, output  # one restore per kill, each from the run's own latest checkpoint
    for path, at_kill in zip(loaded, killed_after, strict=True):
        assert int(path.rsplit("=", 1)[1]) >= at_kill, (path, at_kill)
    assert_same_training_state(reference, ckpt(run_dir, LAST_STEP) / "state.pt")


def big_args(dataset: Path, save_dir: Path, *extra: str) -> list[str]:
    """A model big enough (a 37 MB state) that writing a checkpoint takes a while: 32 steps, a checkpoint every
    8 (16 and 32 end the epochs)."""
    return ["--data", str(dataset), "--save-dir", str(save_dir), "--num-workers", "1", "--epochs", "2",
            "--batch-size", "16", "--eval-every", "8", "--hidden-dim", "256", "--num-layers", "4", "--num-heads", "4",
            *extra]


def big_run(save_dir: Path, dataset: Path, ray_address: str, *extra: str) -> dict:
    result = run_main(big_args(dataset, save_dir, *extra), ray_address)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = save_dir / parse_config(big_args(dataset, save_dir))[0].default_run_name()
    last = [r for r in read_rows(parse_location(str(run_dir / "metrics.jsonl"))) if r["kind"] == "checkpoint"][-1]
    return {"final": str(ckpt(run_dir, 32) / "state.pt"), "blocked_s": last["checkpoint_blocked_total_s"],
            "write_s": last["checkpoint_write_total_s"]}


@pytest.fixture(scope="session")
def big_reference(shared_tmp: Path, dataset: Path, ray_address: str) -> dict:
    """The big model trained uninterrupted, with every checkpoint written on the training path."""
    return computed_once(shared_tmp, "big-sync",
                         lambda folder: big_run(folder, dataset, ray_address, "--no-async-checkpoint"))


def test_checkpoints_written_in_the_background_end_bit_exact(
        tmp_path: Path, dataset: Path, ray_address: str, big_reference: dict) -> None:
    """The same run with checkpoints written in the background (the default) and on the training path: the same
    bits at the end. Both runs time the training thread's waits and the writes with the same clock; how much less
    the background run waits is benchmarks/checkpoint_stall.py's figure (a loaded machine is no judge of it)."""
    background = big_run(tmp_path / "async", dataset, ray_address)
    assert_same_training_state(Path(big_reference["final"]), Path(background["final"]), last_step=32, epochs=2)
    for run in (background, big_reference):
        assert run["blocked_s"] > 0 and run["write_s"] > 0, run  # every checkpoint was written and waited for


def test_a_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
        tmp_path: Path, dataset: Path, ray_address: str, big_reference: dict) -> None:
    """The worker is SIGKILLed while a checkpoint is being written in the background (its state.pt seen half
    copied into the run folder; training has gone on meanwhile). That folder is never taken for whole: the restart
    loads the previous checkpoint, --resume-from-checkpoint refuses the cut-off folder, and the run then finishes
    with the same bits as an uninterrupted run."""
    args = big_args(dataset, tmp_path / "runs")
    run_dir = tmp_path / "runs" / parse_config(args)[0].default_run_name()
    log_path = tmp_path / "train.log"
    proc, log = start_process(args, ray_address, log_path=log_path)

    def partly_copied() -> Path | None:
        """A checkpoint folder newer than the registered one whose state.pt is at most half there."""
        registered = latest_checkpoint_step(run_dir) or 0
        if registered < 8:
            return None
        try:
            whole_size = (ckpt(run_dir, registered) / "state.pt").stat().st_size
            for folder in run_dir.glob("checkpoint_step=*"):
                state = folder / "state.pt"
                if int(folder.name.split("=")[1]) > registered and 0 < state.stat().st_size < whole_size / 2:
                    return folder
        except FileNotFoundError:  # a folder Ray is deleting, a state.pt not created yet: look again
            pass
        return None

    try:
        torn = wait_for(partly_copied, "a checkpoint folder caught half copied", proc, log_path)
        kill_a_train_worker(log_path, rank=0)  # rank 0 copies the checkpoint into the run folder
        # Kept as the kill left it: the restarted workers write this step's folder again later.
        shutil.copytree(torn, tmp_path / torn.name)
        previous = registered_step(run_dir)
        problem = checkpoint_problem(str(tmp_path / torn.name))
        refused = run_main(["--resume-from-checkpoint", str(tmp_path / torn.name), "--data", str(dataset),
                            "--save-dir", str(tmp_path / "fork")], timeout=120)
        output = finish_process(proc, log, timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert problem is not None, f"{torn} was whole when the worker died: the kill came too late"
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"checkpoint --resume-from-checkpoint {tmp_path / torn.name} is not whole" in refused.stderr
    assert not (tmp_path / "fork").exists()
    assert proc.returncode == 0, output
    assert restores(log_path) == [str(ckpt(run_dir, previous))], output
    final = sorted(run_dir.glob("checkpoint_step=*"))
    assert final[-1].name == "checkpoint_step=000032" and all(checkpoint_problem(str(p)) is None for p in final)
    assert load_state(str(tmp_path / "runs" / "best_model.pt"))["global_step"] > 0  # best_model.pt is whole
    assert_same_training_state(Path(big_reference["final"]), final[-1] / "state.pt", last_step=32, epochs=2)


def test_a_damaged_latest_checkpoint_falls_back_and_the_run_ends_bit_exact(
        tmp_path: Path, parquet_dataset: Path, ray_address: str, uninterrupted) -> None:  # noqa: ANN001
    """Two workers reading the Parquet copy of the data are killed after a mid-epoch checkpoint; the checkpoint
    Ray's record names as the latest then has one byte flipped (storage rot). The re-run names it, continues
    mid-epoch from the checkpoint before it (and Ray restores that one too), and ends with the same bits as an
    uninterrupted run from the pickle (both formats serve the same rows in the same order)."""
    reference = uninterrupted(2)
    # Every checkpoint kept (not what is trained): the one before the damaged one is in Ray's record, inside
    # epoch 2 since the kill comes at step 21 or later.
    args = train_args(parquet_dataset, tmp_path / "runs", 2)
    args[args.index("--keep-checkpoints") + 1] = "100"
    run_dir = tmp_path / "runs" / parse_config(args)[0].default_run_name()
    run_until_checkpoint(args, ray_address, run_dir, MID_EPOCH_2 - {18})
    # Ray ends the killed driver's run a moment later (longer on a loaded machine) and may register one more
    # checkpoint meanwhile: damage the one its record names once that has stopped moving.
    latest = registered_step(run_dir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(2)
        if (now := registered_step(run_dir)) == latest:
            break
        latest = now
    record = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    recorded = [int(r["checkpoint_dir_name"].split("=")[1]) for r in record["checkpoint_results"]]
    fallback = max(step for step in recorded if step < latest)  # Ray's newest other record of the run
    flip_a_byte(ckpt(run_dir, latest) / "state.pt")

    resumed = run_main(args, ray_address)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (f"checkpoint {ckpt(run_dir, latest)} is not whole: state.pt does not match the SHA-256 in its "
            "manifest (damaged)") in resumed.stdout
    assert assert_resumed_mid_epoch(resumed.stdout, min(MID_EPOCH_2)) == fallback
    assert f"Workers loaded {ckpt(run_dir, fallback)}:" in resumed.stdout, resumed.stdout
    assert_same_training_state(reference, ckpt(run_dir, LAST_STEP) / "state.pt")


def test_a_diverging_fine_tune_stops_and_says_how_to_resume_from_the_last_good_checkpoint(
        tmp_path: Path, dataset: Path, ray_address: str, uninterrupted) -> None:  # noqa: ANN001
    """Fine-tuning a trained model on 2 workers with an absurd learning rate: step 1 of the new run makes the
    weights overflow, every later loss is non-finite and its step skipped, on both ranks alike. Three in a row stop
    the run (exit 3), naming the steps; the new run has no checkpoint with a finite validation loss, so the printed
    command forks again from the checkpoint it started from, with half the learning rate."""
    base = uninterrupted(2).parent  # a trained model's last checkpoint folder
    args = ["--data", str(dataset), "--save-dir", str(tmp_path / "runs"), "--num-workers", "2", "--batch-size", "8",
            "--epochs", "4", "--eval-every", "1", "--lr", "1e30", "--max-skipped-steps", "3",
            "--resume-from-checkpoint", str(base)]
    result = run_main(args, ray_address)
    assert result.returncode == 3, result.stdout + result.stderr  # not 1: the submit helper must not retry it
    first, last = LAST_STEP + 2, LAST_STEP + 4
    assert f"Diverged: global steps {first}-{last} all had a non-finite loss or gradients" in result.stdout
    assert (f"error: training diverged: global steps {first}-{last} (3 in a row, --max-skipped-steps 3) had a "
            "non-finite loss or gradients and were skipped. Lower the learning rate (--lr 1e+30).") in result.stderr
    assert "val_loss non-finite" in result.stdout
    # No traceback of ours (Ray's own actors may log theirs as the run ends; those lines name their pid).
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line]
    assert f"Resume from where this run started ({base / 'state.pt'})" in result.stderr
    argv = shlex.split(result.stderr.strip().splitlines()[-1])
    assert argv[1:3] == ["-m", "raytrain_app.main"]
    cfg, _ = parse_config(argv[3:])
    assert cfg.resume_from_checkpoint == str(base / "state.pt") and cfg.lr == 5e29
    assert (cfg.data, cfg.epochs, cfg.max_skipped_steps) == (str(dataset), 4, 3)  # the rest of the command is kept
    run_dir = tmp_path / "runs" / parse_config(args)[0].default_run_name()
    assert max(int(p.name.split("=")[1]) for p in run_dir.glob("checkpoint_step=*")) == last  # nothing after
