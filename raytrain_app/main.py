"""Train on Ray: `python -m raytrain_app.main --data dataset.pkl [flags]` (see --help).

The driver parses the config, checks the data and any checkpoint before a worker starts (a mistake costs
seconds, not a cluster), picks the run, and hands the loop to Ray Train's TorchTrainer.

Resume contract:
  * the same command continues the same run (<save-dir>/<run-name>) from its latest checkpoint;
  * --resume-from-checkpoint X with changed hyperparameters starts a new run initialised from X;
  * --epochs is a total; architecture flags not given come from the checkpoint.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from raytrain_app.checkpoint import (
    BEST_MODEL_FILE,
    CheckpointError,
    StateSummary,
    fork_lineage,
    latest_run_checkpoint,
    resolve_checkpoint,
    summarize,
)
from raytrain_app.config import ARCH_FIELDS, ConfigError, TrainConfig, parse_config
from raytrain_app.data import DataError, Dataset, open_dataset
from raytrain_app.driver import connect_ray, make_trainer
from raytrain_app.order import batches_per_epoch
from raytrain_app.storage import Location, StorageError, check_bucket, parse_location

USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError)  # and UserError, below: exit 2

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


class UserError(Exception):
    """Stops the run with one line on stderr and exit code 2, before anything is written."""


# --- choosing where the run starts ---------------------------------------------------------------------------

def fit_to_checkpoint(
    cfg: TrainConfig, given: set[str], summary: StateSummary, *, num_classes_given: bool
) -> TrainConfig:
    """Take architecture fields from the checkpoint; a flag given with another value is an error (exit 2).

    `num_classes_given`: the dataset states its class count (else it is max label + 1 and may be smaller)."""
    from raytrain_app.model import arch_from_state_dict

    saved = {**arch_from_state_dict(summary.model_state_dict), **summary.config}
    changes: dict[str, Any] = {}
    mismatches = []
    for name in ARCH_FIELDS:
        if saved.get(name) is None:
            continue
        if name in given and getattr(cfg, name) != saved[name]:
            mismatches.append(f"--{name.replace('_', '-')} {getattr(cfg, name)} (checkpoint has {saved[name]})")
        else:
            changes[name] = saved[name]
    for name, what in (("feature_dim", "feature dimension"), ("seq_len", "sequence length"),
                       ("num_classes", "class count")):
        if not saved.get(name):  # unknown: the weight shapes are checked next
            continue
        data_value = getattr(cfg, name)
        if name == "num_classes" and not num_classes_given and data_value <= saved[name]:
            changes[name] = saved[name]  # the data just doesn't use the top classes
        elif data_value != saved[name]:
            mismatches.append(f"dataset {what} {data_value} (checkpoint has {saved[name]})")
    # Both heads have the same shapes, so only the config can tell them apart.
    if "per_step" in summary.config and bool(summary.config["per_step"]) != cfg.per_step:
        kinds = {True: "per-step labels [N, T]", False: "per-sequence labels [N]"}
        saved_kind = kinds[bool(summary.config["per_step"])]
        mismatches.append(f"dataset has {kinds[cfg.per_step]} (checkpoint has {saved_kind})")
    if mismatches:
        raise UserError(
            f"checkpoint {summary.path} does not fit this model: {'; '.join(mismatches)}. "
            "Drop the architecture flags to use the checkpoint's, or use data with the same shape."
        )
    return cfg.replace(**changes)


def check_weights_fit(cfg: TrainConfig, summary: StateSummary) -> None:
    """Compare the checkpoint's tensors with the model on the meta device: no memory, no compute."""
    import torch

    from raytrain_app.model import SequenceTransformer

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SequenceTransformer(cfg).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in summary.model_state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape {', '.join(wrong[:3])}" if wrong else "",
        ]))
        raise UserError(f"checkpoint {summary.path} holds a different model ({details}); "
                        "pass the architecture flags it was trained with")


