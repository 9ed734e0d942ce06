"""The training state a checkpoint holds, and the fork policy: the only code that knows state.pt's keys.

`training_state(trainer)` assembles the state of a `Trainer` (a collective: every rank calls it, rank 0 gets
the state); `restore_training_state(trainer, state)` puts one back, applying the current config's overrides and,
for a fork (a run started from another run's checkpoint), --reset-optimizer, --restart-schedule and whose best
validation loss the fork has to beat. The keys are listed in `raytrain_app.checkpoint.format`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from raytrain_app.checkpoint.format import (
    FORMAT_VERSION,
    SHARDS_DIR,
    CheckpointError,
    finish_sharded_dir,
    model_shapes_of,
    save_checkpoint_dir,
)
from raytrain_app.checkpoint.sharded import (
    gather_full_state,
    load_full_into_sharded,
    load_sharded,
    model_shapes,
    save_shards,
    sharded_tensors,
)
from raytrain_app.core.distributed import all_gather
from raytrain_app.core.model import has_input_stats, set_normalization
from raytrain_app.core.rng import capture_rng_state, restore_rng_state, seed_everything
from raytrain_app.core.trainer import CheckpointFn, Scores, Trainer, resume_batch_index

# (metrics, the training state on rank 0 or None on the others, is_best)
StateCheckpointFn = Callable[[dict[str, Any], "dict[str, Any] | None", bool], None]


@dataclass
class LoadReport:
    """The optional parts `restore_training_state` found and restored (weights and counters always are)."""

    optimizer: bool = False
    scaler: bool = False
    reset: bool = False  # --reset-optimizer discarded the optimizer and scaler state the checkpoint held


@dataclass
class ShardedState:
    """A sharded checkpoint's state as one worker holds it (--strategy fsdp): `index` (rank 0 only, else None)
    is everything but the weights and moments, written as the checkpoint's small state.pt; `tensors` are this
    worker's shards of them (see raytrain_app.checkpoint.sharded)."""

    index: dict[str, Any] | None
    tensors: dict[str, Any]


def training_state(trainer: Trainer, scores: Scores | None = None) -> dict[str, Any] | ShardedState | None:
    """The training state at this step (`scores`: of the validation at this step, None without one).
    Collective: every rank must call it.

    A whole model (DDP): the full state on rank 0, None elsewhere. A sharded model (FSDP): a `ShardedState` on
    every rank; nothing is gathered."""
    per_rank = all_gather({"rng": capture_rng_state(), "ema": trainer.ema.item(),
                             "ema_started": bool(trainer.ema_started)})
    if trainer.sharded:
        tensors, param_groups = sharded_tensors(trainer.model, trainer.optimizer)
        index = None
        if trainer.rank == 0:
            index = {**_counters(trainer, per_rank, scores), "optimizer_param_groups": param_groups,
                     "model_shapes": model_shapes(trainer.model),
                     "sharded": {"strategy": trainer.cfg.strategy, "world_size": trainer.world_size,
                                 "dir": SHARDS_DIR}}
        return ShardedState(index, tensors)
    if trainer.rank != 0:
        return None
    return {
        **_counters(trainer, per_rank, scores),
        "model_state_dict": trainer.model.state_dict(),
        "optimizer_state_dict": trainer.optimizer.state_dict(),
    }


def consolidated_state(trainer: Trainer, sharded: ShardedState, *, with_optimizer: bool) -> dict[str, Any] | None:
    """The sharded state `sharded` (this step's) as one full state with the keys of a DDP checkpoint's state.pt,
    on rank 0, its weights (and moments) gathered one tensor at a time into host memory: best_model.pt of an FSDP
    run. Collective; None on other ranks."""
    weights, optimizer_state = gather_full_state(trainer.model, trainer.optimizer if with_optimizer else None)
    if sharded.index is None:
        return None
    state = {k: v for k, v in sharded.index.items() if k not in ("sharded", "model_shapes", "optimizer_param_groups")}
    state["model_state_dict"] = weights
    if optimizer_state is not None:
        state["optimizer_state_dict"] = optimizer_state
    return state


