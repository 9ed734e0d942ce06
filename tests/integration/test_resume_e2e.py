"""End to end on a real Ray cluster: kill a training process for real, re-run it, and get the same bits.

Each test runs `python -m raytrain_app.main` as a separate process against the session's `ray start` cluster.
The runs' geometry (tests.helpers.train_args) and the uninterrupted reference run (the `uninterrupted` fixture,
tests/conftest.py: the same loop without Ray, on gloo processes) are shared with the fault, jobs and storage tests.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import load_state, save_checkpoint_dir
from raytrain_app.cli.flags import parse_config
from raytrain_app.cli.preflight import start_position
from raytrain_app.core.schedule import lr_at
from raytrain_app.datasets.formats import open_dataset
from raytrain_app.datasets.normalize import feature_stats
from raytrain_app.main import main
from tests.conftest import STEP_DELAY, run_api, run_until_checkpoint
from tests.helpers import (
    EPOCHS,
    LAST_STEP,
    MID_EPOCH_2,
    PLUGIN,
    STEPS_PER_EPOCH,
    TINY_MODEL,
    assert_resumed_mid_epoch,
    assert_same_training_state,
    ckpt,
    run_in_process,
    run_name_of,
    train_args,
    trained_state,
)

pytestmark = pytest.mark.e2e


def test_sigterm_saves_the_step_it_is_at_and_prints_the_command_that_continues(interrupted_run: dict) -> None:
    """SIGTERM to `python -m raytrain_app.main` (what a job system, a pod's end or `kill` sends; Ctrl-C's SIGINT
    takes the same path): the workers checkpoint the step they are at, the driver says so, prints the command
    that continues, and exits 143 (128 + SIGTERM) so that no job system takes the run for finished."""
    out = interrupted_run["stopped"]
    assert interrupted_run["stopped_rc"] == 143, out
    saved = re.search(r"Stopped by SIGTERM at epoch (\d+), global step (\d+): that step is checkpointed in (\S+)\.",
                      out)
    assert saved, out
    epoch, step = int(saved.group(1)), int(saved.group(2))
    assert saved.group(3) == interrupted_run["run_dir"]
    assert 3 <= step < LAST_STEP and epoch == step // STEPS_PER_EPOCH, out
    assert interrupted_run["latest_after_stop"] == step  # the step stopped at is the run's latest checkpoint
    # Saved without a validation when the stop fell between two.
    meta = interrupted_run["stop_meta"]
    assert (meta["eval_val_loss"] is not None) == (step % 3 == 0 or step % STEPS_PER_EPOCH == 0), meta
    # The printed command is the command, and running it (as the fixture did) continued from that step.
    assert interrupted_run["printed_continue"] == [
        shlex.join(["python", "-m", "raytrain_app.main", *interrupted_run["args"]])]
    assert f"Resuming from global step {step}\n" in interrupted_run["killed"]


def test_killed_run_resumes_bit_exact(dataset: Path, interrupted_run: dict, uninterrupted) -> None:
    """Two workers, the pickle: after the SIGTERM and the continue command SIGKILLed after a checkpoint inside
    epoch 2, the same command resumes mid-epoch and ends with an uninterrupted run's bits. (The Parquet copy on
    S3 is killed, damaged and resumed under FSDP in test_sharding_e2e.py; a job's driver in test_jobs_e2e.py.)"""
    run_dir = Path(interrupted_run["run_dir"])
    resumed = interrupted_run["resumed"]
    assert interrupted_run["resumed_rc"] == 0, resumed + interrupted_run["resumed_err"]
    assert run_name_of(interrupted_run["stopped"]) == run_dir.name  # the same run name on every run of it
    assert f"Run {run_dir.name} has checkpoints: continuing it from its latest one." in resumed
    # The latest checkpoint at the kill was a mid-epoch one: resume mid-epoch.
    assert_resumed_mid_epoch(resumed, interrupted_run["killed_at_least"])

    assert_same_training_state(uninterrupted(2), ckpt(run_dir, LAST_STEP) / "state.pt")
    # The inputs were standardised (--normalize standard, the default) with the training split's statistics,
    # computed by the driver and kept, through both interruptions, in the weights.
    mean, std = feature_stats(open_dataset(str(dataset)).train)
    weights = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))["model_state_dict"]
    assert torch.equal(weights["input_mean"], mean.float()) and torch.equal(weights["input_std"], std.float())


