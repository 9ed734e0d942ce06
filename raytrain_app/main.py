"""Train on Ray: `python -m raytrain_app.main --data dataset.pkl [flags]` (see --help).

The driver parses the config, checks the data and any checkpoint before a worker starts (a mistake costs
seconds, not a cluster), picks the run, and hands the loop to Ray Train's TorchTrainer.

Resume contract:
  * the same command continues the same run (<save-dir>/<run-name>) from its latest checkpoint;
  * --resume-from-checkpoint X with changed hyperparameters starts a new run initialised from X;
  * --epochs is a total; architecture flags not given come from the checkpoint.
"""

from __future__ import annotations

import shlex
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from raytrain_app.checkpoint.format import BEST_MODEL_FILE
from raytrain_app.checkpoint.resolve import (
    StateSummary,
    fork_lineage,
    last_good_checkpoint,
    resolve_checkpoint,
    verified_name,
)
from raytrain_app.cli.commands import python_for_commands
from raytrain_app.cli.errors import EXIT_DIVERGED, EXIT_TRAINING_FAILED, USER_ERRORS, run_command
from raytrain_app.cli.flags import parse_config
from raytrain_app.cli.preflight import (
    check_model,
    prepare_data,
    prepare_start,
    print_resume_summary,
    start_position,
)
from raytrain_app.core.config import SCORE_LABELS, TrainConfig
from raytrain_app.core.memory import GB, check_fits
from raytrain_app.core.model_spec import model_text
from raytrain_app.core.trainer import UNVALIDATED_LOSS
from raytrain_app.datasets.normalize import feature_stats
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.metrics import measured, prepare_wandb
from raytrain_app.observability.progress import ProgressDisplay, read_from
from raytrain_app.ray_adapter.capacity import check_cluster_fits, check_cluster_gpu_memory_fits
from raytrain_app.ray_adapter.control import fit_until_stopped, new_stop_request
from raytrain_app.ray_adapter.driver import connect_ray, make_trainer
from raytrain_app.ray_adapter.run_record import Recovery, plan_recovery
from raytrain_app.storage.location import Location, check_bucket, parse_location


@dataclass
class Plan:
    """What the driver decided before starting Ray."""

    cfg: TrainConfig  # with data shapes, architecture from the checkpoint, canonical locations
    run_name: str
    save_dir: Location
    init_from: str | None  # the checkpoint a new run starts from (a URI or path), None when continuing or fresh
    summary: StateSummary | None  # what training starts from, None for a fresh start
    lineage: dict[str, Any] | None  # what a new run forked from init_from records in its checkpoints
    recovery: Recovery  # the run's own latest whole checkpoint, and the repair of Ray's record it may need
    input_stats: tuple[list[float], list[float]] | None = None  # a new run's --normalize standard statistics

    @property
    def run_dir(self) -> Location:
        return self.save_dir.join(self.run_name)


def prepare(argv: list[str]) -> Plan:
    """Everything before Ray: config, data, run name, checkpoint. Raises the user-facing errors."""
    cfg, given = parse_config(argv)
    run_name = cfg.run_name or cfg.default_run_name()
    save_dir = parse_location(cfg.save_dir, flag="--save-dir")
    check_bucket(save_dir)
    cfg, data = prepare_data(cfg.replace(save_dir=save_dir.uri))
    run_dir = save_dir.join(run_name)
    source, init_from = None, None
    recovery = plan_recovery(run_dir)  # decided now, written only once the whole command has been checked
    if recovery.state is not None:
        print(f"Run {run_name} has checkpoints: continuing it from its latest one.")
        source = recovery.state
    elif cfg.resume_from_checkpoint:
        source = resolve_checkpoint(cfg.resume_from_checkpoint)
        if source is None:
            print(f"⚠️  WARNING: Checkpoint file not found: {cfg.resume_from_checkpoint}")
            print("  Starting training from scratch...")
        else:
            init_from = source.uri
    summary, lineage = None, None
    if source is not None:
        cfg, summary = prepare_start(cfg, given, source, data)
    if init_from is not None:
        lineage = fork_lineage(source, summary)
    if source is None:
        check_model(cfg, given)  # else checked against the checkpoint's model by prepare_start
    input_stats = None
    if source is None and cfg.normalize == "standard":  # computed once; the run's checkpoints keep them
        mean, std = feature_stats(data.train)
        input_stats = (mean.tolist(), std.tolist())
    return Plan(cfg=cfg, run_name=run_name, save_dir=save_dir, init_from=init_from, summary=summary,
                lineage=lineage, recovery=recovery, input_stats=input_stats)