def _counters(trainer: Trainer, per_rank: list[dict[str, Any]], scores: Scores | None) -> dict[str, Any]:
    """Every key of the state but the weights and the optimizer's moments."""
    return {
        "format_version": FORMAT_VERSION,
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "scaler_state_dict": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else {},
        "scheduler_state_dict": trainer.schedule.state_dict(),
        "val_loss": trainer.best_val_loss,
        "val_accuracy": trainer.best_val_accuracy if math.isfinite(trainer.best_val_accuracy) else None,
        "train_ema_loss": sum(r["ema"] for r in per_rank) / len(per_rank),
        "config": trainer.cfg.to_dict(),
        "rng_states": [r["rng"] for r in per_rank],
        "rank_ema_losses": [(r["ema"], r["ema_started"]) for r in per_rank],
        "data_position": {"epoch": trainer.epoch, "batch_index": trainer.batch_index,
                          "batch_size": trainer.cfg.batch_size, "world_size": trainer.world_size},
        "eval_val_loss": scores.loss if scores is not None else None,
        "eval_val_accuracy": scores.accuracy if scores is not None else None,
        "lineage": trainer.lineage,
        "skipped_steps": int(trainer.skipped_steps), "skip_streak": int(trainer.skip_streak),
        "wandb_run_id": trainer.wandb_run_id,
    }


def restore_training_state(trainer: Trainer, state: dict[str, Any], *, fork: bool = False,
                           fork_keeps_best: bool = True, checkpoint_dir: str | None = None) -> LoadReport:
    """Restore everything the state holds, then apply the current config's overrides (lr, weight decay,
    dropout were already applied when the model was built). Missing parts start fresh.

    `fork`: the state is another run's checkpoint this run starts from (not this run's own), so
    --reset-optimizer and --restart-schedule apply and the lineage is the caller's. `fork_keeps_best=False`:
    the fork tracks the best of its own validations only (a sweep trial, whose best_model.pt is its own)
    instead of having to beat the base's best (a fine-tune sharing the base's best_model.pt).

    A sharded checkpoint's weights and moments are read from `checkpoint_dir` (the local folder of its state.pt),
    into this run's layout, whatever layout and worker count wrote them. Collective when either side is sharded."""
    report = LoadReport()
    reset = fork and trainer.cfg.reset_optimizer
    has_optimizer = bool(state.get("optimizer_state_dict") or state.get("optimizer_param_groups"))
    report.reset = reset and has_optimizer
    report.optimizer = has_optimizer and not reset
    optimizer = trainer.optimizer if report.optimizer else None
    # Decided before loading: FSDP's full-state load adds the keys a state lacks to its dict.
    with_input_stats = has_input_stats(model_shapes_of(state))
    if "sharded" in state:
        if checkpoint_dir is None:
            raise CheckpointError("a sharded checkpoint is loaded from its folder, not from its state.pt alone")
        load_sharded(trainer.model, optimizer, os.path.join(checkpoint_dir, state["sharded"]["dir"]),
                     state.get("optimizer_param_groups"))
    elif trainer.sharded:
        load_full_into_sharded(trainer.model, optimizer, state["model_state_dict"], state.get("optimizer_state_dict"))
    else:
        trainer.model.load_state_dict(state["model_state_dict"])
        if optimizer is not None:
            trainer.optimizer.load_state_dict(state["optimizer_state_dict"])
    if not with_input_stats:
        # Written before --normalize: its weights expect the features as they are. Set here for every layout (a
        # sharded model's full-state load keeps the buffers it had for keys the state lacks).
        set_normalization(trainer.model, torch.zeros(trainer.cfg.feature_dim), torch.ones(trainer.cfg.feature_dim))
    # Hyperparameters come from the current config, not the checkpoint (fine-tuning overrides).
    trainer.optimizer.param_groups[0]["weight_decay"] = trainer.cfg.weight_decay
    for group in trainer.optimizer.param_groups:
        group["fused"] = True
    if trainer.scaler.is_enabled() and state.get("scaler_state_dict") and not reset:
        trainer.scaler.load_state_dict(state["scaler_state_dict"])
        report.scaler = True
    trainer.epoch = int(state.get("epoch", 0) or 0)
    trainer.global_step = int(state.get("global_step", 0) or 0)
    if fork and trainer.cfg.restart_schedule:
        trainer.schedule.start_step = trainer.global_step
    else:
        trainer.schedule.start_step = int((state.get("scheduler_state_dict") or {}).get("start_step", 0))
    if not fork:
        trainer.lineage = state.get("lineage")
        trainer.wandb_run_id = state.get("wandb_run_id")  # a fork is a wandb run of its own
    trainer.schedule.set_step(trainer.global_step)  # the schedule's position is the global step, by definition
    keeps_best = fork_keeps_best or not fork
    best = state.get("val_loss") if keeps_best else None
    trainer.best_val_loss = math.inf if best is None else float(best)
    # Absent from checkpoints written before accuracy was measured: the next validation is the best accuracy.
    best_accuracy = state.get("val_accuracy") if keeps_best else None
    trainer.best_val_accuracy = -math.inf if best_accuracy is None else float(best_accuracy)
    _load_ema(trainer, state)
    trainer.skipped_steps.fill_(int(state.get("skipped_steps", 0) or 0))
    # A fork (a lower --lr, say) starts a streak of its own; a run's own checkpoint continues it exactly.
    trainer.skip_streak.fill_(0 if fork else int(state.get("skip_streak", 0) or 0))
    trainer.batch_index = resume_batch_index(state.get("data_position"), trainer.epoch, trainer.cfg.batch_size,
                                              trainer.world_size)
    trainer.saved_step = trainer.global_step
    rng_states = state.get("rng_states") or []
    if trainer.rank < len(rng_states):
        restore_rng_state(rng_states[trainer.rank])
    else:  # a checkpoint from fewer ranks or another tool: a fresh, still deterministic stream
        seed_everything(trainer.cfg.seed + trainer.global_step, trainer.rank)
    return report