def test_a_finished_run_prints_commands_that_resume_and_fine_tune_it(
        interrupted_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """The closing lines: the same command to resume, and a fine-tune of the best model with a tenth of the
    learning rate and 5 more epochs, which the driver accepts as it is (checked in this process, up to Ray)."""
    from raytrain_app.main import prepare

    lines = interrupted_run["resumed"].splitlines()
    save_dir = Path(interrupted_run["run_dir"]).parent
    assert f"  Best model:  {save_dir / 'best_model.pt'}" in lines
    resume = [line.split(": ", 1)[1] for line in lines if "Resume this run after an interruption" in line]
    assert resume == [shlex.join(["python", "-m", "raytrain_app.main", *interrupted_run["args"]])]
    [fine_tune] = [line.split(": ", 1)[1] for line in lines if "Fine-tune the best model" in line]
    argv = shlex.split(fine_tune)
    assert argv[:3] == ["python", "-m", "raytrain_app.main"]
    cfg, _ = parse_config(interrupted_run["args"])
    plan = prepare([*argv[3:], "--save-dir", str(save_dir / "fine-tuned")])
    assert plan.init_from == str(save_dir / "best_model.pt") and plan.cfg.lr == pytest.approx(cfg.lr / 10)
    # No --model in the fine-tune: the checkpoint's own model (the suite's plug-in) and its settings, from the file.
    assert (plan.cfg.model, plan.cfg.model_args) == (PLUGIN, {"channels": 16, "num_blocks": 2})
    assert plan.cfg.epochs == EPOCHS + 5 and plan.run_name != Path(interrupted_run["run_dir"]).name
    assert plan.summary.global_step == load_state(str(save_dir / "best_model.pt"))["global_step"]
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="session")
def reference_run(uninterrupted) -> Path:
    """The folder of the uninterrupted reference run (every checkpoint of its 3 epochs): the fork starts from one of
    them; nothing writes it."""
    return uninterrupted(2).parent.parent


@pytest.fixture(scope="session")
def finished_run(interrupted_run: dict) -> Path:
    """A finished run folder as Ray Train leaves it (its record, kept checkpoints, best_model.pt beside it): the
    session's interrupted run, run to its end. The tests below only read it."""
    return Path(interrupted_run["run_dir"])


