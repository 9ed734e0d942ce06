"""Learning-rate sweeps from a base checkpoint:

    python -m raytrain_app.tune --base-checkpoint X --data D --lr-grid 1e-5,3e-5,1e-4 [training flags]

Every trial is one Ray Train run (`sweep_trial.py`) started from the same base checkpoint with its own learning
rate; every other training flag is fixed for all trials. ASHA stops poor trials early. The sweep lives in
`<save-dir>/<sweep-name>/`; the same command resumes an interrupted sweep: finished trials are kept,
unfinished ones continue from their own latest checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, fields
from typing import Any

from raytrain_app.checkpoint.resolve import StateSummary, fork_lineage, resolve_checkpoint
from raytrain_app.cli.commands import python_for_commands
from raytrain_app.cli.errors import EXIT_TRAINING_FAILED, USER_ERRORS, run_command
from raytrain_app.cli.flags import parse_sweep_config
from raytrain_app.cli.preflight import prepare_data, prepare_start, start_position
from raytrain_app.core.config import SCORE_LABELS, SweepConfig, TrainConfig, sweep_identity_hash
from raytrain_app.core.errors import UserError
from raytrain_app.core.trainer import resume_batch_index
from raytrain_app.datasets.order import batches_per_epoch
from raytrain_app.observability import sweep_results
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.metrics import prepare_wandb
from raytrain_app.ray_adapter.capacity import cluster_capacity, how_many_fit, run_resources
from raytrain_app.ray_adapter.driver import connect_ray
from raytrain_app.ray_adapter.sweep import BASE_FILE, SWEEP_FILE, ended_trials, run_tuner
from raytrain_app.ray_adapter.sweep_trial import TRIAL_DRIVER_CPUS, clear_failure_marks
from raytrain_app.storage.location import Location, StorageError, check_bucket, parse_location
from raytrain_app.storage.publish import fetch_file, publish_bytes, publish_file

# Flags of the training CLI that make no sense in a "continue the best trial" command.
NOT_CONTINUED = {"data", "epochs", "reset_optimizer", "restart_schedule"}


@dataclass
class SweepPlan:
    """What the sweep's driver decided before starting Ray."""

    sweep: SweepConfig
    cfg: TrainConfig  # fixed settings of every trial (its lr is replaced per trial)
    given: set[str]  # training fields the user set
    name: str
    sweep_dir: Location
    learning_rates: list[float]
    summary: StateSummary  # of the base checkpoint, without its weights
    lineage: dict[str, Any]  # of the base checkpoint: what every trial records
    base_copy: str | None  # first start: a local copy of the base (checked, hashed, then published), else None
    identity: str
    record: dict[str, Any] | None  # sweep.json of an earlier start of this sweep, None on the first
    trial_steps: int  # optimizer steps each trial trains to reach --epochs
    grace_period: int

    @property
    def resuming(self) -> bool:
        return self.record is not None

    def cleanup(self) -> None:
        _remove_base_copy(self.base_copy)


def _remove_base_copy(base_copy: str | None) -> None:
    if base_copy:
        shutil.rmtree(os.path.dirname(base_copy), ignore_errors=True)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def trial_steps(cfg: TrainConfig, num_train: int, summary: StateSummary) -> int:
    """Optimizer steps a trial takes from the base checkpoint to the end of --epochs (ASHA's max_t), counted as
    the loop will take them: from the batch it resumes at in the base's epoch, in the trial's batch geometry."""
    batches = batches_per_epoch(num_train, cfg.batch_size, cfg.num_workers)
    accum = cfg.grad_accum_steps
    first = resume_batch_index(summary.data_position, summary.epoch, cfg.batch_size, cfg.num_workers)
    this_epoch = sum(1 for b in range(first, batches) if (b + 1) % accum == 0 or b == batches - 1)
    return this_epoch + (cfg.epochs - summary.epoch - 1) * math.ceil(batches / accum)


