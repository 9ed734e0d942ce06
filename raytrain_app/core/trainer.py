"""The training step and loop: plain PyTorch, no Ray and no argparse.

`Trainer` holds every piece of resumable state (model, optimizer, scaler, schedule, counters, EMA, data
position); `raytrain_app.checkpoint.state` turns it into a checkpoint's state and back. `fit()` calls
`on_checkpoint` at every validation; the caller decides where the state goes (Ray in
`raytrain_app.ray_adapter.worker`, a plain file in a benchmark). Distributed pieces use torch.distributed
directly and are no-ops in a single process.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from raytrain_app.core.config import TrainConfig, higher_is_better
from raytrain_app.core.distributed import LazyHostValue, all_reduce_sum, world
from raytrain_app.core.interrupts import CONTINUE, SAVE, STOP, Agreement, InterruptFn
from raytrain_app.core.optim import build_optimizer
from raytrain_app.core.parallel import amp_dtype, strategy_for
from raytrain_app.core.schedule import WarmupCosineSchedule
from raytrain_app.core.tasks import loss_fn, score_sums, scores_from_sums
from raytrain_app.datasets.augment import augment
from raytrain_app.datasets.dataset import Dataset
from raytrain_app.datasets.order import batches_per_epoch, eval_batches, shard_batches

EMA_DECAY = 0.98


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


def eval_forwards(num_rows: int, world_size: int, batch_size: int) -> int:
    """The most forward passes any rank runs over a split of `num_rows` in evaluation (see `eval_batches`)."""
    largest_share = -(-num_rows // world_size)
    return -(-largest_share // batch_size)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`. To a GPU it goes from pinned memory, so the copy is asynchronous and overlaps with the
    work already queued."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=device.type == "cuda")


def _steps_per_epoch(data: Dataset, batch_size: int, world_size: int, grad_accum: int) -> int:
    return math.ceil(batches_per_epoch(data.train.num_rows, batch_size, world_size) / grad_accum)


@dataclass(frozen=True)
class Scores:
    """A validation's results over every sample of the split, across all ranks: the mean loss, and the task's
    scores (`values`: val_accuracy, the fraction of correct predictions per sequence or per step; or val_rmse and
    val_mae for regression), all over the same samples."""

    loss: float
    values: dict[str, float]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)

    @property
    def accuracy(self) -> float | None:
        return self.values.get("val_accuracy")


# The callback receives (metrics, the scores of the validation at this step or None, is_best) on every rank at
# every checkpoint: every validation, and every save an interrupt asks for (validated False, see
# UNVALIDATED_LOSS). It takes the state itself (raytrain_app.checkpoint.state.training_state, a collective).
CheckpointFn = Callable[[dict[str, float], "Scores | None", bool], None]


class PendingCheckpoints(Protocol):
    """Checkpoints written off the training path (raytrain_app.checkpoint.writer): the loop asks whether every
    rank has finished its part of the one in flight, and has every rank report it at the same step."""

    def ready(self) -> bool: ...

    def flush(self, urgent: bool = False) -> None: ...


# The val_loss reported with a checkpoint saved without validating. Finite, because Ray's run snapshot stores
# NaN and inf as null, which breaks its ordering of checkpoints when the run resumes; worse than any real loss,
# so Ray keeps such a checkpoint only while it is the latest. `validated` says which kind a report is.
UNVALIDATED_LOSS = sys.float_info.max
UNVALIDATED_ACCURACY = -1.0  # the same for --select-metric val_accuracy: below any real accuracy


def unvalidated(metric: str) -> float:
    """What a metric is reported as without a validation (or with a non-finite one): the worst value it has."""
    return UNVALIDATED_ACCURACY if higher_is_better(metric) else UNVALIDATED_LOSS


def starting_best(metric: str) -> float:
    """The best value of a metric before any validation: beaten by the first finite one."""
    return -math.inf if higher_is_better(metric) else math.inf


@dataclass
class Divergence:
    """Why training stopped itself: global steps first..last were all skipped (non-finite loss or gradients);
    the weights are those after step first - 1."""

    first_step: int
    last_step: int


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, train_model: nn.Module, device: torch.device) -> None:
        """`model` is the module whose state is saved; `train_model` is what runs forward in training
        (`raytrain_app.core.parallel.parallelize`): the same module, possibly compiled and/or wrapped in DDP, or
        `model` itself when it is sharded (FSDP); both laid out by the strategy of `cfg` (`self.strategy`)."""
        self.cfg, self.model, self.train_model, self.device = cfg, model, train_model, device
        self.rank, self.world_size = world()
        self.grad_accum = cfg.grad_accum_for(self.world_size)  # more per worker when an elastic run has fewer
        self._agreement = Agreement(self.world_size)
        self.saved_step = 0  # the global step of the newest checkpoint (step 0: nothing to lose yet)
        self.strategy = strategy_for(cfg)  # what differs between DDP and FSDP
        self.optimizer = build_optimizer(cfg, model)
        self.amp_dtype = amp_dtype(cfg)
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.use_amp and cfg.amp_dtype == "fp16")
        self.schedule = WarmupCosineSchedule(self.optimizer, cfg, total_steps=1)
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.batch_index = 0  # micro-batches of the current epoch already consumed by this rank
        self.best_val_loss = math.inf
        # The best of each of the task's scores (val_accuracy; val_rmse, val_mae), of validations with a finite loss.
        self.best_scores = {name: starting_best(name) for name in cfg.scores}
        self.ema = torch.zeros((), device=device)  # stays on the device: no host sync per step
        self.ema_started = torch.zeros((), dtype=torch.bool, device=device)  # a step counted in it yet
        # Steps skipped for a non-finite loss or gradients: in all, and in a row now. Device tensors, no syncs.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skip_streak = torch.zeros((), dtype=torch.int64, device=device)
        self._streak_reader = LazyHostValue(device)
        self.diverged: Divergence | None = None
        self.last_loss = torch.zeros((), device=device)
        self.data_wait_s = 0.0  # host time spent waiting for the next micro-batch (for the metrics)
        # Where this run's weights came from (a fork's base checkpoint, a sweep trial's ids); saved with every
        # checkpoint, set by the caller for a fork and restored from the run's own checkpoints.
        self.lineage: dict[str, Any] | None = None
        self.wandb_run_id: str | None = None  # this run's wandb run id, kept in its checkpoints
        # Checkpoints written in the background (set by the Ray adapter); None: `on_checkpoint` does it all.
        self.checkpoints: PendingCheckpoints | None = None

    @property
    def sharded(self) -> bool:
        """--strategy fsdp: parameters are DTensor shards."""
        return self.strategy.sharded

    # --- step, evaluation, loop ---------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.use_amp)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over `micro_batches` (gradient accumulation). No host sync unless fp16 scaling."""
        self.train_model.train()
        step_loss = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            x, y = to_device(x, self.device), to_device(y, self.device)
            last = i == len(micro_batches) - 1
            # Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last micro-batch.
            with self.strategy.gradient_sync(self.train_model, last):
                with self._autocast():
                    loss = loss_fn(self.cfg.task, self.train_model(x), y) / len(micro_batches)
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.schedule.set_step(self.global_step)
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16 loss scaling
        if self.cfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        grad_norm = self.strategy.global_value(grad_norm)  # sharded: the norm over every worker's shard
        # A non-finite loss makes non-finite gradients, and so does an overflow. After DDP's all-reduce every
        # rank has the same gradients (FSDP: the same global norm), so every rank skips the same steps. Decided
        # on the device: no host sync.
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
        self.last_loss = step_loss  # this step's mean training loss, on the device (read it only off the hot path)
        self.skipped_steps += bad
        self.skip_streak = (self.skip_streak + 1) * bad
        self._streak_reader.push(self.skip_streak)
        ema = torch.where(self.ema_started, EMA_DECAY * self.ema + (1 - EMA_DECAY) * step_loss, step_loss)
        self.ema = torch.where(bad, self.ema, ema)  # a skipped step's loss is not part of the curve
        self.ema_started = self.ema_started | ~bad

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> Scores:
        """Mean validation loss and the task's scores over every sample of the split, across all ranks."""
        self.model.eval()
        task = self.cfg.task
        # The loss's sum, the number of targets, the sums behind the scores (correct predictions; squared and
        # absolute errors).
        totals = torch.zeros(2 + len(self.cfg.scores), dtype=torch.float64, device=self.device)
        forwards = 0
        # The training batch size is known to fit in memory; evaluation needs less (no activations kept).
        for x, y in eval_batches(data.val, rank=self.rank, world_size=self.world_size,
                                 batch_size=self.cfg.batch_size):
            x, y = to_device(x, self.device), to_device(y, self.device)
            with self._autocast():
                logits = self.model(x)
            totals[0] += loss_fn(task, logits, y, reduction="sum").double()
            totals[1] += y.numel()
            totals[2:] += score_sums(task, logits, y)
            forwards += 1
        # FSDP: as many forwards on every rank (each all-gathers the weights), whatever this rank's share.
        padding = self.strategy.eval_padding(forwards, eval_forwards(data.val.num_rows, self.world_size,
                                                                     self.cfg.batch_size))
        if padding:
            x_pad = data.val.read_rows(0, 1)[0].to(self.device)
            for _ in range(padding):
                with self._autocast():
                    self.model(x_pad)
        all_reduce_sum(totals)
        loss, count, *sums = totals.tolist()
        return Scores(loss=loss / count, values=scores_from_sums(task, sums, count))

    def mean_ema(self) -> float:
        ema = self.ema.detach().clone().reshape(1)
        return (all_reduce_sum(ema) / self.world_size).item()

    @property
    def best_val_accuracy(self) -> float:
        return self.best_scores.get("val_accuracy", -math.inf)

    @best_val_accuracy.setter
    def best_val_accuracy(self, value: float) -> None:
        self.best_scores["val_accuracy"] = value

    def is_better(self, scores: Scores) -> bool:
        """Whether a validation beats the best so far by --select-metric. Never for a non-finite loss: a diverged
        model is never the best (its argmax can still be right by chance)."""
        if not scores.finite:
            return False
        metric = self.cfg.select_metric
        value, best = ((scores.loss, self.best_val_loss) if metric == "val_loss"
                       else (scores.values[metric], self.best_scores[metric]))
        return value > best if higher_is_better(metric) else value < best

    def _validate(self, data: Dataset, on_checkpoint: CheckpointFn) -> None:
        scores = self.evaluate(data)
        is_best = self.is_better(scores)
        if scores.finite:  # every best is tracked, whichever one --select-metric picks the best model by
            self.best_val_loss = min(self.best_val_loss, scores.loss)
            for name, value in scores.values.items():
                self.best_scores[name] = (max if higher_is_better(name) else min)(self.best_scores[name], value)
        self._checkpoint(on_checkpoint, scores, is_best)

    def _checkpoint(self, on_checkpoint: CheckpointFn, scores: Scores | None, is_best: bool = False) -> None:
        """Hand this step's metrics and state to `on_checkpoint`. `scores=None`: a checkpoint without
        validating, a resume point that is never a candidate for the best (see UNVALIDATED_LOSS); tracking of the
        best is untouched, so a run stopped there and resumed ends exactly as an uninterrupted one. A non-finite
        validation loss is reported the same way (Ray's run record cannot hold it), with `val_loss_finite` False."""
        finite = scores is not None and scores.finite
        metrics = {
            "epoch": self.epoch, "global_step": self.global_step, "batch_index": self.batch_index,
            "skipped_steps": int(self.skipped_steps),
            "val_loss": scores.loss if finite else UNVALIDATED_LOSS,
            **{name: scores.values[name] if finite else unvalidated(name) for name in self.cfg.scores},
            "validated": scores is not None, "val_loss_finite": finite or scores is None,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else UNVALIDATED_LOSS,
            **{f"best_{name}": best if math.isfinite(best) else unvalidated(name)
               for name, best in self.best_scores.items()},
            "train_ema_loss": self.mean_ema(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        on_checkpoint(metrics, scores if finite else None, is_best)
        self.saved_step = self.global_step

    def _agreed_interrupt(self, interrupt: InterruptFn | None) -> tuple[int, bool, bool]:
        """(the interrupt code, whether the run diverged, whether rank 0 has written the checkpoint in flight) as
        every rank will act on them: the largest any rank saw. The skip streak is read without waiting for the
        device, so ranks may see it at different steps."""
        streak = self._streak_reader.read()
        return self._agreement.agree(
            interrupt() if interrupt is not None else CONTINUE,
            diverged=bool(self.cfg.max_skipped_steps) and (streak or 0) >= self.cfg.max_skipped_steps,
            written=self.checkpoints is not None and self.checkpoints.ready())

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
        if code >= SAVE and self.saved_step != self.global_step:
            self._checkpoint(on_checkpoint, scores=None)
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

