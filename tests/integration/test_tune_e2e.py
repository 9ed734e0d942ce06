"""Learning-rate sweeps end to end: `python -m raytrain_app.tune` as a real process on the session's Ray cluster,
every trial a real Ray Train run, the sweep's driver killed for real and resumed."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain_app.checkpoint.format import load_state, write_best_model
from raytrain_app.checkpoint.state import restore_training_state, with_training_state
from raytrain_app.cli.preflight import with_data_shape
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import build_model
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.datasets.formats import open_dataset
from raytrain_app.observability.metrics import read_rows
from raytrain_app.ray_adapter.run_record import latest_run_metrics
from raytrain_app.storage.location import parse_location
from tests.conftest import (
    STEP_DELAY,
    finish_process,
    make_bucket,
    output_so_far,
    ray_train_processes,
    run_tune,
    s3_uri,
    start_process,
    wait_for_run_to_end,
    wait_until,
)
from tests.helpers import PLUGIN, REGRESSOR, offline_runs

pytestmark = pytest.mark.e2e

BATCH = 32  # 256 training sequences, 1 worker: 8 optimizer steps per epoch
STEPS_PER_EPOCH = 8
# The sweeps start from a base checkpoint of the suite's plug-in model; they take the model from it.
FIXED = ["--num-workers", "1", "--batch-size", str(BATCH), "--warmup-steps", "4"]


class Stop(Exception):
    pass


def trial_config(dataset: Path, **overrides: object) -> TrainConfig:
    values = dict(data=str(dataset), model=PLUGIN, model_args={"channels": 16, "num_blocks": 2}, warmup_steps=4,
                  num_workers=1, batch_size=BATCH, epochs=1, eval_every=100)
    values.update(overrides)
    # The data's shapes and task, as the driver fills them in.
    return with_data_shape(TrainConfig(**values), open_dataset(str(dataset)))


@pytest.fixture(scope="module")
def base_checkpoint(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained one epoch (global step 8) in this process, saved as best_model.pt in the checkpoint format."""
    return train_base(trial_config(dataset), dataset, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def regression_base(regression_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same for the regression model of a user's own on tabular rows (best by lowest RMSE)."""
    cfg = trial_config(regression_dataset, model=REGRESSOR, model_args={"width": 16, "depth": 2},
                       select_metric="val_rmse")
    return train_base(cfg, regression_dataset, tmp_path_factory.mktemp("regression-base"))


def train_base(cfg: TrainConfig, dataset: Path, folder: Path) -> Path:
    seed_everything(cfg.seed, 0)
    model = build_model(cfg)
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    states = []
    trainer.fit(open_dataset(str(dataset), val_fraction=0.1, seed=0),
                with_training_state(trainer, lambda m, state, best: states.append(state)))
    assert states[-1]["global_step"] == STEPS_PER_EPOCH and states[-1]["epoch"] == 1
    return Path(write_best_model(str(folder), states[-1]).path)


def replay_first_step(trial_state: dict, base_state: dict) -> dict:
    """What the trial's first checkpoint must hold if it started from `base_state` with its own settings:
    the same plain-PyTorch loop, run here, from the base, up to its first checkpoint."""
    cfg = TrainConfig.from_dict(trial_state["config"])
    seed_everything(cfg.seed, 0)
    model = build_model(cfg)
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    restore_training_state(trainer, base_state, fork=True, fork_keeps_best=False)
    first: list[dict] = []

    def on_checkpoint(metrics: dict, state: dict | None, is_best: bool) -> None:
        first.append(state)
        raise Stop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker with one CPU (OMP_NUM_THREADS=1): the same reduction order
    try:
        with pytest.raises(Stop):
            trainer.fit(open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed),
                        with_training_state(trainer, on_checkpoint))
    finally:
        torch.set_num_threads(threads)
    return first[0]


def read_results(sweep_dir) -> list[dict]:
    return list(csv.DictReader(io.StringIO(sweep_dir.join("results.csv").read_bytes().decode())))


def png_trials(sweep_dir) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(sweep_dir.join("sweep.png").read_bytes()))
    assert image.size[0] > 600 and image.size[1] > 300
    return image.text["Description"]


def trial_run_dirs(sweep_dir) -> dict[str, object]:
    """trial id -> its Train run directory."""
    runs = {}
    for entry in sweep_dir.list():
        if entry.base_name.startswith("trial-"):
            trial_id = entry.base_name.removeprefix("trial-")
            runs[trial_id] = sweep_dir.join(entry.base_name, f"run-{trial_id}")
    return runs


