"""The training state a checkpoint holds, and the fork policy: the only code that knows state.pt's keys.

`training_state(trainer)` assembles the state of a `Trainer` (a collective: every rank calls it, rank 0 gets
the state); `restore_training_state(trainer, state)` puts one back, applying the current config's overrides and,
for a fork (a run started from another run's checkpoint), --reset-optimizer, --restart-schedule and whose best
validation loss the fork has to beat. The keys are listed in `raytrain_app.checkpoint.format`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
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
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.distributed import all_gather
from raytrain_app.core.model import has_input_stats, set_normalization
from raytrain_app.core.rng import capture_rng_state, restore_rng_state, seed_everything
from raytrain_app.core.trainer import CheckpointFn, Scores, Trainer, resume_batch_index, starting_best

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
    index = None
    if trainer.rank == 0:  # every key but the weights and moments, which the layout adds
        index = {}
        for part in _parts(trainer, per_rank, scores).values():
            index.update(part.state_dict())
    return _layout(trainer).take(trainer, index)


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


# --- the parts of the state -------------------------------------------------------------------------------------
# Each part owns some of state.pt's keys: `state_dict()` gives them, `load_state_dict(state)` takes them back from
# a checkpoint's state (any of them may be missing from an older one). The weights and AdamW moments are not
# among them: how they are taken and restored depends on the layout (whole or sharded, see below).


class _Part:
    """A part of the state. Left out of a restore (the fork policy, `parts_left_out`), it calls `start_afresh`:
    by default nothing, keeping the new Trainer's own state."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def start_afresh(self) -> None:
        pass


