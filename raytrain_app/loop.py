"""The training step and loop: plain PyTorch, no Ray and no argparse.

`Trainer` owns every piece of resumable state (model, optimizer, scaler, schedule, counters, EMA, RNG, data
position) and exposes it through `state_dict()` / `load_state_dict()`. `fit()` calls `on_checkpoint` at every
validation; the caller decides where the state goes (Ray in `train_worker.py`, a plain file in a benchmark).
Distributed pieces use torch.distributed directly and are no-ops in a single process.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrain_app.async_checkpoint import CheckpointWriter
from raytrain_app.checkpoint import FORMAT_VERSION
from raytrain_app.config import TrainConfig
from raytrain_app.data import Dataset, augment
from raytrain_app.model import loss_fn
from raytrain_app.order import batches_per_epoch, eval_batches, shard_batches

EMA_DECAY = 0.98
MIN_LR_RATIO = 0.1


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to peak_lr, then cosine decay to peak_lr * MIN_LR_RATIO at total_steps.

    A pure function of the step, so resuming needs only the step (and a fork's new --lr applies at once).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak_lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


class WarmupCosineSchedule:
    """Sets the optimizer's learning rate from `lr_at`. Peak, warmup and length come from the current config,
    so a fine-tuning run's --lr / --epochs / --warmup-steps replace the checkpoint's.

    The schedule runs from global step `start_step` (0, or the fork point of a run started with
    --restart-schedule, such as a sweep trial) to `total_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> None:
        self.optimizer, self.cfg, self.total_steps, self.step, self.start_step = optimizer, cfg, total_steps, 0, 0

    def set_step(self, step: int) -> float:
        self.step = step
        lr = lr_at(step - self.start_step, peak_lr=self.cfg.lr, warmup_steps=self.cfg.warmup_steps,
                   total_steps=self.total_steps - self.start_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Recorded for people and tools; restoring needs only the global step (see Trainer.load_state_dict)."""
        return {"step": self.step, "start_step": self.start_step, "peak_lr": self.cfg.lr,
                "warmup_steps": self.cfg.warmup_steps, "total_steps": self.total_steps}


def resume_batch_index(position: dict[str, Any] | None, epoch: int, batch_size: int, world_size: int) -> int:
    """The micro-batch of epoch `epoch` (completed epochs) that training resumes at, from a checkpoint's
    data_position, for this run's batch size and world size."""
    if not position or int(position.get("epoch", -1)) != epoch:
        return 0
    index = int(position["batch_index"])
    if position.get("batch_size") != batch_size or position.get("world_size") != world_size:
        # Another batch geometry: continue after the same number of samples of this epoch.
        samples = index * int(position["batch_size"]) * int(position["world_size"])
        index = samples // (batch_size * world_size)
    return index


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's key array is stored as a list: weights_only loading admits no numpy objects.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank streams (different dropout masks per rank) from one seed."""
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    if _world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def _steps_per_epoch(data: Dataset, batch_size: int, world_size: int, grad_accum: int) -> int:
    return math.ceil(batches_per_epoch(data.train.num_rows, batch_size, world_size) / grad_accum)


@dataclass
class LoadReport:
    """The optional parts `load_state_dict` found and restored (weights and counters always are)."""

    optimizer: bool = False
    scaler: bool = False
    reset: bool = False  # --reset-optimizer discarded the optimizer and scaler state the checkpoint held


# The callback receives (metrics, state or None on ranks > 0, is_best) on every rank at every checkpoint: every
# validation, and every save an interrupt asks for (validated False, see UNVALIDATED_LOSS).
CheckpointFn = Callable[[dict[str, float], "dict[str, Any] | None", bool], None]

# The val_loss reported with a checkpoint saved without validating. Finite, because Ray's run snapshot stores
# NaN and inf as null, which breaks its ordering of checkpoints when the run resumes; worse than any real loss,
# so Ray keeps such a checkpoint only while it is the latest. `validated` says which kind a report is.
UNVALIDATED_LOSS = sys.float_info.max

# What an interrupt function may ask for, polled at every optimizer-step boundary; the ranks act on the
# largest value any of them saw, so they all save and stop at the same step.
CONTINUE, SAVE, STOP = 0, 1, 2  # SAVE: checkpoint this step and go on (preemption notice); STOP: save, return
InterruptFn = Callable[[], int]


@dataclass
class Divergence:
    """Why training stopped itself: global steps first..last were all skipped (non-finite loss or gradients);
    the weights are those after step first - 1."""

    first_step: int
    last_step: int


class LazyHostValue:
    """A device scalar copied to the host without waiting: `read()` gives the newest copy the device has
    finished (on CPU, the value just pushed). On CUDA it may lag a step or two."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.int64) -> None:
        self.asynchronous = device.type == "cuda"
        self.host = torch.zeros((), dtype=dtype, pin_memory=self.asynchronous)
        self.new_event: Any = torch.cuda.Event if self.asynchronous else None
        self.event: Any = None
        self.value: int | float | None = None

    def push(self, value: torch.Tensor) -> None:
        if not self.asynchronous:
            self.value = value.item()
            return
        if self.event is not None and not self.event.query():
            return  # the previous copy is still in flight: keep it
        self._collect()
        self.host.copy_(value, non_blocking=True)
        self.event = self.new_event()
        self.event.record()

    def _collect(self) -> None:
        if self.event is not None and self.event.query():
            self.value, self.event = self.host.item(), None

    def read(self) -> int | float | None:
        if self.asynchronous:
            self._collect()
        return self.value


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, train_model: nn.Module, device: torch.device) -> None:
        """`model` is the plain module (its state_dict is what we save); `train_model` is what runs forward
        in training: the same module, possibly compiled and/or wrapped in DDP."""
        self.cfg, self.model, self.train_model, self.device = cfg, model, train_model, device
        self.rank, self.world_size = _world()
        self.grad_accum = cfg.grad_accum_for(self.world_size)  # more per worker when an elastic run has fewer
        # Interrupt agreement is a tiny CPU collective per step: gloo, so no GPU sync on the training path.
        self._control_group = (dist.new_group(backend="gloo")
                               if self.world_size > 1 and dist.get_backend() != "gloo" else None)
        self._saved_step = 0  # the global step of the newest checkpoint (step 0: nothing to lose yet)
        self.ddp = train_model if isinstance(train_model, DistributedDataParallel) else None
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            # Fused on every device: its kernel skips a step flagged non-finite on the device (see train_step).
            lr=cfg.lr, betas=(0.9, 0.95), fused=True,
        )
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.use_amp and cfg.amp_dtype == "fp16")
        self.schedule = WarmupCosineSchedule(self.optimizer, cfg, total_steps=1)
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.batch_index = 0  # micro-batches of the current epoch already consumed by this rank
        self.best_val_loss = math.inf
        self.ema = torch.zeros((), device=device)  # stays on the device: no host sync per step
        self.ema_started = torch.zeros((), dtype=torch.bool, device=device)  # a step counted in it yet
        # Steps skipped for a non-finite loss or gradients: in all, and in a row now. Device tensors, no syncs.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skip_streak = torch.zeros((), dtype=torch.int64, device=device)
        self._streak_reader = LazyHostValue(device)
        self.diverged: Divergence | None = None
        self.data_wait_s = 0.0  # host time spent waiting for the next micro-batch (for the metrics)
        # Where this run's weights came from (a fork's base checkpoint, a sweep trial's ids); saved with every
        # checkpoint, set by the caller for a fork and restored from the run's own checkpoints.
        self.lineage: dict[str, Any] | None = None
        self.wandb_run_id: str | None = None  # this run's wandb run id, kept in its checkpoints
        # Checkpoints written in the background (set by the Ray adapter); None: `on_checkpoint` does it all.
        self.checkpoints: CheckpointWriter | None = None

    # --- state ---------------------------------------------------------------------------------------------
    def state_dict(self, eval_val_loss: float | None = None) -> dict[str, Any] | None:
        """The full training state on rank 0, None elsewhere. Collective: every rank must call it."""
        per_rank = _all_gather({"rng": capture_rng_state(), "ema": self.ema.item(),
                                 "ema_started": bool(self.ema_started)})
        if self.rank != 0:
            return None
        return {
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scaler_state_dict": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "scheduler_state_dict": self.schedule.state_dict(),
            "val_loss": self.best_val_loss,
            "train_ema_loss": sum(r["ema"] for r in per_rank) / len(per_rank),
            "config": self.cfg.to_dict(),
            "rng_states": [r["rng"] for r in per_rank],
            "rank_ema_losses": [(r["ema"], r["ema_started"]) for r in per_rank],
            "data_position": {"epoch": self.epoch, "batch_index": self.batch_index,
                              "batch_size": self.cfg.batch_size, "world_size": self.world_size},
            "eval_val_loss": eval_val_loss,
            "lineage": self.lineage,
            "skipped_steps": int(self.skipped_steps), "skip_streak": int(self.skip_streak),
            "wandb_run_id": self.wandb_run_id,
        }

    def load_state_dict(self, state: dict[str, Any], *, fork: bool = False, fork_keeps_best: bool = True) -> LoadReport:
        """Restore everything the state holds, then apply the current config's overrides (lr, weight decay,
        dropout were already applied when the model was built). Missing parts start fresh.

        `fork`: the state is another run's checkpoint this run starts from (not this run's own), so
        --reset-optimizer and --restart-schedule apply and the lineage is the caller's. `fork_keeps_best=False`:
        the fork tracks the best of its own validations only (a sweep trial, whose best_model.pt is its own)
        instead of having to beat the base's best (a fine-tune sharing the base's best_model.pt)."""
        report = LoadReport()
        self.model.load_state_dict(state["model_state_dict"])
        reset = fork and self.cfg.reset_optimizer
        report.reset = reset and bool(state.get("optimizer_state_dict"))
        if state.get("optimizer_state_dict") and not reset:
            self.optimizer.load_state_dict(state["optimizer_state_dict"])
            report.optimizer = True
        # Hyperparameters come from the current config, not the checkpoint (fine-tuning overrides).
        self.optimizer.param_groups[0]["weight_decay"] = self.cfg.weight_decay
        for group in self.optimizer.param_groups:
            group["fused"] = True
        if self.scaler.is_enabled() and state.get("scaler_state_dict") and not reset:
            self.scaler.load_state_dict(state["scaler_state_dict"])
            report.scaler = True
        self.epoch = int(state.get("epoch", 0) or 0)
        self.global_step = int(state.get("global_step", 0) or 0)
        if fork and self.cfg.restart_schedule:
            self.schedule.start_step = self.global_step
        else:
            self.schedule.start_step = int((state.get("scheduler_state_dict") or {}).get("start_step", 0))
        if not fork:
            self.lineage = state.get("lineage")
            self.wandb_run_id = state.get("wandb_run_id")  # a fork is a wandb run of its own
        self.schedule.set_step(self.global_step)  # the schedule's position is the global step, by definition
        best = state.get("val_loss") if fork_keeps_best or not fork else None
        self.best_val_loss = math.inf if best is None else float(best)
        self._load_ema(state)
        self.skipped_steps.fill_(int(state.get("skipped_steps", 0) or 0))
        # A fork (a lower --lr, say) starts a streak of its own; a run's own checkpoint continues it exactly.
        self.skip_streak.fill_(0 if fork else int(state.get("skip_streak", 0) or 0))
        self.batch_index = self._resume_batch_index(state.get("data_position"))
        self._saved_step = self.global_step
        rng_states = state.get("rng_states") or []
        if self.rank < len(rng_states):
            restore_rng_state(rng_states[self.rank])
        else:  # a checkpoint from fewer ranks or another tool: a fresh, still deterministic stream
            seed_everything(self.cfg.seed + self.global_step, self.rank)
        return report

    def _load_ema(self, state: dict[str, Any]) -> None:
        per_rank = state.get("rank_ema_losses") or []
        if self.rank < len(per_rank) and len(per_rank) == self.world_size:
            value, started = per_rank[self.rank]
        else:
            value = state.get("train_ema_loss")
            started = value is not None
        self.ema = torch.tensor(float(value or 0.0), dtype=torch.float32, device=self.device)
        self.ema_started = torch.tensor(bool(started), device=self.device)

    def _resume_batch_index(self, position: dict[str, Any] | None) -> int:
        return resume_batch_index(position, self.epoch, self.cfg.batch_size, self.world_size)

    # --- step, evaluation, loop ---------------------------------------------------------------------------
    def _autocast(self):  # noqa: ANN202
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.use_amp)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over `micro_batches` (gradient accumulation). No host sync unless fp16 scaling."""
        self.train_model.train()
        step_loss = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch: one all-reduce per step.
            sync = nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss = loss_fn(self.train_model(x), y) / len(micro_batches)
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.schedule.set_step(self.global_step)
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling
        if self.cfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        # A non-finite loss makes non-finite gradients, and so does an overflow. After DDP's all-reduce every
        # rank has the same gradients, so every rank skips the same steps. Decided on the device: no host sync.
        bad = ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # fp16: the scaler skips the step (and lowers its scale) itself
        else:
            self.optimizer.found_inf = bad.to(torch.float32)  # read by the fused AdamW kernel: no update
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.skipped_steps += bad
        self.skip_streak = (self.skip_streak + 1) * bad
        self._streak_reader.push(self.skip_streak)
        ema = torch.where(self.ema_started, EMA_DECAY * self.ema + (1 - EMA_DECAY) * step_loss, step_loss)
        self.ema = torch.where(bad, self.ema, ema)  # a skipped step's loss is not part of the curve
        self.ema_started = self.ema_started | ~bad

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> float:
        """Mean validation loss over every sample of the split, across all ranks."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        # The training batch size is known to fit in memory; evaluation needs less (no activations kept).
        for x, y in eval_batches(data.val, rank=self.rank, world_size=self.world_size,
                                 batch_size=self.cfg.batch_size):
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)
            totals[0] += loss_fn(logits, y, reduction="sum").double()
            totals[1] += y.numel()
        _all_reduce_sum(totals)
        return (totals[0] / totals[1]).item()

    def mean_ema(self) -> float:
        ema = self.ema.detach().clone().reshape(1)
        return (_all_reduce_sum(ema) / self.world_size).item()

    def _validate(self, data: Dataset, on_checkpoint: CheckpointFn) -> None:
        val_loss = self.evaluate(data)
        is_best = val_loss < self.best_val_loss  # False for NaN: a diverged model is never the best
        self.best_val_loss = min(self.best_val_loss, val_loss) if is_best else self.best_val_loss
        self._checkpoint(on_checkpoint, val_loss, is_best)

    def _checkpoint(self, on_checkpoint: CheckpointFn, val_loss: float | None, is_best: bool = False) -> None:
        """Hand this step's metrics and state to `on_checkpoint`. `val_loss=None`: a checkpoint without
        validating, a resume point that is never a candidate for the best (see UNVALIDATED_LOSS); tracking of the
        best is untouched, so a run stopped there and resumed ends exactly as an uninterrupted one. A non-finite
        validation loss is reported the same way (Ray's run record cannot hold it), with `val_loss_finite` False."""
        finite = val_loss is not None and math.isfinite(val_loss)
        metrics = {
            "epoch": self.epoch, "global_step": self.global_step, "batch_index": self.batch_index,
            "skipped_steps": int(self.skipped_steps),
            "val_loss": val_loss if finite else UNVALIDATED_LOSS, "validated": val_loss is not None,
            "val_loss_finite": finite or val_loss is None,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else UNVALIDATED_LOSS,
            "train_ema_loss": self.mean_ema(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        on_checkpoint(metrics, self.state_dict(eval_val_loss=val_loss if finite else None), is_best)
        self._saved_step = self.global_step

    def _agreed_interrupt(self, interrupt: InterruptFn | None) -> tuple[int, bool, bool]:
        """(the interrupt code, whether the run diverged, whether rank 0 has written the checkpoint in flight) as
        every rank will act on them: the largest any rank saw. The skip streak is read without waiting for the
        device, so ranks may see it at different steps."""
        code = interrupt() if interrupt is not None else CONTINUE
        streak = self._streak_reader.read()
        diverged = bool(self.cfg.max_skipped_steps) and (streak or 0) >= self.cfg.max_skipped_steps
        written = self.checkpoints is not None and self.checkpoints.ready()  # only rank 0 can say True
        if self.world_size > 1:
            t = torch.tensor([code, int(diverged), int(written)], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group)
            code, diverged, written = int(t[0]), bool(t[1]), bool(t[2])
        return code, diverged, written

    def _interrupted(self, interrupt: InterruptFn | None, on_checkpoint: CheckpointFn) -> bool:
        """Act on an interrupt at an optimizer-step boundary; True when training must stop now."""
        code, diverged, written = self._agreed_interrupt(interrupt)
        if written:  # every rank reports the checkpoint rank 0 has finished writing, at this same step
            # It may be this very step's (a validation just wrote it) and the one a preemption or stop saves:
            # then it is uploaded before training goes on, as below.
            self.checkpoints.flush(urgent=code >= SAVE)
        if diverged:
            # Confirmed on the value now on the device (identical on every rank, as the gradients are): on CUDA
            # the lazy read may be older, and the run may have recovered since.
            streak = int(self.skip_streak)
            if streak >= self.cfg.max_skipped_steps:
                # Nothing is saved: the driver points at the last checkpoint with a finite validation loss.
                self.diverged = Divergence(first_step=self.global_step - streak + 1, last_step=self.global_step)
                return True
        if code >= SAVE and self._saved_step != self.global_step:
            self._checkpoint(on_checkpoint, val_loss=None)
        if code >= SAVE and self.checkpoints is not None:
            self.checkpoints.flush(urgent=True)  # a preemption notice or a stop: uploaded before going on
        return code == STOP

    def steps_per_epoch(self, data: Dataset) -> int:
        return _steps_per_epoch(data, self.cfg.batch_size, self.world_size, self.grad_accum)

    def schedule_steps_per_epoch(self, data: Dataset) -> int:
        """Steps per epoch as the learning-rate schedule counts them: an elastic run's are those at its most
        workers, whatever it has now, so a resize never moves the schedule (at worker counts that do not divide
        the effective batch, an epoch has a few more or fewer steps than the schedule counts)."""
        if not self.cfg.elastic:
            return self.steps_per_epoch(data)
        return _steps_per_epoch(data, self.cfg.batch_size, self.cfg.num_workers, self.cfg.grad_accum_steps)

    def _timed(self, batches: Any) -> Any:
        """`batches`, adding the time spent waiting for each to `data_wait_s`."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.data_wait_s += time.perf_counter() - start
            yield item

    def fit(self, data: Dataset, on_checkpoint: CheckpointFn, interrupt: InterruptFn | None = None,
            on_step: Callable[[], None] | None = None) -> bool:
        """Train until `cfg.epochs` epochs are complete, validating and checkpointing every `eval_every` optimizer
        steps and at the end of every epoch. `interrupt` is polled at every optimizer step (see SAVE, STOP);
        `on_step` is called after every optimizer step (progress and metrics; it must not synchronise the device).
        Returns True when every epoch is done, False when an interrupt stopped training (after saving)."""
        cfg = self.cfg
        n_batches = batches_per_epoch(data.train.num_rows, cfg.batch_size, self.world_size)
        self.schedule.total_steps = cfg.epochs * self.schedule_steps_per_epoch(data)
        if self.epoch < cfg.epochs and self._interrupted(interrupt, on_checkpoint):
            return False  # asked to stop before the first step: nothing new to save
        while self.epoch < cfg.epochs:
            micro: list[tuple[torch.Tensor, torch.Tensor]] = []
            batches = shard_batches(data.train, seed=cfg.seed, epoch=self.epoch, rank=self.rank,
                                    world_size=self.world_size, batch_size=cfg.batch_size,
                                    start_batch=self.batch_index)
            for b, x, y in self._timed(batches):
                x = augment(x, cfg.aug_noise_std, seed=cfg.seed, epoch=self.epoch, rank=self.rank, batch_index=b)
                micro.append((x, y))
                if (b + 1) % self.grad_accum and b != n_batches - 1:
                    continue
                self.train_step(micro)
                micro = []
                self.batch_index = b + 1
                if on_step is not None:
                    on_step()
                if self.batch_index < n_batches:  # the epoch's last step is followed by its validation below
                    if self.global_step % cfg.eval_every == 0:
                        self._validate(data, on_checkpoint)  # mid-epoch checkpoint
                    if self._interrupted(interrupt, on_checkpoint):
                        return False
            self.epoch += 1
            self.batch_index = 0
            self._validate(data, on_checkpoint)
            if self.epoch < cfg.epochs and self._interrupted(interrupt, on_checkpoint):
                return False
        return True