@dataclass
class Outcome:
    """How a training command ended: its exit code, and what it leaves (for the Python API, raytrain_app.api)."""

    exit_code: int
    plan: Plan
    metrics: dict[str, Any] = field(default_factory=dict)  # the last reported metrics, when training ran
    best_model: str | None = None  # where the run's best model is, when it finished
    stopped_by: int | None = None  # the signal that stopped it
    divergence: dict[str, int] | None = None


def main(argv: list[str] | None = None) -> int:
    """Every mistake a user can make ends here as one line on stderr and exit code 2, with nothing written;
    anything unexpected as one line and exit code 1. --debug adds the traceback."""
    configure_console()
    argv = sys.argv[1:] if argv is None else argv
    # --debug is read before parsing: a flag that fails to parse still gets its traceback. Ctrl-C lands here
    # only before the workers start; afterwards the signal handler stops them.
    return run_command(lambda: train(argv).exit_code, debug="--debug" in argv,
                       interrupted="\nInterrupted before training started: nothing was written.")


def train(argv: list[str]) -> Outcome:
    """The command, as the Python API runs it too: mistakes raise (the USER_ERRORS of cli.errors), anything else
    ends in the returned outcome."""
    plan = prepare(argv)
    cfg, summary, run_dir = plan.cfg, plan.summary, plan.run_dir

    if summary is not None:
        print_resume_summary(summary, uses_scaler=cfg.use_amp and cfg.amp_dtype == "fp16",
                             reset_optimizer=cfg.reset_optimizer and plan.init_from is not None)
    done_epochs, in_epoch = start_position(summary)
    if done_epochs >= cfg.epochs:
        print(f"Nothing to train: the checkpoint has completed {done_epochs} epochs and --epochs is {cfg.epochs} "
              "(a total). Pass a larger --epochs to train more.")
        return Outcome(0, plan)
    if cfg.use_gpu and cfg.gpu_memory_gb:  # known without the cluster: refused before connecting to it
        check_fits(cfg, cfg.gpu_memory_gb * GB, "--gpu-memory-gb")
    plan.cfg = prepare_wandb(cfg, run_dir)  # the workers' wandb mode, decided here
    connect_ray(num_cpus=max(4, cfg.num_workers))
    check_cluster_fits(cfg)
    if cfg.use_gpu and not cfg.gpu_memory_gb:
        check_cluster_gpu_memory_fits(cfg)
    print("🚀 Starting training...")
    print(f"  Run: {plan.run_name} in {run_dir}")
    start = f"starting from epoch {done_epochs + 1}" + (f", batch {in_epoch}" if in_epoch else "")
    print(f"  Epochs: {cfg.epochs} ({start})")
    print(f"  Model: {model_text(cfg.to_dict())}")
    print(f"  Workers: {cfg.workers_text()} x {'GPU' if cfg.use_gpu else 'CPU'}, batch {cfg.batch_size} per worker, "
          f"accumulation {cfg.grad_accum_steps}"
          + (f" (effective batch {cfg.batch_size * cfg.num_workers * cfg.grad_accum_steps}, kept with fewer workers "
             "by accumulating more)" if cfg.elastic else ""))
    print("  Inputs: " + ("features as they are (--normalize none)" if cfg.normalize == "none" else
                          "standardised with the training split's per-feature mean and std" if plan.input_stats
                          else "standardised with the checkpoint's per-feature mean and std")
          + f"; best model by {cfg.select_metric}", flush=True)

    try:
        return fit(plan, argv)
    except USER_ERRORS as e:  # storage failing once training has started is no mistake in the command: exit 1
        print(f"error: {e}", file=sys.stderr)
        return Outcome(EXIT_TRAINING_FAILED, plan)