def test_grid_sweep_on_s3_starts_every_trial_from_the_base(
    base_checkpoint: Path, dataset: Path, ray_address: str, s3_endpoint: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # forwarded to every trial's workers
    bucket = make_bucket(s3_endpoint, "sweeps")
    base_uri = s3_uri(bucket, "models/base.pt", s3_endpoint)
    parse_location(base_uri).write_bytes(base_checkpoint.read_bytes())
    save_dir = s3_uri(bucket, "lr", s3_endpoint)
    grid = [3e-4, 3e-3]
    args = ["--base-checkpoint", base_uri, "--data", str(dataset), "--save-dir", save_dir,
            "--lr-grid", ",".join(map(str, grid)), "--scheduler", "none", "--sweep-name", "grid",
            "--max-concurrent-trials", "8",
            "--epochs", "2", "--eval-every", "3", "--keep-checkpoints", "10", *FIXED, "--warmup-steps", "0",
            "--use-wandb", "--wandb-mode", "offline", "--select-metric", "val_accuracy"]
    result = run_tune(args, ray_address)
    assert result.returncode == 0, result.stdout + result.stderr

    # Asked for 8 at once; the cluster (4 CPUs) holds 3 trials of one worker (1 CPU) and a driver (0.1 CPU).
    assert "--max-concurrent-trials 8: only 3 trial(s) fit at once (CPU 1.1 each; this cluster has CPU 4)" \
        in result.stdout
    sweep_dir = parse_location(save_dir).join("grid")
    base_state = load_state(str(base_checkpoint))
    base_sha = hashlib.sha256(base_checkpoint.read_bytes()).hexdigest()
    runs = trial_run_dirs(sweep_dir)
    assert len(runs) == len(grid)
    seen_lrs = []
    for trial_id, run_dir in runs.items():
        first = load_state(run_dir.join(f"checkpoint_step={STEPS_PER_EPOCH + 1:06d}", "state.pt"))
        lr = first["config"]["lr"]
        seen_lrs.append(lr)
        # The first optimizer step of the trial is the base's step + 1, with the base's AdamW moments ...
        assert first["global_step"] == base_state["global_step"] + 1
        adam_steps = {int(s["step"]) for s in first["optimizer_state_dict"]["state"].values()}
        assert adam_steps == {STEPS_PER_EPOCH + 1}
        # ... at the trial's own learning rate (no warmup: a fresh schedule starts at its peak) ...
        assert all(g["lr"] == pytest.approx(lr, rel=1e-12) for g in first["optimizer_state_dict"]["param_groups"])
        assert first["scheduler_state_dict"]["start_step"] == STEPS_PER_EPOCH
        # ... from the base's weights: the same step replayed here from the base gives the same bits.
        replayed = replay_first_step(first, load_state(str(base_checkpoint)))  # fresh: AdamW steps its moments in place
        for name, tensor in replayed["model_state_dict"].items():
            assert torch.equal(tensor, first["model_state_dict"][name]), name
        # Lineage: where the trial came from, in every checkpoint.
        lineage = first["lineage"]
        assert lineage["base_checkpoint"] == parse_location(base_uri).uri
        assert lineage["base_global_step"] == STEPS_PER_EPOCH and lineage["base_sha256"] == base_sha
        assert lineage["sweep_name"] == "grid" and lineage["trial_id"] == trial_id
    assert sorted(seen_lrs) == grid

    # --select-metric val_accuracy: each trial's best_model.pt is its first validation with its highest accuracy.
    for trial_id, run_dir in runs.items():
        validations = [r for r in read_rows(run_dir.join("metrics.jsonl"))
                       if r["kind"] == "checkpoint" and r.get("val_accuracy") is not None]
        top = max(validations, key=lambda r: (r["val_accuracy"], -r["step"]))
        best_model = load_state(sweep_dir.join(f"trial-{trial_id}", "best_model.pt"))
        assert (best_model["global_step"], best_model["eval_val_accuracy"]) == (top["step"], top["val_accuracy"])

    # wandb: a run per trial, grouped under the sweep's name, each saying which checkpoint it started from.
    wandb_runs = offline_runs(tmp_path)
    assert len({r["id"] for r in wandb_runs}) == len(grid) and {r["group"] for r in wandb_runs} == {"grid"}
    for run in wandb_runs:
        source = run["config"]["forked_from"].get("value", run["config"]["forked_from"])
        assert source == {"checkpoint": parse_location(base_uri).uri, "global_step": STEPS_PER_EPOCH}
        assert run["steps"] == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))

    rows = read_results(sweep_dir)
    assert sorted(float(r["lr"]) for r in rows) == grid
    assert {r["status"] for r in rows} == {"finished"}
    assert all(int(r["steps_trained"]) == STEPS_PER_EPOCH for r in rows)
    assert all(parse_location(r["best_checkpoint"]).is_file() for r in rows)
    described = png_trials(sweep_dir)
    assert all(f"lr={lr!r} status=finished" in described for lr in grid)
    table = re.findall(r"^  ([ *]) +(\S+) +(\S+) +(\S+) +(\d+)  finished +(\S+)$", result.stdout, re.MULTILINE)
    assert sorted((float(lr), int(steps)) for _, lr, _, _, steps, _ in table) == [(lr, STEPS_PER_EPOCH) for lr in grid]

    # The sweep ranks trials by accuracy; the winner's best_model.pt feeds `raytrain_app.main
    # --resume-from-checkpoint` as printed.
    assert "trials, ranked by val_accuracy" in result.stdout
    best = max(rows, key=lambda r: float(r["best_val_accuracy"]))  # rows are in learning-rate order, as the table
    assert [float(lr) for mark, lr, *_ in table if mark == "*"] == [float(best["lr"])]
    command = next(line for line in result.stdout.splitlines() if "Continue training it:" in line)
    assert f"--resume-from-checkpoint {best['best_checkpoint']}" in command.replace("'", "")
    from raytrain_app.main import prepare

    plan = prepare(["--data", str(dataset), "--resume-from-checkpoint", best["best_checkpoint"], "--lr", best["lr"],
                    "--epochs", "3", *FIXED, "--save-dir", str(base_checkpoint.parent / "continued")])
    assert plan.summary.lineage["sweep_name"] == "grid" and plan.init_from == best["best_checkpoint"]


def start_sweep(args: list[str], ray_address: str) -> tuple[subprocess.Popen, Any]:
    # Tune saves its own record of the trials only now and then (every 10 s or more): make that "only at the
    # start", so the kill below always lands before Tune recorded the finished trial, and the trial itself must
    # notice that it has nothing left to train.
    return start_process(args, ray_address, module="raytrain_app.tune",
                         extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "3600", **STEP_DELAY})


def test_killed_sweep_resumes_where_it_stopped(
    regression_base: Path, regression_dataset: Path, ray_address: str, tmp_path: Path
) -> None:
    """A sweep of the regression model of a user's own (examples/mlp_regressor), ranked by validation RMSE."""
    epochs = 3
    base = tmp_path / "base.pt"  # the user's file, which changes after the sweep started (below)
    base.write_bytes(regression_base.read_bytes())
    args = ["--base-checkpoint", str(base), "--data", str(regression_dataset), "--save-dir", str(tmp_path),
            "--lr-grid", "1e-3,3e-3", "--scheduler", "none", "--max-concurrent-trials", "1", "--sweep-name", "cut",
            "--epochs", str(epochs), "--eval-every", "2", "--select-metric", "val_rmse", *FIXED]
    sweep_dir = parse_location(str(tmp_path / "cut"))

    def progress() -> dict[str, dict]:
        return {trial: latest_run_metrics(run) or {} for trial, run in trial_run_dirs(sweep_dir).items()}

    def done_and_partway() -> bool:
        epochs_done = [m.get("epoch") for m in progress().values() if m]
        return epochs in epochs_done and any(e < epochs for e in epochs_done)

    # 1. Kill the sweep's driver (and its session) once one trial has finished and the other has a checkpoint.
    proc, log = start_sweep(args, ray_address)
    try:
        wait_until(done_and_partway, "a finished trial and a checkpoint of the other", proc=proc, log=log,
                   timeout=240)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        finish_process(proc, log)
    wait_for_run_to_end(ray_address)  # nothing of the killed sweep reports after this
    metrics = progress()
    (done,) = [t for t, m in metrics.items() if m.get("epoch") == epochs]
    (cut,) = [t for t, m in metrics.items() if m.get("epoch", epochs) < epochs]
    runs = trial_run_dirs(sweep_dir)
    done_files = {p: os.stat(p).st_mtime_ns for p in Path(runs[done].path).rglob("*")}
    cut_step = metrics[cut]["global_step"]

    # The user's base file is overwritten meanwhile (retrained, replaced by another run's best_model.pt): the
    # sweep resumes from its own copy, base_checkpoint.pt, the bytes every trial started from.
    base_bytes = base.read_bytes()
    base.write_bytes(b"not the base any more")

    # 2. The same command again. Once the cut trial has moved on, kill its trial driver (Tune's trial actor)
    #    too: Tune runs the trial again, and it continues its own Train run once more.
    proc, log = start_sweep(args, ray_address)
    resumed = re.compile(rf"\[trial {cut} .*Workers loaded .*checkpoint_step=(\d+)")
    try:
        resumed_at = int(wait_until(lambda: resumed.search(output_so_far(log)), "the cut trial's restore", proc=proc,
                                    log=log).group(1))
        wait_until(lambda: progress()[cut].get("global_step", 0) >= resumed_at + 2, "the trial moving on",
                   proc=proc, log=log)
        killed_at = progress()[cut]["global_step"]
        trial_drivers = ray_train_processes(ray_address, "ray::ImplicitFunc")
        assert trial_drivers, "no trial driver process found"
        for pid in trial_drivers:
            os.kill(pid, signal.SIGKILL)
    finally:
        output = finish_process(proc, log)
    assert proc.returncode == 0, output
    assert "🔁 Sweep cut was started before: resuming it" in output
    # The finished trial is not trained again: its run is exactly as it was.
    assert f"Trial {done} (lr " in output and "had already finished: not training it again" in output
    assert {p: os.stat(p).st_mtime_ns for p in Path(runs[done].path).rglob("*")} == done_files
    assert f"[trial {done} " not in output
    # The other continued from its own checkpoints, never from the base: after the sweep's driver was killed
    # (at least the checkpoint seen then), and again after its trial driver was.
    loaded = [line for line in output.splitlines() if f"[trial {cut} " in line and "Workers loaded" in line]
    steps = [int(line.split("checkpoint_step=")[1][:6]) for line in loaded]
    assert len(steps) == 2 and all(f"run-{cut}/checkpoint_step=" in line for line in loaded), loaded
    assert cut_step <= steps[0] < steps[1] and steps[1] >= killed_at
    final = latest_run_metrics(runs[cut])
    assert final["epoch"] == epochs and final["global_step"] == STEPS_PER_EPOCH * epochs
    rows = read_results(sweep_dir)
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 3e-3]
    assert {r["status"] for r in rows} == {"finished"}
    assert all(math.isfinite(float(r["best_val_loss"])) for r in rows)
    assert sweep_dir.join("base_checkpoint.pt").read_bytes() == base_bytes
    assert {load_state(runs[cut].join(f"checkpoint_step={STEPS_PER_EPOCH * epochs:06d}", "state.pt"))["lineage"][
        "base_sha256"]} == {hashlib.sha256(base_bytes).hexdigest()}


def test_a_trial_whose_workers_fail_more_than_max_failures_ends_as_error_and_the_sweep_exits_1(
        base_checkpoint: Path, dataset: Path, ray_address: str, tmp_path: Path) -> None:
    """--max-failures 0 and the trial's Train worker SIGKILLed after its first checkpoint: the trial ends as
    `error` (its folder says why), and the sweep says which trial did not finish and exits 1."""
    args = ["--base-checkpoint", str(base_checkpoint), "--data", str(dataset), "--save-dir", str(tmp_path),
            "--lr-grid", "1e-3", "--scheduler", "none", "--sweep-name", "failing", "--epochs", "3",
            "--eval-every", "2", "--max-failures", "0", *FIXED]
    sweep_dir = parse_location(str(tmp_path / "failing"))
    proc, log = start_sweep(args, ray_address)
    try:
        [run] = wait_until(lambda: list(trial_run_dirs(sweep_dir).values()), "the trial's run folder", proc=proc,
                           log=log)
        wait_until(lambda: latest_run_metrics(run), "the trial's first checkpoint", proc=proc, log=log)
        workers = ray_train_processes(ray_address, "ray::RayTrainWorker")  # the trial's one worker
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        output = finish_process(proc, log)
    assert proc.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors[-1] == ("error: 1 trial(s) did not finish (lr 0.001). Re-run the same command to resume them "
                          "from their latest checkpoints."), output
    [row] = read_results(sweep_dir)
    assert row["status"] == "error" and int(row["steps_trained"]) < 2 * STEPS_PER_EPOCH, row
    mark = json.loads(sweep_dir.join(f"trial-{row['trial_id']}", "training_failed.json").read_bytes())
    assert mark["max_failures"] == 0 and mark["global_step"] == latest_run_metrics(run)["global_step"], mark


def test_trials_that_can_never_fit_fail_fast(base_checkpoint: Path, dataset: Path, ray_address: str,
                                            tmp_path: Path) -> None:
    args = ["--base-checkpoint", str(base_checkpoint), "--data", str(dataset), "--save-dir", str(tmp_path / "s"),
            "--lr-grid", "1e-3", "--epochs", "2", *FIXED, "--num-workers", "4"]
    result = run_tune(args, ray_address, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # Ray logs its connection
    assert errors == ["error: one trial needs CPU 4.1 (4 workers and the trial's driver) but this cluster has CPU 4: "
                      "lower --num-workers or add nodes"]
    assert not (tmp_path / "s").exists()
