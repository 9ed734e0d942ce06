"""One sweep trial: a Ray Tune function trainable that runs one Ray Train run.

The trial's Train run lives at `<sweep-dir>/trial-<trial id>/run-<trial id>/` and its best weights at
`<sweep-dir>/trial-<trial id>/best_model.pt`. The names come from the trial id alone, so when Tune retries a
trial (its driver died) or a re-run restores the sweep, the same Train run is found and continued from its own
latest checkpoint; a trial with no checkpoint yet starts from the sweep's base checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from raytrain_app.checkpoint.resolve import verified_name
from raytrain_app.core.config import ALL_SCORES, TrainConfig, higher_is_better
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.metrics import measured
from raytrain_app.observability.sweep_results import trial_dir_name
from raytrain_app.ray_adapter.driver import make_trainer
from raytrain_app.ray_adapter.run_record import latest_run_metrics, recover_run
from raytrain_app.storage.location import Location, parse_location

log = logging.getLogger(__name__)

# Written into a trial's folder when Ray Train gave up on it (its workers failed --max-failures times): Tune's
# own retries of the trial are for lost trial drivers, not for repeating the same failure (N+1)^2 times.
TRAIN_FAILED_MARK = "training_failed.json"  # {"max_failures", "global_step", "error"}


# What Tune reserves for the trial itself (the process that drives the TorchTrainer); the Train workers
# reserve their own. Tune rejects 0.
TRIAL_DRIVER_CPUS = 0.1
LOSS_KEYS = ("val_loss", "best_val_loss", "train_ema_loss")


def trial_run_name(trial_id: str) -> str:
    return f"run-{trial_id}"


def clear_failure_marks(sweep_dir: Location) -> None:
    """Forget that trials failed: a re-run of the sweep command tries them again."""
    for entry in sweep_dir.list():
        if entry.base_name.startswith("trial-"):
            sweep_dir.join(entry.base_name, TRAIN_FAILED_MARK).remove()


def tune_metrics(metrics: dict[str, Any], base_global_step: int) -> dict[str, Any]:
    """What a trial reports to Tune: the worker's metrics, plus `steps_trained` since the base checkpoint (ASHA's
    clock: it keeps counting across retries and restores, unlike Tune's own iteration count). A diverged
    loss is reported as +inf: NaN compares false with everything, so ASHA would never stop that trial. So is the
    stand-in Ray Train is given for a loss that was not measured or not finite (UNVALIDATED_LOSS), and a task's
    score that was not measured is its worst: -inf for val_accuracy, +inf for val_rmse and val_mae (the worst
    for --select-metric by that score)."""
    from raytrain_app.core.trainer import UNVALIDATED_LOSS

    out = dict(metrics)
    out["steps_trained"] = int(out["global_step"]) - base_global_step
    for key in LOSS_KEYS:
        if key in out and not (math.isfinite(out[key]) and out[key] < UNVALIDATED_LOSS):
            out[key] = math.inf
    for name in ALL_SCORES:
        for key in (name, f"best_{name}"):
            if key in out and not measured(name, out[key]):
                out[key] = -math.inf if higher_is_better(name) else math.inf
    return out


def report_callback(base_global_step: int) -> Any:
    """A Ray Train callback that forwards every report of the trial's workers to Tune (Ray's
    TuneReportCallback), in the form above. Built here, in the trial, because it must be created inside a
    Tune session; Ray is imported only now so that importing this module does not start Ray's set-up."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            metrics = [tune_metrics(metrics[0], base_global_step), *metrics[1:]]  # rank 0's is the one sent
            super().after_report(run_context, metrics, checkpoint)

    return SweepReportCallback()


def train_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune trainable. `config`: {"lr": the trial's learning rate}. `spec`, what every trial shares (bound
    with tune.with_parameters): config (TrainConfig dict), sweep_dir and base (URIs or paths), sweep_name,
    lineage (of the base)."""
    from ray import tune

    configure_console()  # the trial's lines reach the sweep's console through Ray's forwarding of stdout/stderr
    trial_id = tune.get_context().get_trial_id()
    trial_dir = parse_location(spec["sweep_dir"]).join(trial_dir_name(trial_id))
    run_name = trial_run_name(trial_id)
    cfg = TrainConfig.from_dict(spec["config"]).replace(lr=config["lr"], save_dir=trial_dir.uri, run_name=run_name)
    base_step = int(spec["lineage"]["base_global_step"])

    # Finished before the sweep's driver recorded it (the driver was killed in between): report the result
    # again instead of starting workers that would have nothing to train.
    done = latest_run_metrics(trial_dir.join(run_name))
    if done and int(done.get("epoch", 0)) >= cfg.epochs:
        log.info(f"Trial {trial_id} (lr {cfg.lr:g}) had already finished: not training it again.")
        tune.report(tune_metrics(done, base_step))
        return

    failed = trial_dir.join(TRAIN_FAILED_MARK)
    if failed.is_file():
        mark = json.loads(failed.read_bytes())
        raise RuntimeError(f"trial {trial_id}: training failed after {mark['max_failures']} worker restart(s) "
                           f"(latest checkpoint at step {mark['global_step']}); not retrying it. Re-run the sweep "
                           f"command to try again from its latest checkpoint. The failure: {mark['error']}")

    # The trial's own latest checkpoint, verified: one that is not whole is named and the trial falls back.
    verified = recover_run(trial_dir.join(run_name), warn=lambda line: log.info(f"[trial {trial_id}] {line}"))

    import ray.train

    lineage = {**spec["lineage"], "sweep_name": spec["sweep_name"], "trial_id": trial_id}
    trainer = make_trainer(cfg, run_name=run_name, storage=trial_dir, init_from=spec["base"], lineage=lineage,
                           callbacks=[report_callback(base_step)], fork_keeps_best=False,
                           log_prefix=f"[trial {trial_id} lr {cfg.lr:.3g}] ", wandb_group=spec["sweep_name"],
                           verified_checkpoint=verified_name(verified))
    try:
        trainer.fit()
        # A finished trial's last result in Tune must be its end: report the run's final checkpoint once more.
        # Every report reaches Tune through the callback, but on a loaded machine fit() was seen to return before
        # the last one had, and the sweep then took the finished trial for one stopped early. (A diverged trial
        # ends before --epochs: its own last report, which says so, stays the last.)
        final = latest_run_metrics(trial_dir.join(run_name)) or {}
        if int(final.get("epoch", 0)) >= cfg.epochs:
            tune.report(tune_metrics(final, base_step))
    except ray.train.TrainingFailedError as e:
        try:
            step = (latest_run_metrics(trial_dir.join(run_name)) or {}).get("global_step")
            mark = {"max_failures": cfg.max_failures, "global_step": step, "error": str(e).strip()[-2000:]}
            failed.write_bytes(json.dumps(mark).encode())
        except Exception:  # noqa: BLE001 - never hide the training failure behind a storage one
            pass
        raise