def snapshot_tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_a_fork_with_new_hyperparameters_killed_and_rerun_continues_its_own_run(
        tmp_path: Path, dataset: Path, reference_run: Path, ray_address: str) -> None:
    """The guide's fine-tune, interrupted: --resume-from-checkpoint with a checkpoint folder and new
    hyperparameters starts a new run; killed mid-epoch and run again, the very same command continues that run
    (not the base again), with --epochs a total, the new settings applied, and the base left untouched."""
    # The base's end-of-epoch-1 checkpoint, as a checkpoint folder whose best validation loss is 0: no validation
    # (a cross-entropy, never below 0) beats it, so the fork keeps it as its best model by construction, and
    # says so (raytrain_app/main.py), not by how well these few steps happen to train.
    source = tmp_path / "base" / f"checkpoint_step={STEPS_PER_EPOCH:06d}"
    save_checkpoint_dir(str(source), {**load_state(str(ckpt(reference_run, STEPS_PER_EPOCH) / "state.pt")),
                                      "val_loss": 0.0})
    before = snapshot_tree(reference_run), snapshot_tree(source.parent)
    args = train_args(dataset, tmp_path / "runs", 2, "--resume-from-checkpoint", str(source), "--lr", "3e-4",
                      "--dropout", "0.0", "--weight-decay", "0.05")
    run_name = parse_config(args)[0].default_run_name()
    run_dir = tmp_path / "runs" / run_name
    first = run_until_checkpoint(args, ray_address, run_dir, MID_EPOCH_2 - {18}, extra_env=STEP_DELAY)
    assert not ckpt(run_dir, LAST_STEP).exists(), "the run finished before it was killed"
    assert "✅ Resuming from epoch 1" in first and f"Epochs: {EPOCHS} (starting from epoch 2)" in first
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    latest_name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert latest_name != ckpt(run_dir, STEPS_PER_EPOCH).name

    # The very same settings, --resume-from-checkpoint included, through the Python API (a script's or a
    # notebook's rt.train): the same run name, so it continues the run the command started.
    cfg, given = parse_config(args)
    settings = {name: getattr(cfg, name) for name in sorted(given)}
    again, result = run_api(f"rt.train(**{settings!r})", ray_address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert result["run_name"] == run_name and result["completed"] and result["global_step"] == LAST_STEP
    assert result["best_model"] == str(source / "state.pt") and result["epoch"] == EPOCHS
    assert f"Run {run_name} has checkpoints: continuing it from its latest one." in again.stdout
    assert f"Loading checkpoint from: {run_dir / latest_name / 'state.pt'}" in again.stdout
    assert run_name != reference_run.name
    # The run and the checkpoint it started from are untouched (no best model written beside the checkpoint).
    assert (snapshot_tree(reference_run), snapshot_tree(source.parent)) == before
    steps = sorted(int(p.name.split("=")[1]) for p in run_dir.glob("checkpoint_step=*"))
    assert steps[0] > STEPS_PER_EPOCH  # counters continued from the checkpoint, not reset

    final = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))
    assert final["global_step"] == LAST_STEP and final["epoch"] == EPOCHS  # --epochs is a total
    assert final["config"]["lr"] == 3e-4 and final["config"]["dropout"] == 0.0
    decay_group = final["optimizer_state_dict"]["param_groups"][0]
    assert decay_group["weight_decay"] == 0.05
    # The new --lr is what the optimizer used: the schedule's value for the last step at the new peak.
    assert decay_group["lr"] == lr_at(LAST_STEP - 1, peak_lr=3e-4, warmup_steps=4, total_steps=LAST_STEP)
    assert final["val_loss"] == 0.0  # best-so-far carried over, never forgotten
    assert final["lineage"]["base_checkpoint"] == str(source / "state.pt")
    # Never beaten: no best_model.pt of the fork's own, and the printed best model is the checkpoint it started
    # from (known from the lineage after the re-run), a file that exists.
    assert not (tmp_path / "runs" / "best_model.pt").exists()
    assert (f"No validation beat the best of the checkpoint this run started from: {source / 'state.pt'} stays the "
            "best model.") in again.stdout
    assert f"Best model:  {source / 'state.pt'}\n" in again.stdout