def _load_ema(trainer: Trainer, state: dict[str, Any]) -> None:
    per_rank = state.get("rank_ema_losses") or []
    if trainer.rank < len(per_rank) and len(per_rank) == trainer.world_size:
        value, started = per_rank[trainer.rank]
    else:
        value = state.get("train_ema_loss")
        started = value is not None
    trainer.ema = torch.tensor(float(value or 0.0), dtype=torch.float32, device=trainer.device)
    trainer.ema_started = torch.tensor(bool(started), device=trainer.device)


def save_training_state(trainer: Trainer, checkpoint_dir: str, scores: Scores | None = None,
                        group: Any = None) -> None:
    """Write this step's checkpoint folder here and now, without Ray (tools, tests, benchmarks): rank 0's
    state.pt, meta.json and manifest, and for a sharded model every worker's shard (the folder must be one all
    workers can write, such as a local one on one machine). Collective."""
    state = training_state(trainer, scores)
    if isinstance(state, ShardedState):
        save_shards(state.tensors, os.path.join(checkpoint_dir, SHARDS_DIR), group)
        finish_sharded_dir(checkpoint_dir, state.index, rank=trainer.rank, world_size=trainer.world_size)
    elif state is not None:
        save_checkpoint_dir(checkpoint_dir, state)


def with_training_state(trainer: Trainer, on_checkpoint: StateCheckpointFn) -> CheckpointFn:
    """The loop's checkpoint callback for a caller that wants the state itself: `on_checkpoint(metrics, state,
    is_best)` gets `training_state` (rank 0's; None on the other ranks)."""
    def call(metrics: dict[str, Any], scores: Scores | None, is_best: bool) -> None:
        on_checkpoint(metrics, training_state(trainer, scores), is_best)
    return call