def with_data_shape(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    return cfg.replace(feature_dim=data.feature_dim, seq_len=data.seq_len, num_classes=data.num_classes,
                       per_step=data.per_step)


def print_resume_summary(summary: StateSummary, uses_scaler: bool) -> None:
    print(f"📂 Loading checkpoint from: {summary.path}")
    print("  ✅ Loaded model weights")
    print("  ✅ Loaded optimizer state" if summary.has_optimizer else "  ⚠️  No optimizer state: starting it fresh")
    if summary.has_scaler:
        print("  ✅ Loaded gradient scaler state")
    elif uses_scaler:
        print("  ⚠️  No gradient scaler state: starting it fresh")
    print(f"  ✅ Resuming from epoch {summary.epoch}")
    print(f"  ✅ Resuming from global step {summary.global_step}")
    if summary.best_val_loss is not None and math.isfinite(summary.best_val_loss):
        print(f"  ✅ Best val loss: {summary.best_val_loss:.6f}")
    if summary.train_ema_loss is not None:
        print(f"  ✅ Train EMA loss: {summary.train_ema_loss:.6f}")
    print("\n  🎯 Checkpoint loaded successfully!\n")


def start_position(summary: StateSummary | None) -> tuple[int, int]:
    """(completed epochs, batch index within the next epoch) training will start from."""
    if summary is None:
        return 0, 0
    position = summary.data_position or {}
    in_epoch = int(position.get("batch_index", 0)) if int(position.get("epoch", -1)) == summary.epoch else 0
    return summary.epoch, in_epoch


# --- the command -------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the driver decided before starting Ray."""

    cfg: TrainConfig  # with data shapes, architecture from the checkpoint, canonical locations
    run_name: str
    save_dir: Location
    init_from: str | None  # the checkpoint a new run starts from (a URI or path), None when continuing or fresh
    summary: StateSummary | None  # what training starts from, None for a fresh start
    lineage: dict[str, Any] | None  # what a new run forked from init_from records in its checkpoints

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
    if (latest := latest_run_checkpoint(run_dir)) is not None:
        print(f"Run {run_name} has checkpoints: continuing it from its latest one.")
        source = latest
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
    return Plan(cfg=cfg, run_name=run_name, save_dir=save_dir, init_from=init_from, summary=summary,
                lineage=lineage)


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, Dataset]:
    """Open and validate the dataset in the driver; the config gets its shapes and canonical location."""
    data = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    cfg = with_data_shape(cfg.replace(data=data.uri), data)
    if batches_per_epoch(data.train.num_rows, cfg.batch_size, cfg.num_workers) == 0:
        raise UserError(
            f"--batch-size {cfg.batch_size} with --num-workers {cfg.num_workers} needs at least "
            f"{cfg.batch_size * cfg.num_workers} training sequences; {cfg.data} has {data.train.num_rows}. "
            "Lower --batch-size."
        )
    return cfg, data


def prepare_start(cfg: TrainConfig, given: set[str], source: Location,
                  data: Dataset) -> tuple[TrainConfig, StateSummary]:
    """Read the checkpoint training starts from and fit the config to it (architecture), or raise UserError."""
    summary = summarize(source)
    cfg = fit_to_checkpoint(cfg, given, summary, num_classes_given=data.num_classes_given)
    check_weights_fit(cfg, summary)
    return cfg, summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        plan = prepare(argv)
    except (UserError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    cfg, summary, run_dir = plan.cfg, plan.summary, plan.run_dir

    if cfg.use_wandb:
        print("⚠️  --use-wandb: wandb logging is not part of this version yet; metrics are printed on the console.")
    if summary is not None:
        print_resume_summary(summary, uses_scaler=cfg.use_amp and cfg.amp_dtype == "fp16")
    done_epochs, in_epoch = start_position(summary)
    if done_epochs >= cfg.epochs:
        print(f"Nothing to train: the checkpoint has completed {done_epochs} epochs and --epochs is {cfg.epochs} "
              "(a total). Pass a larger --epochs to train more.")
        return 0
    print("🚀 Starting training...")
    print(f"  Run: {plan.run_name} in {run_dir}")
    start = f"starting from epoch {done_epochs + 1}" + (f", batch {in_epoch}" if in_epoch else "")
    print(f"  Epochs: {cfg.epochs} ({start})")
    print(f"  Workers: {cfg.num_workers} x {'GPU' if cfg.use_gpu else 'CPU'}, batch {cfg.batch_size} per worker, "
          f"accumulation {cfg.grad_accum_steps}", flush=True)

    connect_ray(num_cpus=max(4, cfg.num_workers))
    import ray.train

    trainer = make_trainer(cfg, run_name=plan.run_name, storage=plan.save_dir, init_from=plan.init_from,
                           lineage=plan.lineage)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        print(f"error: training failed after {cfg.max_failures} restart(s): {str(e).strip().splitlines()[0]}",
              file=sys.stderr)
        print(f"Re-run the same command to continue from the latest checkpoint in {run_dir}.", file=sys.stderr)
        return EXIT_TRAINING_FAILED

    metrics = result.metrics or {}
    command = shlex.join([python_for_commands(), "-m", "raytrain_app.main", *argv])
    best_path = plan.save_dir.join(BEST_MODEL_FILE).uri
    print("\n✅ Training finished.")
    if metrics:
        print(f"  Epoch {metrics.get('epoch')}, global step {metrics.get('global_step')}, "
              f"best val loss {metrics.get('best_val_loss', float('nan')):.6f}")
    print(f"  Checkpoints: {run_dir}")
    print(f"  Best model:  {best_path}")
    print(f"  Resume this run after an interruption (the same command): {command}")
    fine_tune = shlex.join([python_for_commands(), "-m", "raytrain_app.main", "--data", cfg.data,
                            "--resume-from-checkpoint", best_path, "--lr", f"{cfg.lr / 10:g}",
                            "--epochs", str(cfg.epochs + 5)])
    print(f"  Fine-tune the best model with a lower learning rate: {fine_tune}")
    return 0


def python_for_commands() -> str:
    """`python`, or the project's venv interpreter when it is not the one on PATH (right after `make demo`)."""
    on_path = shutil.which("python")
    if on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable):
        return "python"
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable


if __name__ == "__main__":
    sys.exit(main())
