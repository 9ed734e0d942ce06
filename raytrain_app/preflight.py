"""Checks before any worker starts, shared by training (`main.py`) and sweeps (`tune.py`): the data, the
checkpoint training starts from, and whether the model fits it. A mistake costs seconds, not a cluster, and is
reported as one line with exit code 2 before anything is written."""

from __future__ import annotations

import math
import os
import shutil
import sys
from typing import Any

from raytrain_app.checkpoint import CheckpointError, StateSummary, summarize
from raytrain_app.config import ARCH_FIELDS, ConfigError, TrainConfig
from raytrain_app.data import DataError, Dataset, open_dataset
from raytrain_app.order import batches_per_epoch
from raytrain_app.storage import Location, StorageError

USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError)  # and UserError, below: exit 2



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


def print_resume_summary(summary: StateSummary, uses_scaler: bool, reset_optimizer: bool = False) -> None:
    """`reset_optimizer`: --reset-optimizer applies (a new run forked from this checkpoint)."""
    print(f"📂 Loading checkpoint from: {summary.path}")
    print("  ✅ Loaded model weights")
    if reset_optimizer:
        print("  🔄 Optimizer state reset (--reset-optimizer)")
    else:
        print("  ✅ Loaded optimizer state" if summary.has_optimizer else "  ⚠️  No optimizer state: starting it fresh")
    if summary.has_scaler and not reset_optimizer:
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


def prepare_start(cfg: TrainConfig, given: set[str], source: Location, data: Dataset,
                  label: str | None = None) -> tuple[TrainConfig, StateSummary]:
    """Read the checkpoint training starts from and fit the config to it (architecture), or raise UserError.
    `label` names the checkpoint in messages when `source` is a local copy of it."""
    summary = summarize(source, label)
    cfg = fit_to_checkpoint(cfg, given, summary, num_classes_given=data.num_classes_given)
    check_weights_fit(cfg, summary)
    return cfg, summary


def check_cluster_fits(cfg: TrainConfig) -> None:
    """Fail fast, before a worker starts, when the cluster (as far as it can ever grow) cannot place the run's
    workers: Ray would otherwise wait for them forever."""
    from raytrain_app.driver import cluster_capacity, how_many_fit, scaling_config

    capacity, autoscaling = cluster_capacity()
    where = "this cluster can grow to" if autoscaling else "this cluster has"
    shown = ", ".join(f"{k} {v:g}" for k, v in sorted(capacity.items()) if k in ("CPU", "GPU") and v) or "nothing"
    if cfg.use_gpu and capacity.get("GPU", 0.0) < 1:
        raise UserError(f"--use-gpu: {where} no GPU ({shown}); drop --use-gpu to train on CPUs, or add GPU nodes")
    per_worker = scaling_config(cfg)._resources_per_worker_not_none
    fewest = cfg.min_workers or cfg.num_workers
    fits = how_many_fit(per_worker, capacity)
    if fits < fewest:
        need = ", ".join(f"{k} {v:g}" for k, v in sorted(per_worker.items()) if v)
        raise UserError(f"--num-workers {cfg.workers_text()}: each worker needs {need} and {where} {shown}, so at "
                        f"most {fits} worker(s) can ever be placed; lower --num-workers or add nodes")


def python_for_commands() -> str:
    """`python`, or the project's venv interpreter when it is not the one on PATH (right after `make demo`)."""
    on_path = shutil.which("python")
    if on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable):
        return "python"
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable
