"""The sweep's settings, planning, reporting and results, without a Ray cluster."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from raytrain_app.checkpoint.format import write_best_model
from raytrain_app.checkpoint.state import with_training_state
from raytrain_app.cli.flags import parse_sweep_config
from raytrain_app.core.config import ConfigError, TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.observability.sweep_results import TrialResult, best_trial, csv_bytes, plot_png, table
from raytrain_app.ray_adapter.capacity import how_many_fit
from raytrain_app.ray_adapter.sweep_trial import tune_metrics
from raytrain_app.tune import plan_sweep
from tests.conftest import REPO_ROOT, base_env
from tests.helpers import TINY_MODEL, run_in_process

BASE = ["--base-checkpoint", "base.pt"]


def test_sweep_flags_and_defaults() -> None:
    sweep, cfg, given = parse_sweep_config([*BASE, "--lr-grid", "1e-5,3e-5,1e-4", "--epochs", "7", "--dropout", "0"])
    assert sweep.lr_grid == (1e-5, 3e-5, 1e-4) and sweep.learning_rates(0) == [1e-5, 3e-5, 1e-4]
    assert sweep.scheduler == "asha" and sweep.reduction_factor == 3.0
    assert cfg.epochs == 7 and cfg.dropout == 0.0 and given == {"epochs", "dropout"}
    assert cfg.restart_schedule and not cfg.reset_optimizer  # trials get a fresh schedule, keep the moments
    _, cfg, _ = parse_sweep_config([*BASE, "--lr-grid", "1e-4", "--no-restart-schedule", "--reset-optimizer"])
    assert not cfg.restart_schedule and cfg.reset_optimizer


def test_log_uniform_learning_rates_are_seeded_and_in_range() -> None:
    sweep, cfg, _ = parse_sweep_config([*BASE, "--lr-min", "1e-5", "--lr-max", "1e-2", "--num-samples", "6"])
    lrs = sweep.learning_rates(cfg.seed)
    assert lrs == sweep.learning_rates(cfg.seed) != sweep.learning_rates(cfg.seed + 1)
    assert len(lrs) == 6 and lrs == sorted(lrs) and all(1e-5 <= lr <= 1e-2 for lr in lrs)
    # Log-uniform: both decades are sampled, not just the top one.
    assert min(lrs) < 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--lr-grid", "1e-4"], "--base-checkpoint is required"),
    ([*BASE], "give the learning rates to try"),
    ([*BASE, "--lr-grid", "1e-4", "--lr-min", "1e-5", "--lr-max", "1e-3"], "not both"),
    ([*BASE, "--lr-min", "1e-3", "--lr-max", "1e-5"], "need 0 < --lr-min < --lr-max"),
    ([*BASE, "--lr-min", "1e-5"], "--lr-min and --lr-max go together"),
    ([*BASE, "--lr-grid", "1e-4,abc"], "--lr-grid must be comma-separated numbers"),
    ([*BASE, "--lr-grid", "1e-4,-1"], "--lr-grid values must be positive"),
    ([*BASE, "--lr-grid", "1e-4,1e-4"], "lists a learning rate twice"),
    ([*BASE, "--lr-grid", "1e-4", "--reduction-factor", "1"], "--reduction-factor must be greater than 1"),
    ([*BASE, "--lr-grid", "1e-4", "--lr", "1e-3"], "--lr is not a sweep setting: the sweep sets each trial's"),
    ([*BASE, "--lr-grid", "1e-4", "--resume-from-checkpoint", "x.pt"], "every trial starts from --base-checkpoint"),
    ([*BASE, "--lr-grid", "1e-4", "--run-name", "x"], "name the sweep with --sweep-name"),
])
def test_sweep_mistakes_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_sweep_config(argv)


def test_sweep_settings_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("base-checkpoint: b.pt\nlr_grid: [1.0e-4, 3.0e-4]\nepochs: 4\nscheduler: none\n")
    sweep, cfg, given = parse_sweep_config(["--config", str(path), "--epochs", "5"])
    assert sweep.lr_grid == (1e-4, 3e-4) and sweep.scheduler == "none" and cfg.epochs == 5 and "epochs" in given


def test_trials_that_fit_at_once() -> None:
    assert how_many_fit({"CPU": 1.1}, {"CPU": 4.0}) == 3
    assert how_many_fit({"CPU": 2.1}, {"CPU": 4.0}) == 1
    assert how_many_fit({"CPU": 4.1}, {"CPU": 4.0}) == 0
    assert how_many_fit({"CPU": 0.1, "GPU": 2.0}, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert how_many_fit({"CPU": 0.1, "GPU": 1.0}, {"CPU": 64.0}) == 0
    assert how_many_fit({"CPU": 3.3}, {"CPU": 9.9}) == 3  # not 2: floating-point rounding


def test_tune_metrics_count_steps_from_the_base_and_turn_nan_into_inf() -> None:
    metrics = tune_metrics({"global_step": 40, "val_loss": math.nan, "best_val_loss": 0.5, "epoch": 2}, 32)
    assert metrics["steps_trained"] == 8 and metrics["val_loss"] == math.inf and metrics["best_val_loss"] == 0.5


def rows() -> list[TrialResult]:
    return [
        TrialResult("a_00000", 1e-4, "finished", 0.9, 0.95, 32, "/s/a0/best_model.pt", [(8, 1.0), (32, 0.95)]),
        TrialResult("a_00001", 1e-3, "finished", 0.7, 0.7, 32, "/s/a1/best_model.pt", [(8, 0.8), (32, 0.7)]),
        TrialResult("a_00002", 1.0, "stopped early", math.inf, math.inf, 8, "", [(8, math.inf)]),
    ]


def test_results_table_csv_and_plot_hold_every_trial() -> None:
    results = rows()
    assert best_trial(results).lr == 1e-3
    text = table(results).splitlines()
    assert len(text) == 4 and text[2].lstrip().startswith("*") and "stopped early" in text[3]
    parsed = list(csv.DictReader(io.StringIO(csv_bytes(results).decode())))
    assert [float(r["lr"]) for r in parsed] == [1e-4, 1e-3, 1.0]
    assert parsed[2]["best_val_loss"] == "inf" and parsed[1]["best_checkpoint"].endswith("best_model.pt")
    image = Image.open(io.BytesIO(plot_png(results, "t", base_value=1.05)))
    assert image.format == "PNG" and image.size == (1200, 450)
    assert all(f"lr={r.lr!r} status={r.status}" in image.text["Description"] for r in results)


@pytest.fixture(scope="module")
def base_pt(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """A one-epoch checkpoint of the tiny model on the tiny dataset (8 steps of 32)."""
    from raytrain_app.datasets.formats import open_dataset

    cfg = TrainConfig(data=str(dataset), hidden_dim=16, num_layers=2, num_heads=2, batch_size=32, epochs=1,
                      num_workers=1, eval_every=100, feature_dim=4, seq_len=8, num_classes=3)
    seed_everything(0, 0)
    model = SequenceTransformer(cfg)
    states: list[dict] = []
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    trainer.fit(open_dataset(str(dataset)), with_training_state(trainer, lambda m, s, b: states.append(s)))
    return Path(write_best_model(str(tmp_path_factory.mktemp("b")), states[-1]).path)


def sweep_args(base: Path, dataset: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--base-checkpoint", str(base), "--data", str(dataset), "--save-dir", str(save_dir), "--num-workers", "1",
            "--batch-size", "32", "--lr-grid", "1e-4,1e-3", *TINY_MODEL, *extra]


def test_plan_counts_each_trials_steps_and_names_the_sweep(base_pt: Path, dataset: Path, tmp_path: Path) -> None:
    plans = [plan_sweep(sweep_args(base_pt, dataset, tmp_path, "--epochs", "3", *extra))
             for extra in ([], ["--max-concurrent-trials", "1"], ["--epochs", "4"])]
    for p in plans:
        assert os.path.isfile(p.base_copy)
        p.cleanup()
        assert not os.path.exists(p.base_copy)  # the local copy of the base is the sweep's to remove
    plan, again, other = plans
    assert plan.summary.global_step == 8 and plan.trial_steps == 16  # epochs 2 and 3 of 8 steps each
    assert plan.name.startswith("sweep-") and not plan.resuming
    assert plan.grace_period == 8  # --eval-every (50) is past half a trial
    assert again.name == plan.name  # how many at once is not part of what a sweep trains
    assert other.name != plan.name


def run_tune_cli(args: list[str]) -> Any:
    """`python -m raytrain_app.tune` in this process: these mistakes are found before Ray starts."""
    from raytrain_app.tune import main

    return run_in_process(main, args)


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "1"], "--epochs 1 is a total and the base checkpoint has completed 1 epochs: pass --epochs 2"),
    (["--epochs", "2", "--grace-period", "8"], "--grace-period 8 is not below the 8 steps each trial trains"),
    (["--epochs", "2", "--hidden-dim", "32"], "does not fit this model: --hidden-dim 32 (checkpoint has 16)"),
])
def test_sweep_mistakes_exit_2_with_one_line_and_write_nothing(
    base_pt: Path, dataset: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    result = run_tune_cli(sweep_args(base_pt, dataset, tmp_path / "sweeps", *extra))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "sweeps").exists()


def test_missing_base_checkpoint_is_an_error_not_a_fresh_start(dataset: Path, tmp_path: Path) -> None:
    result = run_tune_cli(sweep_args(tmp_path / "nowhere.pt", dataset, tmp_path / "sweeps", "--epochs", "2"))
    assert result.returncode == 2
    assert f"error: --base-checkpoint {tmp_path / 'nowhere.pt'}: no checkpoint there" in result.stderr
    assert not (tmp_path / "sweeps").exists()


class FakeResult:
    """The fields of a Tune `Result` that `collect` reads (Tune's ResultGrid holds these)."""

    def __init__(self, path: str, lr: float, metrics: dict, frame: dict | None = None,
                 error: Exception | None = None) -> None:
        import pandas as pd

        self.path, self.config, self.metrics, self.error = path, {"lr": lr}, metrics, error
        self.metrics_dataframe = pd.DataFrame(frame) if frame is not None else None


def test_collect_reads_status_curves_and_best_checkpoints(tmp_path: Path) -> None:
    from raytrain_app.observability.sweep_results import collect
    from raytrain_app.storage.location import parse_location

    sweep_dir = parse_location(str(tmp_path))
    for trial in ("t_0", "t_1"):
        (tmp_path / f"trial-{trial}").mkdir()
        (tmp_path / f"trial-{trial}" / "best_model.pt").write_bytes(b"x")
    last = {"epoch": 3, "global_step": 24, "steps_trained": 16, "val_loss": 0.6, "best_val_loss": 0.5}
    results = [
        # finished; resumed once, so steps 8 and 12 were reported twice: the last value per step counts
        FakeResult(str(tmp_path / "trial-t_0"), 1e-3, last,
                   {"steps_trained": [4, 8, 12, 8, 12, 16], "val_loss": [0.9, 0.8, 0.7, 0.8, 0.5, 0.6]}),
        # ended before --epochs without an error
        FakeResult(str(tmp_path / "trial-t_1"), 1.0,
                   {**last, "epoch": 1, "steps_trained": 4, "val_loss": 2.0, "best_val_loss": 2.0},
                   {"steps_trained": [4], "val_loss": [2.0]}),
        FakeResult(str(tmp_path / "trial-t_2"), 3.0, {}, None, error=RuntimeError("boom")),  # failed before reporting
        FakeResult(str(tmp_path / "trial-t_3"), 1e-4, {}, None),  # never ran
    ]
    rows = {r.lr: r for r in collect(results, sweep_dir=sweep_dir, epochs=3, ended_by_tune={"t_0", "t_1"})}
    assert rows[1e-3].status == "finished" and rows[1e-3].curve == [(4, 0.9), (8, 0.8), (12, 0.5), (16, 0.6)]
    assert rows[1e-3].best_val_loss == 0.5 and rows[1e-3].best_checkpoint.endswith("trial-t_0/best_model.pt")
    assert rows[1.0].status == "stopped early" and rows[1.0].steps_trained == 4
    assert rows[3.0].status == "error" and rows[3.0].best_checkpoint == ""
    assert rows[1e-4].status == "not run"
    # Interrupted (Ctrl-C): a trial Tune had not ended is unfinished, not stopped early.
    rows = {r.lr: r for r in collect(results, sweep_dir=sweep_dir, epochs=3, ended_by_tune={"t_0"})}
    assert rows[1.0].status == "unfinished"
    # A trial that stopped itself after too many non-finite steps in a row says so (its last report says it).
    results[1].metrics = {**results[1].metrics, "diverged": True, "val_loss": math.inf}
    rows = {r.lr: r for r in collect(results, sweep_dir=sweep_dir, epochs=3, ended_by_tune=set())}
    assert rows[1.0].status == "diverged"


def test_a_named_sweep_resumes_only_with_its_own_settings(base_pt: Path, dataset: Path, tmp_path: Path) -> None:
    import json

    from raytrain_app.core.errors import UserError

    plan = plan_sweep(sweep_args(base_pt, dataset, tmp_path, "--epochs", "3", "--sweep-name", "s"))
    plan.cleanup()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"identity": "something-else"}))
    with pytest.raises(UserError, match="sweep s in .* was started with other settings"):
        plan_sweep(sweep_args(base_pt, dataset, tmp_path, "--epochs", "3", "--sweep-name", "s"))


def test_importing_the_commands_does_not_import_ray() -> None:
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported; the commands set it before importing Ray.
    code = "import sys, raytrain_app.main, raytrain_app.tune; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=base_env(), capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_trial_steps_count_from_a_mid_epoch_base_in_the_trials_geometry() -> None:
    from raytrain_app.checkpoint.resolve import StateSummary
    from raytrain_app.tune import trial_steps

    cfg = TrainConfig(batch_size=16, num_workers=2, grad_accum_steps=1, epochs=3)  # 256 rows: 8 batches/epoch
    # The base stopped after 8 batches of 8 on 2 workers in epoch 1 (of 16): 128 samples, i.e. 4 of ours.
    position = {"epoch": 1, "batch_index": 8, "batch_size": 8, "world_size": 2}
    summary = StateSummary(path="b", epoch=1, global_step=24, best_val_loss=None, train_ema_loss=None, config={},
                           has_optimizer=True, has_scaler=False, data_position=position, model_shapes={})
    assert trial_steps(cfg, 256, summary) == 4 + 8  # the rest of epoch 2, then epoch 3
    accum = cfg.replace(grad_accum_steps=3)  # 8 batches: steps after batches 3, 6 and 8 (a short last group)
    assert trial_steps(accum, 256, summary) == 2 + 3


def test_select_metric_val_accuracy_ranks_trials_by_accuracy_not_loss() -> None:
    results = rows()
    results[0].best_scores["val_accuracy"], results[1].best_scores["val_accuracy"] = 0.9, 0.6  # the lower loss:
    # the lower accuracy
    assert best_trial(results, "val_accuracy").lr == 1e-4 and best_trial(results).lr == 1e-3
    text = table(results, "val_accuracy").splitlines()
    assert text[1].lstrip().startswith("*") and "0.9000" in text[1] and text[3].split()[2] == "-"
    parsed = list(csv.DictReader(io.StringIO(csv_bytes(results).decode())))
    assert [r["best_val_accuracy"] for r in parsed] == ["0.9", "0.6", "-inf"]
    image = Image.open(io.BytesIO(plot_png(results, "t", base_value=0.5, metric="val_accuracy")))
    assert image.text["Comment"] == "plotted: val_accuracy"


def test_a_regression_sweep_ranks_trials_by_the_lowest_rmse_or_loss(tmp_path: Path) -> None:
    """--select-metric val_rmse: the lowest RMSE wins (not the highest), whichever trial has the lowest loss; the
    table shows RMSE beside the loss, results.csv each score's best and final value."""
    from raytrain_app.observability.sweep_results import collect
    from raytrain_app.storage.location import parse_location

    for trial in ("r_0", "r_1", "r_2"):
        (tmp_path / f"trial-{trial}").mkdir()
        (tmp_path / f"trial-{trial}" / "best_model.pt").write_bytes(b"x")

    def trial(name: str, lr: float, losses: list[float], rmses: list[float]) -> FakeResult:
        maes = [r / 2 for r in rmses]
        last = {"epoch": 2, "global_step": 16, "steps_trained": 16, "val_loss": losses[-1],
                "best_val_loss": min(losses), "val_rmse": rmses[-1], "best_val_rmse": min(rmses),
                "val_mae": maes[-1], "best_val_mae": min(maes)}
        return FakeResult(str(tmp_path / f"trial-{name}"), lr, last,
                          {"steps_trained": [8, 16], "val_loss": losses, "val_rmse": rmses, "val_mae": maes})

    results = [trial("r_0", 1e-4, [0.30, 0.20], [0.60, 0.50]),  # the lowest loss
               trial("r_1", 1e-3, [0.40, 0.25], [0.50, 0.40]),  # the lowest RMSE
               trial("r_2", 1e-2, [0.90, 0.80], [0.95, 0.90])]
    rows = collect(results, sweep_dir=parse_location(str(tmp_path)), epochs=2, ended_by_tune=set(),
                   scores=("val_rmse", "val_mae"))
    assert [r.best("val_rmse") for r in rows] == [0.5, 0.4, 0.9]
    assert rows[1].curve_of("val_rmse") == [(8, 0.5), (16, 0.4)] and rows[1].final("val_mae") == 0.2
    assert best_trial(rows, "val_rmse").lr == 1e-3 and best_trial(rows, "val_mae").lr == 1e-3
    assert best_trial(rows, "val_loss").lr == 1e-4
    text = table(rows, "val_rmse").splitlines()
    assert "best val RMSE" in text[0] and "best val acc" not in text[0]
    assert text[2].lstrip().startswith("*") and text[2].split()[3] == "0.4000"
    parsed = list(csv.DictReader(io.StringIO(csv_bytes(rows).decode())))
    assert list(parsed[0])[-4:] == ["best_val_rmse", "final_val_rmse", "best_val_mae", "final_val_mae"]
    assert [r["best_val_rmse"] for r in parsed] == ["0.5", "0.4", "0.9"]
    image = Image.open(io.BytesIO(plot_png(rows, "t", base_value=0.7, metric="val_rmse")))
    assert image.text["Comment"] == "plotted: val_rmse" and "best_val_rmse=0.4" in image.text["Description"]
    # A trial without an RMSE yet ranks last: an unmeasured error is +inf, as tune_metrics reports it.
    metrics = tune_metrics({"global_step": 40, "val_loss": 0.4, "val_rmse": sys.float_info.max,
                            "best_val_rmse": 0.3, "val_mae": math.nan, "best_val_mae": sys.float_info.max}, 32)
    assert metrics["val_rmse"] == metrics["val_mae"] == metrics["best_val_mae"] == math.inf
    assert metrics["best_val_rmse"] == 0.3


def test_tune_metrics_turn_an_unmeasured_accuracy_into_minus_inf() -> None:
    metrics = tune_metrics({"global_step": 40, "val_loss": 0.4, "val_accuracy": -1.0, "best_val_accuracy": 0.7}, 32)
    assert metrics["val_accuracy"] == -math.inf and metrics["best_val_accuracy"] == 0.7
