"""The training state a checkpoint holds, and the fork policy: the only code that knows state.pt's keys.

`training_state(trainer)` assembles the state of a `Trainer` (a collective: every rank calls it, rank 0 gets
the state); `restore_training_state(trainer, state)` puts one back, applying the current config's overrides and,
for a fork (a run started from another run's checkpoint), --reset-optimizer, --restart-schedule and whose best
validation loss the fork has to beat. The keys are listed in `raytrain_app.checkpoint.format`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from raytrain_app.checkpoint.format import FORMAT_VERSION
from raytrain_app.core.distributed import all_gather
from raytrain_app.core.rng import capture_rng_state, restore_rng_state, seed_everything
from raytrain_app.core.trainer import CheckpointFn, Trainer, resume_batch_index

# (metrics, the training state on rank 0 or None on the others, is_best)
StateCheckpointFn = Callable[[dict[str, Any], "dict[str, Any] | None", bool], None]


@dataclass
class LoadReport:
    """The optional parts `restore_training_state` found and restored (weights and counters always are)."""

    optimizer: bool = False
    scaler: bool = False
    reset: bool = False  # --reset-optimizer discarded the optimizer and scaler state the checkpoint held


def training_state(trainer: Trainer, eval_val_loss: float | None = None) -> dict[str, Any] | None:
    """The full training state on rank 0, None elsewhere. Collective: every rank must call it."""
    per_rank = all_gather({"rng": capture_rng_state(), "ema": trainer.ema.item(),
                             "ema_started": bool(trainer.ema_started)})
    if trainer.rank != 0:
        return None
    return {
        "format_version": FORMAT_VERSION,
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "model_state_dict": trainer.model.state_dict(),
        "optimizer_state_dict": trainer.optimizer.state_dict(),
        "scaler_state_dict": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else {},
        "scheduler_state_dict": trainer.schedule.state_dict(),
        "val_loss": trainer.best_val_loss,
        "train_ema_loss": sum(r["ema"] for r in per_rank) / len(per_rank),
        "config": trainer.cfg.to_dict(),
        "rng_states": [r["rng"] for r in per_rank],
        "rank_ema_losses": [(r["ema"], r["ema_started"]) for r in per_rank],
        "data_position": {"epoch": trainer.epoch, "batch_index": trainer.batch_index,
                          "batch_size": trainer.cfg.batch_size, "world_size": trainer.world_size},
        "eval_val_loss": eval_val_loss,
        "lineage": trainer.lineage,
        "skipped_steps": int(trainer.skipped_steps), "skip_streak": int(trainer.skip_streak),
        "wandb_run_id": trainer.wandb_run_id,
    }


def restore_training_state(trainer: Trainer, state: dict[str, Any], *, fork: bool = False,
                           fork_keeps_best: bool = True) -> LoadReport:
    """Restore everything the state holds, then apply the current config's overrides (lr, weight decay,
    dropout were already applied when the model was built). Missing parts start fresh.

    `fork`: the state is another run's checkpoint this run starts from (not this run's own), so
    --reset-optimizer and --restart-schedule apply and the lineage is the caller's. `fork_keeps_best=False`:
    the fork tracks the best of its own validations only (a sweep trial, whose best_model.pt is its own)
    instead of having to beat the base's best (a fine-tune sharing the base's best_model.pt)."""
    report = LoadReport()
    trainer.model.load_state_dict(state["model_state_dict"])
    reset = fork and trainer.cfg.reset_optimizer
    report.reset = reset and bool(state.get("optimizer_state_dict"))
    if state.get("optimizer_state_dict") and not reset:
        trainer.optimizer.load_state_dict(state["optimizer_state_dict"])
        report.optimizer = True
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
    best = state.get("val_loss") if fork_keeps_best or not fork else None
    trainer.best_val_loss = math.inf if best is None else float(best)
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


# --- step, evaluation, loop ---------------------------------------------------------------------------


def with_training_state(trainer: Trainer, on_checkpoint: StateCheckpointFn) -> CheckpointFn:
    """The loop's checkpoint callback for a caller that wants the state itself: `on_checkpoint(metrics, state,
    is_best)` gets `training_state` (rank 0's; None on the other ranks)."""
    def call(metrics: dict[str, Any], eval_val_loss: float | None, is_best: bool) -> None:
        on_checkpoint(metrics, training_state(trainer, eval_val_loss), is_best)
    return call