def read_record(sweep_dir: Location) -> dict[str, Any] | None:
    record = sweep_dir.join(SWEEP_FILE)
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(f"{record} is not readable ({e}): this sweep cannot resume; pass another --sweep-name") \
            from None


def fetch_base(found: Location) -> tuple[str, str]:
    """A local copy of the base checkpoint and its SHA-256: the sweep checks, hashes and publishes these bytes,
    whatever happens to the original meanwhile (a best_model.pt is replaced whenever its run improves)."""
    tmp_dir = tempfile.mkdtemp(prefix="raytrain-sweep-base-")
    try:
        return fetch_file(found, tmp_dir)
    except BaseException as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, OSError):
            raise StorageError(f"--base-checkpoint {found}: could not read it ({e})") from None
        raise


def plan_sweep(argv: list[str]) -> SweepPlan:
    """Everything before Ray: settings, data, the base checkpoint, the sweep's name and whether it resumes."""
    sweep, cfg, given = parse_sweep_config(argv)
    save_dir = parse_location(cfg.save_dir, flag="--save-dir")
    check_bucket(save_dir)
    identity = sweep_identity_hash(sweep, cfg)
    name = sweep.sweep_name or f"sweep-{identity}"
    sweep_dir = save_dir.join(name)
    cfg, data = prepare_data(cfg.replace(save_dir=save_dir.uri))
    learning_rates = sweep.learning_rates(cfg.seed)

    record = read_record(sweep_dir)
    if record is not None:
        if record["identity"] != identity:
            raise UserError(
                f"sweep {name} in {sweep_dir} was started with other settings; re-run it with the settings in "
                f"{sweep_dir.join(SWEEP_FILE)}, or pass another --sweep-name"
            )
        base = sweep_dir.join(BASE_FILE)
        if not base.is_file():
            raise UserError(f"{base} is missing: this sweep cannot resume; pass another --sweep-name to start anew")
        base_copy, base_sha256, read_from = None, None, base
    else:
        found = resolve_checkpoint(sweep.base_checkpoint, flag="--base-checkpoint")
        if found is None:
            raise UserError(f"--base-checkpoint {sweep.base_checkpoint}: no checkpoint there. Pass a .pt file, a "
                            "checkpoint folder or a run folder.")
        base = found
        base_copy, base_sha256 = fetch_base(found)
        read_from = parse_location(base_copy)
    try:
        cfg, summary = prepare_start(cfg, given, read_from, data, label=base.uri)
        if summary.sharded:
            raise UserError(f"--base-checkpoint {sweep.base_checkpoint} is a sharded checkpoint (--strategy fsdp): "
                            "start the sweep from its run's best_model.pt, which holds the same state in one file")
        steps = trial_steps(cfg, data.train.num_rows, summary)
        grace = check_schedule(sweep, cfg, summary, steps)
        lineage = record["lineage"] if record else fork_lineage(base, summary, sha256=base_sha256)
    except BaseException:
        _remove_base_copy(base_copy)
        raise
    return SweepPlan(sweep=sweep, cfg=cfg, given=given, name=name, sweep_dir=sweep_dir,
                     learning_rates=learning_rates, summary=summary, lineage=lineage, base_copy=base_copy,
                     identity=identity, record=record, trial_steps=steps, grace_period=grace)


