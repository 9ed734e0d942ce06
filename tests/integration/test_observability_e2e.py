"""Following a run: wandb (offline), the console's progress lines, metrics.jsonl and the run report of the
session's interrupted run (stopped by SIGTERM, continued, SIGKILLed, run again: the `interrupted_run` fixture,
tests/conftest.py), on the session's Ray cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from raytrain_app.checkpoint.format import load_state
from raytrain_app.observability.metrics import read_rows
from raytrain_app.storage.location import parse_location
from tests.conftest import REPO_ROOT, base_env
from tests.helpers import EPOCHS, LAST_STEP, PROGRESS, ckpt, offline_runs

pytestmark = pytest.mark.e2e


def test_an_interrupted_run_is_one_wandb_run_one_metrics_file_and_one_report(interrupted_run: dict) -> None:
    run_dir = Path(interrupted_run["run_dir"])
    resumed = interrupted_run["resumed"]
    assert interrupted_run["resumed_rc"] == 0, resumed + interrupted_run["resumed_err"]
    stop_step = interrupted_run["latest_after_stop"]
    resumed_step = int(re.search(r"Resuming from global step (\d+)", resumed).group(1))
    killed_after = interrupted_run["wandb_steps_at_kill"]

    # wandb: the three attempts wrote to the same run, and the steps they logged are each logged once, in order.
    runs = offline_runs(Path(interrupted_run["wandb_dir"]))
    last_state = load_state(str(ckpt(run_dir, LAST_STEP) / "state.pt"))
    run_id = last_state["wandb_run_id"]  # kept in the checkpoints
    assert len(runs) == 3 and {r["id"] for r in runs} == {run_id}
    steps = [s for r in runs for s in r["steps"]]
    assert steps == sorted(set(steps)) and (steps[0], steps[-1]) == (1, LAST_STEP)
    assert runs[1]["steps"][0] == stop_step + 1  # nothing lost or repeated across the stop
    assert runs[2]["steps"][0] > max(resumed_step, killed_after)  # retrained steps wandb had are not logged again
    accuracy = last_state["eval_val_accuracy"]
    assert 0 < accuracy < 1 and runs[2]["logged"]["val/accuracy"] == accuracy
    assert runs[2]["logged"]["val/best_accuracy"] == last_state["val_accuracy"] >= accuracy

    # metrics.jsonl: every step once; the stop, and each resume with its step and cause.
    rows = read_rows(parse_location(str(run_dir / "metrics.jsonl")))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, LAST_STEP + 1))
    assert {r["wandb_run_id"] for r in rows if r.get("event") in ("start", "resume")} == {run_id}
    events = [(r["event"], r["step"]) for r in rows if r["kind"] == "event"]
    assert events == [("start", 0), ("stopped", stop_step), ("resume", stop_step), ("resume", resumed_step),
                      ("finished", LAST_STEP)], events
    causes = [r["cause"] for r in rows if r.get("event") == "resume"]
    assert all(cause.startswith("re-run") for cause in causes), causes
    finished = [r for r in rows if r["kind"] == "event"][-1]
    assert finished["steps"] == LAST_STEP - resumed_step and finished["loop_s"] > 0
    final = [r for r in rows if r["kind"] == "checkpoint"][-1]
    assert final["step"] == LAST_STEP and final["epoch"] == EPOCHS and final["samples_per_s"] > 0
    assert final["val_accuracy"] == accuracy and final["best_val_accuracy"] == last_state["val_accuracy"]
    assert re.search(rf"step {LAST_STEP} train_ema_loss \S+ val_loss \S+ val_accuracy {accuracy:.4f} ", resumed)
    assert 0 <= final["data_wait_fraction"] <= 1

    # The console, not a terminal here: periodic progress lines with every field, in every attempt that trained
    # for more than a second.
    for output in (interrupted_run["stopped"], interrupted_run["killed"], resumed):
        assert PROGRESS.search(output), output

    # The report: the summary and loss.png with the resumes marked.
    report = subprocess.run([sys.executable, "-m", "raytrain_app.report", str(run_dir)], env=base_env(),
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert report.returncode == 0, report.stderr
    assert f"Steps: {LAST_STEP} (epoch {EPOCHS} completed), " in report.stdout
    assert "Resumes: 2\n" in report.stdout
    assert f"  at global step {stop_step}: re-run (a new driver" in report.stdout
    assert f"  at global step {resumed_step}: re-run (a new driver" in report.stdout
    assert re.search(r"Best validation loss: \d\.\d{6} at global step \d+", report.stdout)
    best = max((r for r in rows if r["kind"] == "checkpoint" and r.get("val_accuracy") is not None),
               key=lambda r: (r["val_accuracy"], r["step"]))
    assert f"Best validation accuracy: {best['val_accuracy']:.4f} at global step {best['step']}\n" in report.stdout
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert f"Plot: {run_dir / 'loss.png'}" in report.stdout
    # (A fork's own wandb run, with the checkpoint it started from: every sweep trial is one, test_tune_e2e.py.)