def fit(plan: Plan, argv: list[str]) -> Outcome:
    """Train the checked plan; how it ended."""
    import ray.train

    cfg, run_dir = plan.cfg, plan.run_dir
    plan.recovery.apply()  # Ray must restore the checkpoint the summary above was printed from
    stop_request = new_stop_request()
    trainer = make_trainer(cfg, run_name=plan.run_name, storage=plan.save_dir, init_from=plan.init_from,
                           lineage=plan.lineage, stop_request=stop_request,
                           verified_checkpoint=verified_name(plan.recovery.state), input_stats=plan.input_stats)
    command = shlex.join([python_for_commands(), "-m", "raytrain_app.main", *argv])
    try:
        display = ProgressDisplay(read_from(stop_request), cfg.progress_every, out=sys.stdout)
        try:
            result, stopped_by = fit_until_stopped(trainer, stop_request, on_tick=display)
        finally:
            display.close()
    except ray.train.TrainingFailedError as e:
        print(f"error: training failed after {cfg.max_failures} restart(s): {str(e).strip().splitlines()[0]}",
              file=sys.stderr)
        print(f"Re-run the same command to continue from the latest checkpoint in {run_dir}.", file=sys.stderr)
        return Outcome(EXIT_TRAINING_FAILED, plan)

    divergence = ray.get(stop_request.divergence.remote())
    if divergence is not None:
        print_divergence(plan, argv, divergence)
        return Outcome(EXIT_DIVERGED, plan, divergence=divergence)
    metrics = result.metrics or {}
    if stopped_by is not None and metrics.get("epoch", 0) < cfg.epochs:
        print(f"\n⏸️  Stopped by {signal.Signals(stopped_by).name} at epoch {metrics.get('epoch')}, global step "
              f"{metrics.get('global_step')}: that step is checkpointed in {run_dir}.")
        print(f"  Continue (the same command): {command}")
        # Not 0: a job system must see an interruption, not a finished run.
        return Outcome(128 + stopped_by, plan, metrics, stopped_by=stopped_by)
    best = plan.save_dir.join(BEST_MODEL_FILE)
    # A fork keeps its base's best and may never beat it; a fork re-run after an interruption continues its own
    # run, and its base is then known from the lineage its checkpoints record.
    base = plan.init_from or ((plan.summary.lineage or {}).get("base_checkpoint") if plan.summary else None)
    if not best.is_file() and base:
        print(f"\nNo validation beat the best of the checkpoint this run started from: {base} stays the best model.")
        best = parse_location(base)
    best_path = best.uri
    print("\n✅ Training finished.")
    if metrics:
        best_loss = metrics.get("best_val_loss")
        shown = f"{best_loss:.6f}" if best_loss is not None and best_loss < UNVALIDATED_LOSS else "none (not finite)"
        score = cfg.scores[0]  # val_accuracy; val_rmse
        value = metrics.get(f"best_{score}")
        shown_score = f", best val {SCORE_LABELS[score]} {value:.4f}" if measured(score, value) else ""
        print(f"  Epoch {metrics.get('epoch')}, global step {metrics.get('global_step')}, best val loss {shown}"
              f"{shown_score} (best model by {cfg.select_metric})")
    print(f"  Checkpoints: {run_dir}")
    print(f"  Best model:  {best_path}")
    print(f"  Resume this run after an interruption (the same command): {command}")
    fine_tune = shlex.join([python_for_commands(), "-m", "raytrain_app.main", "--data", cfg.data,
                            "--resume-from-checkpoint", best_path, "--lr", f"{cfg.lr / 10:g}",
                            "--epochs", str(cfg.epochs + 5),
                            *(["--select-metric", cfg.select_metric] if cfg.select_metric != "val_loss" else [])])
    print(f"  Fine-tune the best model with a lower learning rate: {fine_tune}")
    return Outcome(0, plan, metrics, best_model=best_path)


def print_divergence(plan: Plan, argv: list[str], divergence: dict[str, int]) -> None:
    """The run stopped itself after --max-skipped-steps skipped steps in a row: say where, and give the command
    that forks a new run from the last checkpoint before them with half the learning rate."""
    cfg, first, last = plan.cfg, divergence["first_step"], divergence["last_step"]
    print(f"error: training diverged: global steps {first}-{last} ({last - first + 1} in a row, "
          f"--max-skipped-steps {cfg.max_skipped_steps}) had a non-finite loss or gradients and were skipped. "
          f"Lower the learning rate (--lr {cfg.lr:g}).", file=sys.stderr)
    good = last_good_checkpoint(plan.run_dir, first)
    # Else where the run started: the checkpoint it was forked from (recorded in its lineage once it continues
    # from its own checkpoints), or nothing.
    base = (plan.summary.lineage or {}).get("base_checkpoint") if plan.summary is not None else None
    start = good.uri if good is not None else plan.init_from or base
    args = without_flags(argv, ("--lr", "--resume-from-checkpoint", "--run-name"))
    args += [*(["--resume-from-checkpoint", start] if start else []), "--lr", f"{cfg.lr / 2:g}"]
    where = f"the last checkpoint with a finite validation loss ({good.uri})" if good is not None else (
        f"where this run started ({start})" if start else "the start")
    print(f"Resume from {where} with half the learning rate, as a new run:", file=sys.stderr)
    print(f"  {shlex.join([python_for_commands(), '-m', 'raytrain_app.main', *args])}", file=sys.stderr)


def without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` without the given flags and their values (`--flag value` or `--flag=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