def check_schedule(sweep: SweepConfig, cfg: TrainConfig, summary: StateSummary, steps: int) -> int:
    """Check that trials have something to train and ASHA something to stop; returns the grace period."""
    done_epochs, _ = start_position(summary)
    if done_epochs >= cfg.epochs:
        raise UserError(f"--epochs {cfg.epochs} is a total and the base checkpoint has completed {done_epochs} "
                        f"epochs: pass --epochs {done_epochs + 1} or more")
    if sweep.scheduler == "none":
        return 0
    if sweep.grace_period is None:
        if steps < 2:
            raise UserError(f"each trial trains only {steps} step: ASHA could never stop a trial. Raise --epochs or "
                            "pass --scheduler none.")
        return min(cfg.eval_every, steps // 2)
    if sweep.grace_period >= steps:
        raise UserError(f"--grace-period {sweep.grace_period} is not below the {steps} steps each trial trains: ASHA "
                        "could never stop a trial. Lower --grace-period, raise --epochs, or pass --scheduler none.")
    return sweep.grace_period


def fit_concurrency(plan: SweepPlan) -> int:
    """How many trials run at once: what the user asked for, capped by what the cluster can ever hold.
    Raises UserError when not even one trial fits."""
    need = run_resources(plan.cfg)
    need["CPU"] = need.get("CPU", 0.0) + TRIAL_DRIVER_CPUS
    capacity, autoscaling = cluster_capacity()
    fits = how_many_fit(need, capacity)
    shown_need = ", ".join(f"{k} {v:g}" for k, v in sorted(need.items()) if v)
    shown_capacity = ", ".join(f"{k} {capacity.get(k, 0):g}" for k in sorted(need) if need[k])
    where = "this cluster can grow to" if autoscaling else "this cluster has"
    if fits == 0:
        raise UserError(f"one trial needs {shown_need} ({plan.cfg.num_workers} workers and the trial's driver) but "
                        f"{where} {shown_capacity}: lower --num-workers or add nodes")
    wanted = plan.sweep.max_concurrent_trials or len(plan.learning_rates)
    running = min(wanted, fits, len(plan.learning_rates))
    if plan.sweep.max_concurrent_trials and plan.sweep.max_concurrent_trials > fits:
        print(f"⚠️  --max-concurrent-trials {plan.sweep.max_concurrent_trials}: only {fits} trial(s) fit at once "
              f"({shown_need} each; {where} {shown_capacity}). Running {running} at once.")
    else:
        print(f"  Trials at once: {running} (each needs {shown_need}; {where} {shown_capacity})")
    return running


def start_record(plan: SweepPlan) -> None:
    """First start: publish the base's copy into the sweep, then sweep.json (its presence means the sweep has
    started). Later starts reuse both."""
    if plan.resuming:
        return
    record = {
        "identity": plan.identity,
        "sweep_name": plan.name,
        "sweep": plan.sweep.to_dict(),
        "train": plan.cfg.to_dict(),
        "learning_rates": plan.learning_rates,
        "lineage": plan.lineage,
    }
    try:
        publish_file(plan.base_copy, plan.sweep_dir.join(BASE_FILE))
        publish_bytes(json.dumps(record, indent=1).encode(), plan.sweep_dir.join(SWEEP_FILE))
    except OSError as e:
        raise StorageError(f"could not write the sweep into {plan.sweep_dir}: {e}") from None


def continue_command(plan: SweepPlan, best: sweep_results.TrialResult) -> str:
    """The command that trains the best trial further: its best weights, its learning rate, more epochs."""
    args = ["--data", plan.cfg.data, "--resume-from-checkpoint", best.best_checkpoint, "--lr", repr(best.lr),
            "--epochs", str(plan.cfg.epochs + 5)]
    for f in fields(TrainConfig):
        if f.name not in plan.given or f.name in NOT_CONTINUED:
            continue
        value = getattr(plan.cfg, f.name)
        if isinstance(value, bool):
            args.append(_option(f.name) if value else "--no-" + _option(f.name)[2:])
        else:
            args += [_option(f.name), str(value)]
    return shlex.join([python_for_commands(), "-m", "raytrain_app.main", *args])


def print_plan(plan: SweepPlan) -> None:
    s, lrs = plan.summary, plan.learning_rates
    if plan.resuming:
        print(f"🔁 Sweep {plan.name} was started before: resuming it (finished trials are kept, unfinished ones "
              "continue from their latest checkpoints).")
    print(f"🔬 Sweep {plan.name}: {len(lrs)} trials in {plan.sweep_dir}")
    print(f"  Base: {plan.lineage['base_checkpoint']} "
          f"(epoch {s.epoch}, global step {s.global_step})")
    print(f"  Learning rates: {', '.join(f'{lr:g}' for lr in lrs)}")
    print(f"  Each trial: to epoch {plan.cfg.epochs} ({plan.trial_steps} steps), "
          f"{'a fresh' if plan.cfg.restart_schedule else 'the continued'} warmup + cosine schedule, "
          f"{'a new optimizer' if plan.cfg.reset_optimizer else 'the base optimizer state'}")
    if plan.sweep.scheduler == "asha":
        print(f"  Early stopping: ASHA on {plan.cfg.select_metric}, grace period {plan.grace_period} steps, "
              f"reduction factor {plan.sweep.reduction_factor:g}")
    print(f"  Workers per trial: {plan.cfg.num_workers} x {'GPU' if plan.cfg.use_gpu else 'CPU'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    configure_console()
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: sweep(argv), debug="--debug" in argv)


def sweep(argv: list[str]) -> int:
    """Plan and check the sweep (a mistake: exit 2, nothing written), then run it; the exit code."""
    plan = plan_sweep(argv)
    try:
        print_plan(plan)
        plan.cfg = prepare_wandb(plan.cfg, plan.sweep_dir)  # every trial's wandb mode, decided here
        # A private local instance gets every core, and at least the logical CPUs for one trial.
        connect_ray(num_cpus=max(4, os.cpu_count() or 1, plan.cfg.num_workers + 1))
        max_concurrent = fit_concurrency(plan)
        start_record(plan)
    finally:
        plan.cleanup()
    try:
        return run_sweep(plan, max_concurrent)
    except USER_ERRORS as e:  # storage failing once trials have started is no mistake in the command: exit 1
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRAINING_FAILED


def base_checkpoint_value(summary: StateSummary, metric: str) -> float | None:
    """The base checkpoint's value of --select-metric, drawn on sweep.png: measured at that checkpoint where its
    summary has it (the loss, the accuracy), else the best its run had by then."""
    measured = getattr(summary, f"eval_{metric}", None)
    if measured is not None:
        return measured
    return summary.best_val_loss if metric == "val_loss" else summary.best_scores.get(metric)


def run_sweep(plan: SweepPlan, max_concurrent: int) -> int:
    """Run the trials, then report them: the table, results.csv, sweep.png and the best trial."""
    clear_failure_marks(plan.sweep_dir)  # running the command again is the user's "try again"
    results = run_tuner(plan, max_concurrent)

    rows = sweep_results.collect(results, sweep_dir=plan.sweep_dir, epochs=plan.cfg.epochs,
                                 ended_by_tune=ended_trials(plan.sweep_dir), scores=plan.cfg.scores)
    metric = plan.cfg.select_metric
    base_value = base_checkpoint_value(plan.summary, metric)
    csv_file, png_file = sweep_results.write(rows, plan.sweep_dir, title=f"{plan.name}: learning-rate sweep",
                                             base_value=base_value, metric=metric)
    print(f"\n📊 Sweep {plan.name}: {len(rows)} trials, ranked by {metric}")
    print(sweep_results.table(rows, metric))
    print(f"  Results: {csv_file}")
    print(f"  Plot:    {png_file}")
    best = sweep_results.best_trial(rows, metric)
    failed = [r for r in rows if r.status in ("error", "unfinished", "not run")]
    if best is not None:
        score = plan.cfg.scores[0]  # val_accuracy; val_rmse
        shown = (f", best val {SCORE_LABELS[score]} {best.best(score):.4f}" if math.isfinite(best.best(score))
                 else "")
        print(f"\n🏆 Best{' so far' if failed else ''}: lr {best.lr:g}, best val loss {best.best_val_loss:.6f}"
              f"{shown} ({best.best_checkpoint})")
        print(f"  Continue training it: {continue_command(plan, best)}")
    if failed:
        print(f"error: {len(failed)} trial(s) did not finish ({', '.join(f'lr {r.lr:g}' for r in failed)}). "
              "Re-run the same command to resume them from their latest checkpoints.", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
