"""Faults injected for real on the session's Ray cluster: workers SIGKILLed at random moments until the restarts
are used up, a worker killed in the middle of writing a checkpoint, and a run that diverges. Nothing is lost:
each run ends bit-identical to an uninterrupted one, or says exactly how to continue. (A damaged latest
checkpoint: test_sharding_e2e.py.)"""

from __future__ import annotations

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
from raytrain_app.main import main, prepare
from raytrain_app.observability.metrics import read_rows
from raytrain_app.storage.location import parse_location
from tests.conftest import (
    POLL_S,
    STEP_DELAY,
    computed_once,
    finish_process,
    latest_checkpoint_step,
    ray_train_processes,
    run_main,
    slow_resource,
    start_process,
    wait_until,
)
from tests.helpers import (
    EPOCHS,
    LAST_STEP,
    REGRESSION_MODEL,
    REGRESSOR,
    FileEvents,
    assert_kept_checkpoints,
    assert_same_training_state,
    ckpt,
    run_in_process,
    train_args,
)

pytestmark = pytest.mark.e2e

CHAOS_SEED = 2026


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
    return wait_until(lambda: latest_checkpoint_step(run_dir), f"a readable checkpoint record in {run_dir}")


def test_workers_killed_at_random_moments_and_the_run_ends_bit_exact(
        tmp_path: Path, regression_dataset: Path, ray_address: str, uninterrupted) -> None:
    """SIGKILLs of a Ray Train worker at seeded random checkpoints and random delays after them, with
    --max-failures 1: Ray Train restarts the worker group from the latest checkpoint; the second kill uses the
    restarts up, and the command says so in one line and exits 1. The same command run again continues from the
    latest checkpoint, and the run ends with the same bits as one never interrupted, keeping the
    --keep-checkpoints best checkpoints and the latest. The run trains a regression model of a user's own
    (examples/mlp_regressor on tabular rows), its best model the one of lowest validation RMSE."""
    reference = uninterrupted(2, regression=True)
    rng = random.Random(CHAOS_SEED)
    args = train_args(regression_dataset, tmp_path / "runs", 2, "--max-failures", "1", model=REGRESSION_MODEL)
    run_dir = tmp_path / "runs" / parse_config(args)[0].default_run_name()
    log_path = tmp_path / "train.log"
    proc, log = start_process(args, ray_address, log_path=log_path, extra_env=STEP_DELAY)
    killed_after = []
    try:
        for kill, window in enumerate([(3, 15), (18, 30)]):
            target = rng.randint(*window)
            wait_until(lambda kill=kill, target=target: len(restores(log_path)) == kill
                       and (latest_checkpoint_step(run_dir) or 0) >= target,
                       f"a checkpoint at step {target} after {kill} restart(s)", proc=proc, log=log_path)
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the steps after it
            killed_after.append(registered_step(run_dir))
            # The worker group at work, without the Ray Datasets helper actor Ray Train starts by default at
            # each start and restart (ray_compat.torch_trainer_class: the run has no Ray Datasets).
            assert ray_train_processes(ray_address, "ray::RayTrainWorker"), "no Ray Train worker running"
            assert not ray_train_processes(ray_address, "ray::DatasetManager"), f"at the kill after {kill} restart(s)"
            kill_a_train_worker(log_path, rank=rng.choice(sorted(train_workers(log_path))))
        failed = finish_process(proc, log, timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, failed
    loaded = restores(log_path)
    assert len(loaded) == 1, failed  # one restore for the first kill, from the run's own latest checkpoint
    for path, at_kill in zip(loaded, killed_after, strict=False):
        assert int(path.rsplit("=", 1)[1]) >= at_kill, (path, at_kill)
    errors = [line for line in failed.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training failed after 1 restart(s): "), failed
    assert f"Re-run the same command to continue from the latest checkpoint in {run_dir}." in failed
    assert not ckpt(run_dir, LAST_STEP).exists()

    rerun = run_main(args, ray_address)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert int(re.search(r"Resuming from global step (\d+)", rerun.stdout).group(1)) >= killed_after[-1]
    assert_same_training_state(reference, ckpt(run_dir, LAST_STEP) / "state.pt")
    assert_kept_checkpoints(failed + rerun.stdout, run_dir, keep=2)

    # best_model.pt is the validation of lowest RMSE (--select-metric val_rmse), and the guide's fine-tune from it
    # with a lower learning rate takes the regression model and its settings from the file.
    best_file = tmp_path / "runs" / "best_model.pt"
    best = load_state(str(best_file))
    validations = [r for r in read_rows(parse_location(str(run_dir / "metrics.jsonl")))
                   if r.get("kind") == "checkpoint" and r.get("val_rmse") is not None]
    assert best["eval_val_rmse"] == min(r["val_rmse"] for r in validations) == best["val_rmse"]
    assert best["config"]["model"] == REGRESSOR and best["config"]["task"] == "regression"
    plan = prepare(["--data", str(regression_dataset), "--resume-from-checkpoint", str(best_file), "--lr", "1e-4",
                    "--epochs", str(EPOCHS + 2), "--save-dir", str(tmp_path / "fine-tuned")])
    assert plan.init_from == str(best_file) and (plan.cfg.model, plan.cfg.model_args) == (
        REGRESSOR, {"width": 16, "depth": 2}) and plan.cfg.task == "regression"


def big_args(dataset: Path, save_dir: Path, *extra: str) -> list[str]:
    """A model big enough (a 37 MB state) that writing a checkpoint takes a while: 32 steps, a checkpoint every
    8 (16 and 32 end the epochs)."""
    return ["--data", str(dataset), "--save-dir", str(save_dir), "--num-workers", "1", "--epochs", "2",
            "--batch-size", "16", "--eval-every", "8", "--hidden-dim", "256", "--num-layers", "4", "--num-heads", "4",
            *extra]


@pytest.fixture(scope="session")
@slow_resource
def big_reference(shared_tmp: Path, dataset: Path) -> Path:
    """The big model trained uninterrupted by the same loop without Ray, on one gloo process
    (tests.distributed.train_all), every checkpoint written on the training path; its final state.pt."""
    from tests.distributed import train_all

    def train(folder: Path) -> str:
        plan = prepare(big_args(dataset, folder / "save-dir"))  # the config as the driver makes it from the command
        train_all(folder, {"run": {"config": plan.cfg.to_dict()}}, world_size=1)
        return str(ckpt(folder / "run", 32) / "state.pt")

    return Path(computed_once(shared_tmp, "big-reference", train))


def test_a_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
        tmp_path: Path, dataset: Path, ray_address: str, big_reference: Path) -> None:
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

    # The copy of a 37 MB state.pt into the run folder takes tens of milliseconds, less than a poll: the test is
    # woken by the file system at every write there instead, and kills at once.
    events = FileEvents()
    events.watch(tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not (torn := partly_copied()):
            assert proc.poll() is None, f"training ended before a checkpoint was caught half copied:\n" \
                                        f"{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint caught half copied in 180 s:\n{log_path.read_text()}"
            events.wait(timeout=POLL_S)
        kill_a_train_worker(log_path, rank=0)  # rank 0 copies the checkpoint into the run folder
        # Kept as the kill left it: the restarted workers write this step's folder again later.
        shutil.copytree(torn, tmp_path / torn.name)
        previous = registered_step(run_dir)
        problem = checkpoint_problem(str(tmp_path / torn.name))
        refused = run_in_process(main, ["--resume-from-checkpoint", str(tmp_path / torn.name), "--data",
                                        str(dataset), "--save-dir", str(tmp_path / "fork")])
        output = finish_process(proc, log, timeout=240)
    finally:
        events.close()
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
    # Written in the background (the default) and interrupted, the run ends with the bits of the reference, whose
    # checkpoints were all written on the training path.
    assert_same_training_state(big_reference, final[-1] / "state.pt", last_step=32, epochs=2)
    # The run timed the training thread's waits and the background writes; how much less it waits than a run
    # writing on the training path is benchmarks/checkpoint_stall.py's figure (a loaded machine is no judge of it).
    last = [r for r in read_rows(parse_location(str(run_dir / "metrics.jsonl"))) if r["kind"] == "checkpoint"][-1]
    assert last["checkpoint_write_total_s"] > 0 and last["checkpoint_blocked_total_s"] > 0, last


def test_a_diverging_fine_tune_stops_and_says_how_to_resume_from_the_last_good_checkpoint(
        tmp_path: Path, dataset: Path, ray_address: str, uninterrupted) -> None:
    """Fine-tuning a trained model on 2 workers with an absurd learning rate: step 1 of the new run makes the
    weights overflow, every later loss is non-finite and its step skipped, on both ranks alike. Three in a row stop
    the run (exit 3), naming the steps; the new run has no checkpoint with a finite validation loss, so the printed
    command forks again from the checkpoint it started from, with half the learning rate. Its checkpoints are
    written on the training path (--no-async-checkpoint), which changes nothing trained."""
    base = uninterrupted(2).parent  # a trained model's last checkpoint folder
    args = ["--data", str(dataset), "--save-dir", str(tmp_path / "runs"), "--num-workers", "2", "--batch-size", "8",
            "--epochs", "4", "--eval-every", "1", "--lr", "1e30", "--max-skipped-steps", "3",
            "--resume-from-checkpoint", str(base), "--no-async-checkpoint"]
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
    # --no-async-checkpoint: every checkpoint was written on the training path, so the training thread waited for
    # each whole write (a background write is only partly waited for: test_a_worker_killed_while_writing...).
    row = [r for r in read_rows(parse_location(str(run_dir / "metrics.jsonl"))) if r["kind"] == "checkpoint"][-1]
    assert row["checkpoint_blocked_total_s"] >= row["checkpoint_write_total_s"] > 0, row