class _Config(_Part):
    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "config": self.trainer.cfg.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Hyperparameters come from the current config, not the checkpoint (fine-tuning overrides; lr, dropout and
        # the architecture were applied when the model and schedule were built).
        optimizer = self.trainer.optimizer
        optimizer.param_groups[0]["weight_decay"] = self.trainer.cfg.weight_decay
        for group in optimizer.param_groups:
            group["fused"] = True


class _Scaler(_Part):
    def state_dict(self) -> dict[str, Any]:
        scaler = self.trainer.scaler
        return {"scaler_state_dict": scaler.state_dict() if scaler.is_enabled() else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.trainer.scaler.is_enabled() and state.get("scaler_state_dict"):
            self.trainer.scaler.load_state_dict(state["scaler_state_dict"])


class _Counters(_Part):
    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        return {"epoch": t.epoch, "global_step": t.global_step, "skipped_steps": int(t.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        t.epoch = int(state.get("epoch", 0) or 0)
        t.global_step = int(state.get("global_step", 0) or 0)
        t.skipped_steps.fill_(int(state.get("skipped_steps", 0) or 0))
        t.saved_step = t.global_step


class _SkipStreak(_Part):
    def state_dict(self) -> dict[str, Any]:
        return {"skip_streak": int(self.trainer.skip_streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.skip_streak.fill_(int(state.get("skip_streak", 0) or 0))

    def start_afresh(self) -> None:
        self.trainer.skip_streak.fill_(0)


class _Schedule(_Part):
    def state_dict(self) -> dict[str, Any]:
        return {"scheduler_state_dict": self.trainer.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_at(int((state.get("scheduler_state_dict") or {}).get("start_step", 0)))

    def start_afresh(self) -> None:  # --restart-schedule: the schedule starts over at the fork's step
        self._start_at(self.trainer.global_step)

    def _start_at(self, start_step: int) -> None:
        self.trainer.schedule.start_step = start_step
        self.trainer.schedule.set_step(self.trainer.global_step)  # its position is the global step, by definition


class _Scores(_Part):
    def __init__(self, trainer: Trainer, scores: Scores | None = None) -> None:
        super().__init__(trainer)
        self.scores = scores  # of the validation at this step

    def state_dict(self) -> dict[str, Any]:
        """val_loss and each of the task's scores (val_accuracy; val_rmse, val_mae): the best so far; eval_...:
        this step's."""
        t, scores = self.trainer, self.scores
        state = {"val_loss": t.best_val_loss, "eval_val_loss": scores.loss if scores is not None else None}
        for name, best in t.best_scores.items():
            state[name] = best if math.isfinite(best) else None
            state[f"eval_{name}"] = scores.values[name] if scores is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A score absent (accuracy, from checkpoints written before it was measured): the next validation is best.
        self._set(state.get("val_loss"), {name: state.get(name) for name in self.trainer.best_scores})

    def start_afresh(self) -> None:  # the fork tracks the best of its own validations
        self._set(None, {name: None for name in self.trainer.best_scores})

    def _set(self, loss: float | None, bests: dict[str, float | None]) -> None:
        self.trainer.best_val_loss = math.inf if loss is None else float(loss)
        for name, value in bests.items():
            self.trainer.best_scores[name] = starting_best(name) if value is None else float(value)


class _Ema(_Part):
    def __init__(self, trainer: Trainer, per_rank: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(trainer)
        self.per_rank = per_rank  # every rank's, gathered

    def state_dict(self) -> dict[str, Any]:
        per_rank = self.per_rank
        return {"train_ema_loss": sum(r["ema"] for r in per_rank) / len(per_rank),
                "rank_ema_losses": [(r["ema"], r["ema_started"]) for r in per_rank]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        per_rank = state.get("rank_ema_losses") or []
        if t.rank < len(per_rank) and len(per_rank) == t.world_size:
            value, started = per_rank[t.rank]
        else:
            value = state.get("train_ema_loss")
            started = value is not None
        t.ema = torch.tensor(float(value or 0.0), dtype=torch.float32, device=t.device)
        t.ema_started = torch.tensor(bool(started), device=t.device)


class _DataPosition(_Part):
    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        return {"data_position": {"epoch": t.epoch, "batch_index": t.batch_index, "batch_size": t.cfg.batch_size,
                                  "world_size": t.world_size}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        t.batch_index = resume_batch_index(state.get("data_position"), t.epoch, t.cfg.batch_size, t.world_size)


class _Lineage(_Part):
    """Where the run's weights came from, and its wandb run. A fork keeps its caller's: it is a run of its own."""

    def state_dict(self) -> dict[str, Any]:
        return {"lineage": self.trainer.lineage, "wandb_run_id": self.trainer.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.lineage = state.get("lineage")
        self.trainer.wandb_run_id = state.get("wandb_run_id")


class _Rng(_Part):
    def __init__(self, trainer: Trainer, per_rank: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(trainer)
        self.per_rank = per_rank  # every rank's, gathered

    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": [r["rng"] for r in self.per_rank]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        rng_states = state.get("rng_states") or []
        if t.rank < len(rng_states):
            restore_rng_state(rng_states[t.rank])
        else:  # a checkpoint from fewer ranks or another tool: a fresh, still deterministic stream
            seed_everything(t.cfg.seed + t.global_step, t.rank)


def _parts(trainer: Trainer, per_rank: Sequence[dict[str, Any]] = (), scores: Scores | None = None) -> dict[str, _Part]:
    """The state's parts by name, in the order they are restored: the counters before what depends on the step
    and epoch (schedule, data position, a fresh random stream)."""
    return {"config": _Config(trainer), "scaler": _Scaler(trainer), "counters": _Counters(trainer),
            "skip_streak": _SkipStreak(trainer), "schedule": _Schedule(trainer), "best": _Scores(trainer, scores),
            "ema": _Ema(trainer, per_rank), "data_position": _DataPosition(trainer), "lineage": _Lineage(trainer),
            "rng": _Rng(trainer, per_rank)}


def parts_left_out(cfg: TrainConfig, *, fork: bool, fork_keeps_best: bool) -> frozenset[str]:
    """The fork policy: the parts a restore leaves out (see `_Part.start_afresh`). A run's own checkpoint: none.
    A fork (a run started from another run's checkpoint) is a run of its own: its lineage and wandb run are its
    caller's, and it starts a skip streak of its own (a lower --lr, say). --reset-optimizer leaves out the
    optimizer's moments and the scaler; --restart-schedule the schedule (it starts over at the fork's step);
    `fork_keeps_best=False` the best scores, so the fork tracks the best of its own validations (a sweep trial,
    whose best_model.pt is its own) instead of having to beat the base's (a fine-tune sharing its best_model.pt)."""
    if not fork:
        return frozenset()
    left_out = {"lineage", "skip_streak"}
    if cfg.reset_optimizer:
        left_out |= {"optimizer", "scaler"}
    if cfg.restart_schedule:
        left_out.add("schedule")
    if not fork_keeps_best:
        left_out.add("best")
    return frozenset(left_out)


def restore_training_state(trainer: Trainer, state: dict[str, Any], *, fork: bool = False,
                           fork_keeps_best: bool = True, checkpoint_dir: str | None = None) -> LoadReport:
    """Restore everything the state holds into a Trainer just built, then apply the current config's overrides
    (lr, weight decay, dropout were already applied when the model was built). Missing parts start fresh.

    `fork`: the state is another run's checkpoint this run starts from (not this run's own), so
    --reset-optimizer and --restart-schedule apply and the lineage is the caller's (see `parts_left_out`).

    A sharded checkpoint's weights and moments are read from `checkpoint_dir` (the local folder of its state.pt),
    into this run's layout, whatever layout and worker count wrote them. Collective when either side is sharded."""
    left_out = parts_left_out(trainer.cfg, fork=fork, fork_keeps_best=fork_keeps_best)
    has_optimizer = bool(state.get("optimizer_state_dict") or state.get("optimizer_param_groups"))
    report = LoadReport(optimizer=has_optimizer and "optimizer" not in left_out,
                        reset=has_optimizer and "optimizer" in left_out,
                        scaler=("scaler" not in left_out and trainer.scaler.is_enabled()
                                and bool(state.get("scaler_state_dict"))))
    _restore_weights(trainer, state, with_optimizer=report.optimizer, checkpoint_dir=checkpoint_dir)
    for name, part in _parts(trainer).items():
        if name in left_out:
            part.start_afresh()
        else:
            part.load_state_dict(state)
    return report


# --- the weights and moments: how each strategy (raytrain_app.core.parallel) takes and restores them --------------


class _Whole:
    """DDP: every worker holds the whole model; rank 0's state.pt holds the weights and moments."""

    def take(self, trainer: Trainer, index: dict[str, Any] | None) -> dict[str, Any] | None:
        if index is None:
            return None
        return {**index, "model_state_dict": trainer.model.state_dict(),
                "optimizer_state_dict": trainer.optimizer.state_dict()}

    def load_full(self, trainer: Trainer, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        trainer.model.load_state_dict(state["model_state_dict"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer_state_dict"])


class _Sharded:
    """FSDP: every worker holds and writes its shard of the weights and moments (nothing is gathered); rank 0's
    state.pt holds the rest, and how to read the shards back."""

    def take(self, trainer: Trainer, index: dict[str, Any] | None) -> ShardedState:
        tensors, param_groups = sharded_tensors(trainer.model, trainer.optimizer)
        if index is not None:
            index |= {"optimizer_param_groups": param_groups, "model_shapes": model_shapes(trainer.model),
                      "sharded": {"strategy": trainer.cfg.strategy, "world_size": trainer.world_size,
                                  "dir": SHARDS_DIR}}
        return ShardedState(index, tensors)

    def load_full(self, trainer: Trainer, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        load_full_into_sharded(trainer.model, optimizer, state["model_state_dict"], state.get("optimizer_state_dict"))


_LAYOUTS = {"ddp": _Whole(), "fsdp": _Sharded()}  # by the name of the run's core.parallel.Strategy


def _layout(trainer: Trainer) -> _Whole | _Sharded:
    return _LAYOUTS[trainer.strategy.name]


def _restore_weights(trainer: Trainer, state: dict[str, Any], *, with_optimizer: bool,
                     checkpoint_dir: str | None) -> None:
    """The weights (and the optimizer's moments, `with_optimizer`), from whichever layout wrote them (a sharded
    checkpoint: its shards, resharded) into this run's."""
    optimizer = trainer.optimizer if with_optimizer else None
    # Decided before loading: FSDP's full-state load adds the keys a state lacks to its dict.
    with_input_stats = has_input_stats(model_shapes_of(state))
    if "sharded" in state:
        if checkpoint_dir is None:
            raise CheckpointError("a sharded checkpoint is loaded from its folder, not from its state.pt alone")
        load_sharded(trainer.model, optimizer, os.path.join(checkpoint_dir, state["sharded"]["dir"]),
                     state.get("optimizer_param_groups"))
    else:
        _layout(trainer).load_full(trainer, optimizer, state)
    if not with_input_stats:
        # Written before --normalize: its weights expect the features as they are. Set here for every layout (a
        # sharded model's full-state load keeps the buffers it had for keys the state lacks).
        set_normalization(trainer.model, torch.zeros(trainer.cfg.feature_dim), torch.ones(trainer.cfg.feature_dim))


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