def test_c_pt_file_from_another_tool_without_epoch_starts_at_epoch_0_with_its_weights(
        tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the driver decides (in this process) and what every worker then restores from the file: the old
    script's file holds the Transformer (the built-in model), trained a few steps."""
    from raytrain_app.checkpoint.state import restore_training_state
    from raytrain_app.core.model import SequenceTransformer
    from raytrain_app.core.trainer import Trainer
    from raytrain_app.main import prepare

    best = trained_state()
    foreign = {  # only the keys the old script wrote, no 'epoch' or 'global_step', a config of its own
        "model_state_dict": best["model_state_dict"],
        "optimizer_state_dict": best["optimizer_state_dict"],
        "val_loss": best["val_loss"],
        "train_ema_loss": best["train_ema_loss"],
        "config": {"hidden_dim": 16, "num_layers": 2, "num_heads": 2, "batch_size": 2, "lr": 1e-4},
    }
    torch.save(foreign, tmp_path / "exported.pt")
    args = ["--data", str(dataset), "--save-dir", str(tmp_path / "runs"), "--num-workers", "1", "--epochs", "1",
            "--batch-size", "16", "--lr", "1e-9", "--resume-from-checkpoint", str(tmp_path / "exported.pt")]
    plan = prepare(args)  # no architecture flags: they come from the file
    assert (plan.cfg.hidden_dim, plan.cfg.num_layers, plan.cfg.num_heads) == (16, 2, 2)
    assert (plan.summary.epoch, plan.summary.global_step) == (0, 0) and start_position(plan.summary) == (0, 0)
    assert plan.cfg.lr == 1e-9 and plan.cfg.batch_size == 16  # the command's settings, not the file's
    model = SequenceTransformer(plan.cfg)
    trainer = Trainer(plan.cfg, model, model, torch.device("cpu"))
    report = restore_training_state(trainer, load_state(plan.init_from), fork=True)
    assert report.optimizer and (trainer.epoch, trainer.global_step, trainer.batch_index) == (0, 0, 0)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in foreign["model_state_dict"].items())
    assert not (tmp_path / "runs").exists() and capsys.readouterr().err == ""


def test_d_nothing_left_to_train_exits_0_without_writing(tmp_path: Path, dataset: Path, finished_run: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(dataset, tmp_path / "runs", 2, "--resume-from-checkpoint", str(finished_run))
    # (the base run already completed its 3 epochs)
    assert main(args) == 0  # in this process: it ends before Ray starts
    assert f"Nothing to train: the checkpoint has completed {EPOCHS} epochs and --epochs is {EPOCHS}" \
        in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_f_missing_checkpoint_warns_and_starts_fresh(tmp_path: Path, dataset: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's behaviour for a --resume-from-checkpoint that does not exist: a warning, then training from
    scratch, as the driver decides it (in this process; a fresh start is what every other new run does)."""
    from raytrain_app.main import prepare

    missing = tmp_path / "checkpoints" / "best_model.pt"
    plan = prepare(["--data", str(dataset), "--save-dir", str(tmp_path / "runs"), *TINY_MODEL,
                    "--resume-from-checkpoint", str(missing)])
    out = capsys.readouterr().out
    assert f"Checkpoint file not found: {missing}" in out and "Starting training from scratch" in out
    assert plan.summary is None and plan.init_from is None and plan.lineage is None
    assert start_position(plan.summary) == (0, 0)


def test_g_resume_prints_a_summary(tmp_path: Path, dataset: Path, finished_run: Path) -> None:
    source = finished_run.parent / "best_model.pt"
    state = load_state(str(source))
    args = ["--data", str(dataset), "--save-dir", str(tmp_path / "runs"), "--resume-from-checkpoint", str(source),
            "--epochs", str(state["epoch"])]  # nothing left: prints the summary, then exits before Ray
    result = run_in_process(main, args)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    for expected in [
        f"📂 Loading checkpoint from: {source}",
        "✅ Loaded model weights",
        "✅ Loaded optimizer state",
        f"✅ Resuming from epoch {state['epoch']}",
        f"✅ Resuming from global step {state['global_step']}",
        f"✅ Best val loss: {state['val_loss']:.6f}",
        f"✅ Train EMA loss: {state['train_ema_loss']:.6f}",
    ]:
        assert expected in lines, (expected, result.stdout)


def test_pinned_run_name_continues_that_run_with_new_settings(finished_run: Path, dataset: Path) -> None:
    args = train_args(dataset, finished_run.parent, 2, "--run-name", finished_run.name, "--lr", "5e-4")
    result = run_in_process(main, args)  # the base run completed its 3 epochs: found, nothing left, exit 0 before Ray
    assert result.returncode == 0, result.stderr
    assert f"Run {finished_run.name} has checkpoints: continuing it from its latest one." in result.stdout
    assert f"Nothing to train: the checkpoint has completed {EPOCHS} epochs" in result.stdout
