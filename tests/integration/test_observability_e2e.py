"""Following a run: wandb (offline) through a kill and a re-run, a fork's own wandb run, the console's progress
lines, metrics.jsonl and the run report, on the session's Ray cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrain_app.checkpoint.format import load_state
from raytrain_app.cli.flags import parse_config
from raytrain_app.observability.metrics import read_rows
from raytrain_app.storage.location import parse_location
from tests.conftest import (
    REPO_ROOT,
    base_env,
    finish_process,
    latest_checkpoint_step,
    run_main,
    start_process,
    write_dataset,
)
from tests.helpers import ckpt, offline_runs, train_args

pytestmark = pytest.mark.e2e

# 8192 sequences in batches of 16: 512 steps an epoch, about 5 s of training here in all, long enough for the
# first attempt to be killed well before its end.
EPOCHS, STEPS_PER_EPOCH = 3, 512
LAST_STEP = EPOCHS * STEPS_PER_EPOCH

PROGRESS = re.compile(r"progress: epoch \d+/3 step (\d+)/1536 \(\d+%\) train_ema_loss \d+\.\d{4} best_val_loss \S+ "
                      r"best_val_accuracy \S+ samples/s \d+\.\d ETA \S+")


def logged_steps(wandb_dir: Path) -> list[int]:
    try:
        return [s for run in offline_runs(wandb_dir) for s in run["steps"]]
    except Exception:  # noqa: BLE001 - a file caught mid-write: ask again
        return []


def test_a_killed_and_rerun_run_is_one_wandb_run_one_metrics_file_and_one_report(
        tmp_path: Path, ray_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_dataset(tmp_path / "longer.pkl", num_train=8192)
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))  # the driver forwards WANDB_* to the workers
    args = train_args(dataset, tmp_path / "runs", 1, "--epochs", str(EPOCHS), "--eval-every", "128", "--use-wandb",
                      "--wandb-mode", "offline", "--progress-every", "0.5")
    run_dir = tmp_path / "runs" / parse_config(args)[0].default_run_name()

    # Killed (the whole driver session, SIGKILL) once Ray has registered a checkpoint, wandb's file holds logged
    # steps and the console has shown progress twice, at whatever point of a step or a checkpoint the run is then.
    # (Rows reach wandb just before their checkpoint is reported, so the file alone does not mean a checkpoint.)
    log_path = tmp_path / "first.log"
    proc, log = start_process(args, ray_address, log_path=log_path)
    deadline = time.monotonic() + 240
    try:
        while not (len(PROGRESS.findall(log_path.read_text())) >= 2 and logged_steps(wandb_dir)
                   and latest_checkpoint_step(run_dir) is not None):
            assert proc.poll() is None, f"training ended before it was killed:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        killed = finish_process(proc, log, timeout=30)
    killed_after = max(logged_steps(wandb_dir))
    assert killed_after < LAST_STEP - STEPS_PER_EPOCH, "the kill came too late to test a resume"

    resumed = run_main(args, ray_address)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    resumed_step = int(re.search(r"Resuming from global step (\d+)", resumed.stdout).group(1))

    # wandb: both attempts wrote to the same run, and the steps they logged are each logged once, in order.
    runs = offline_runs(tmp_path / "wandb-files")
    run_id = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))["wandb_run_id"]  # kept in the checkpoints
    assert len(runs) == 2 and {r["id"] for r in runs} == {run_id}
    steps = [s for r in runs for s in r["steps"]]
    assert steps == sorted(set(steps)) and (steps[0], steps[-1]) == (1, LAST_STEP)
    assert runs[1]["steps"][0] > max(resumed_step, killed_after)  # retrained steps wandb had are not logged again
    last_state = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))
    accuracy = last_state["eval_val_accuracy"]
    assert 0 < accuracy < 1 and runs[1]["logged"]["val/accuracy"] == accuracy
    assert runs[1]["logged"]["val/best_accuracy"] == last_state["val_accuracy"] >= accuracy

    # metrics.jsonl: every step once, the resume with its step and cause.
    rows = read_rows(parse_location(str(run_dir / "metrics.jsonl")))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, LAST_STEP + 1))
    assert {r["wandb_run_id"] for r in rows if r.get("event") in ("start", "resume")} == {run_id}
    events = [(r["event"], r["step"], r.get("cause")) for r in rows if r["kind"] == "event"]
    assert events[0][:2] == ("start", 0) and events[1][:2] == ("resume", resumed_step)
    assert events[1][2].startswith("re-run") and len(events) == 3
    finished = [r for r in rows if r["kind"] == "event"][-1]
    assert (finished["event"], finished["step"], finished["steps"]) == ("finished", LAST_STEP, LAST_STEP - resumed_step)
    assert finished["loop_s"] > 0
    final = [r for r in rows if r["kind"] == "checkpoint"][-1]
    assert final["step"] == LAST_STEP and final["epoch"] == EPOCHS and final["samples_per_s"] > 0
    assert final["val_accuracy"] == accuracy and final["best_val_accuracy"] == last_state["val_accuracy"]
    assert f"step {LAST_STEP} train_ema_loss" in resumed.stdout
    assert re.search(rf"step {LAST_STEP} train_ema_loss \S+ val_loss \S+ val_accuracy {accuracy:.4f} ", resumed.stdout)
    assert 0 <= final["data_wait_fraction"] <= 1 and final["tokens_per_s"] == pytest.approx(final["samples_per_s"] * 8)

    # The console, not a terminal here: periodic progress lines with every field, in both attempts.
    for output in (killed, resumed.stdout):
        assert len(PROGRESS.findall(output)) >= 2, output

    # The report: the summary and loss.png with the resume marked.
    report = subprocess.run([sys.executable, "-m", "raytrain_app.report", str(run_dir)], env=base_env(),
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert report.returncode == 0, report.stderr
    assert f"Steps: {LAST_STEP} (epoch {EPOCHS} completed), " in report.stdout
    assert "Resumes: 1\n" in report.stdout
    assert f"  at global step {resumed_step}: re-run (a new driver" in report.stdout
    assert re.search(r"Best validation loss: \d\.\d{6} at global step \d+", report.stdout)
    best = max((r for r in rows if r["kind"] == "checkpoint" and r.get("val_accuracy") is not None),
               key=lambda r: (r["val_accuracy"], r["step"]))
    assert f"Best validation accuracy: {best['val_accuracy']:.4f} at global step {best['step']}\n" in report.stdout
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert f"Plot: {run_dir / 'loss.png'}" in report.stdout
    # (A fork's own wandb run, with the checkpoint it started from: every sweep trial is one, test_tune_e2e.py.)
