"""The per-worker training function Ray Train runs: restore, build, run, report, finish.

`train_func` is that sequence of named steps. `WorkerRun` holds what they build, and its methods are what the
plain-PyTorch loop (`raytrain_app.core.trainer`) calls back: each step's metrics and progress, each checkpoint
(its state written by `raytrain_app.checkpoint`, reported to Ray here), and preemption notices. Ray's worker API
is used here and in the driver only.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray.train
import ray.train.torch
import torch.distributed as dist

from raytrain_app.checkpoint.format import (
    SHARDS_DIR,
    STATE_FILE,
    checkpoint_dir_name,
    finish_sharded_dir,
    load_state,
    save_checkpoint_dir,
    verify_checkpoint_dir,
    write_best_model,
)
from raytrain_app.checkpoint.resolve import parent_location
from raytrain_app.checkpoint.sharded import ShardStager
from raytrain_app.checkpoint.state import (
    LoadReport,
    ShardedState,
    consolidated_state,
    restore_training_state,
    training_state,
)
from raytrain_app.checkpoint.writer import CheckpointWriter
from raytrain_app.core.config import SCORE_LABELS, TrainConfig
from raytrain_app.core.model import set_normalization
from raytrain_app.core.model_spec import build_model
from raytrain_app.core.parallel import parallelize
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import UNVALIDATED_LOSS, Scores, Trainer, unvalidated
from raytrain_app.datasets.dataset import Dataset
from raytrain_app.datasets.formats import open_dataset
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.metrics import RunMetrics, measured, scores_in
from raytrain_app.observability.progress import ProgressSender
from raytrain_app.ray_adapter import ray_compat
from raytrain_app.ray_adapter.control import Interrupts
from raytrain_app.ray_adapter.fault_injection import StepDelay
from raytrain_app.storage.location import parse_location

log = logging.getLogger(__name__)


def train_func(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs (`loop_config`: see `driver.make_trainer`)."""
    configure_console()  # this worker's lines reach the driver's console through Ray's forwarding of stdout/stderr
    cfg = TrainConfig.from_dict(loop_config["config"])
    ray_compat.quiet_report_logs()
    rank = ray.train.get_context().get_world_rank()
    seed_everything(cfg.seed, rank)
    data = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, check_labels=False)
    run = WorkerRun(cfg, loop_config, rank, build_trainer(cfg, loop_config))
    with restored_state(loop_config) as (state, source, fork, checkpoint_dir):
        restored = state is not None
        if restored:
            run.load(state, source, fork, checkpoint_dir)
        del state  # the weights are in the model now: free the loaded copy before training
    run.start_metrics(restored=restored, fork=fork)
    completed = run.train(data)
    run.finish(completed)


@contextmanager
def restored_state(loop_config: dict[str, Any]) -> Iterator[tuple[dict[str, Any] | None, str | None, bool,
                                                                    str | None]]:
    """(state, where it came from, is it a fork, the local folder it is in), valid inside the block. The run's
    own latest checkpoint wins (restart, resubmission); else the checkpoint this run was forked from; else
    (None, None, False, None): training from scratch. The folder is where a sharded checkpoint's shards are read
    from: on remote storage, a download, deleted after the block."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            # Hashed once: by the driver when it chose this checkpoint before starting (`plan_recovery`, which
            # falls back from one that is not whole), else here (a restart after a failure restores a newer one).
            if os.path.basename(checkpoint.path.rstrip("/")) != loop_config.get("verified_checkpoint"):
                verify_checkpoint_dir(checkpoint_dir, label=checkpoint.path)
            path = os.path.join(checkpoint_dir, STATE_FILE)
            # mmap: tensors are read as they are copied into the model, not all held in memory per worker.
            yield load_state(path, mmap=True), checkpoint.path, False, checkpoint_dir
        return
    init_from = loop_config.get("init_from")
    if not init_from:
        yield None, None, False, None
        return
    location = parse_location(init_from)
    state = load_state(location, mmap=True)
    if "sharded" not in state:
        yield state, init_from, True, None
        return
    with parent_location(location).local_copy() as checkpoint_dir:  # the driver verified the folder
        yield state, init_from, True, checkpoint_dir


def build_trainer(cfg: TrainConfig, loop_config: dict[str, Any]) -> Trainer:
    """The model (from the current config: a new --dropout applies), compiled and wrapped in DDP or sharded
    (--strategy), and the Trainer around it."""
    device = ray.train.torch.get_device()
    model = build_model(cfg)
    if loop_config.get("input_stats"):  # a run from scratch (a checkpoint's own statistics are restored with it)
        set_normalization(model, *loop_config["input_stats"])
    model = model.to(device)
    train_model = parallelize(cfg, model, device, ray.train.get_context().get_world_size())
    trainer = Trainer(cfg, model, train_model, device)
    trainer.lineage = loop_config.get("lineage")  # a fork's; the run's own checkpoint restores its own
    return trainer


class WorkerRun:
    """One worker's training: the Trainer, and what its callbacks need (metrics on rank 0, the progress sender,
    the checkpoint writer, the driver's control actor). Everything is set up before training starts."""

    def __init__(self, cfg: TrainConfig, loop_config: dict[str, Any], rank: int, trainer: Trainer) -> None:
        self.cfg, self.loop_config, self.rank, self.trainer = cfg, loop_config, rank, trainer
        self.log_prefix = loop_config.get("log_prefix", "")  # a sweep's trials say which trial a line is from
        # Only a run's own driver listens to its workers (stop requests, divergence, progress); Tune has its own.
        self.control = loop_config.get("stop_request")
        self.save_dir = parse_location(cfg.save_dir)  # canonical: the driver's endpoint is written into the URI
        self.recorder: RunMetrics | None = None
        self.sender: ProgressSender | None = None
        self.step_delay = StepDelay()  # tests only (fault_injection): nothing unless the test asks for a delay
        # The next checkpoint is written once Ray has uploaded the previous one. Sharded: every worker writes its
        # shard (torch.distributed.checkpoint), with collectives of its own on a group of their own.
        if trainer.sharded:
            self.shards = ShardStager(dist.new_group(backend="gloo") if trainer.world_size > 1 else None)
            self.writer = CheckpointWriter(self.write_sharded, self.report, rank=rank,
                                           asynchronous=cfg.async_checkpoint, wait_uploaded=wait_uploaded,
                                           stage=self.stage_sharded)
        else:
            self.writer = CheckpointWriter(self.write, self.report, rank=rank, asynchronous=cfg.async_checkpoint,
                                           wait_uploaded=wait_uploaded)
        trainer.checkpoints = self.writer

    # --- the steps ---------------------------------------------------------------------------------------------
    def load(self, state: dict[str, Any], source: str | None, fork: bool, checkpoint_dir: str | None) -> None:
        report = restore_training_state(self.trainer, state, fork=fork,
                                        fork_keeps_best=self.loop_config.get("fork_keeps_best", True),
                                        checkpoint_dir=checkpoint_dir)
        if self.rank == 0:
            self._print_load_report(str(source), report)

    def start_metrics(self, *, restored: bool, fork: bool) -> None:
        """Rank 0 records metrics (metrics.jsonl, wandb) and sends progress to the driver."""
        if self.rank != 0:
            return
        trainer = self.trainer
        self.recorder = RunMetrics(
            self.cfg, parse_location(self.loop_config["run_dir"]), start_step=trainer.global_step,
            restored_step=trainer.global_step if restored and not fork else None,
            attempt=self.loop_config.get("attempt", ""), fork_of=trainer.lineage if fork else None,
            num_params=sum(p.numel() for p in trainer.model.parameters()), device=trainer.device,
            wandb_group=self.loop_config.get("wandb_group"), wandb_run_id=trainer.wandb_run_id)
        trainer.wandb_run_id = self.recorder.wandb_run_id  # kept in every checkpoint from now on
        if self.control is not None:
            self.sender = ProgressSender(self.control, self.cfg.epochs, trainer.global_step, self.cfg.progress_every,
                                         trainer.device)

    def train(self, data: Dataset) -> bool:
        """Run the loop to the end (True) or to a stop request (False); the last checkpoint is reported before
        this returns (Ray's upload ends with the workers)."""
        interrupts = Interrupts(self.control, self.on_notice) if self.control is not None else None
        first_step, started = self.trainer.global_step, time.perf_counter()
        try:
            completed = self.trainer.fit(data, self.on_checkpoint, interrupts, self.on_step)
            self.writer.flush()
            self._record_end(completed, first_step, time.perf_counter() - started)
        except BaseException:
            if self.recorder is not None:
                self.recorder.close(failed=True)
            raise
        if self.recorder is not None:
            self.recorder.close(failed=self.trainer.diverged is not None)
        return completed

    def finish(self, completed: bool) -> None:
        """Say how training ended: a divergence goes to the driver (or Tune); a stop is confirmed."""
        trainer = self.trainer
        if trainer.diverged is not None:
            self._report_divergence()
        elif not completed and self.rank == 0:
            log.info(f"{self.log_prefix}Stopped on request at epoch {trainer.epoch}, global step "
                     f"{trainer.global_step}, batch {trainer.batch_index}: checkpoint saved.")

    # --- what the loop calls -------------------------------------------------------------------------------------
    def on_step(self) -> None:
        trainer = self.trainer
        if self.recorder is not None:
            self.recorder.on_step(trainer.global_step, trainer.ema, trainer.optimizer.param_groups[0]["lr"],
                                  trainer.data_wait_s)
        if self.sender is not None:
            self.sender(trainer)
        self.step_delay()

    def on_checkpoint(self, metrics: dict[str, Any], scores: Scores | None, is_best: bool) -> None:
        """Every rank, at every validation and every save an interrupt asks for."""
        state = training_state(self.trainer, scores)  # a collective (DDP: rank 0 gets the state)
        if self.trainer.sharded:
            # best_model.pt is one consolidated file: gathered now (a collective), written in the background.
            best = consolidated_state(self.trainer, state, with_optimizer=self.cfg.best_model == "full"
                                      ) if is_best else None
            state = (state, best)
        if self.rank == 0:
            log.info(self.log_prefix + validation_line(metrics, self.cfg.epochs))
        if self.recorder is not None:
            # The metrics up to this step first (see RunMetrics.commit for why before the checkpoint).
            self.recorder.commit({
                "step": metrics["global_step"], "epoch": metrics["epoch"],
                "val_loss": scores.loss if scores is not None else None,
                **{name: scores.values[name] if scores is not None else None for name in self.cfg.scores},
                "best_val_loss": metrics["best_val_loss"] if metrics["best_val_loss"] < UNVALIDATED_LOSS else None,
                **{f"best_{name}": metrics[f"best_{name}"] if measured(name, metrics[f"best_{name}"]) else None
                   for name in self.cfg.scores},
                "train_ema_loss": metrics["train_ema_loss"], "validated": metrics["validated"],
                "skipped_steps": metrics["skipped_steps"],
                **self.recorder.speed(self.trainer.world_size, self.trainer.grad_accum),
                # Checkpoints so far: the training thread's time blocked by them, and their writes' time.
                "checkpoint_blocked_total_s": self.writer.blocked_s,
                "checkpoint_write_total_s": self.writer.write_s})
        self.writer.submit(metrics, state, is_best, checkpoint_dir_name(metrics["global_step"]))

    def on_notice(self, info: Any) -> None:
        if self.rank == 0:  # the step just taken is checkpointed next, unless a validation already did
            log.info(f"{self.log_prefix}Preemption notice for node(s) {', '.join(info.preempted_node_ids)} (ranks "
                     f"{info.preempted_ranks}): checkpointing global step {self.trainer.global_step}")

    # --- what the checkpoint writer calls ---------------------------------------------------------------------------
    def write(self, snapshot: dict[str, Any], is_best: bool, dir_name: str) -> Any:
        """Rank 0, in the background: the checkpoint folder (state, meta, manifest) and best_model.pt."""
        local_dir = tempfile.mkdtemp(prefix="raytrain-ckpt-")
        try:
            save_checkpoint_dir(local_dir, snapshot)
            if is_best:  # the state file just written, copied: serialising a large model once is enough
                write_best_model(self.save_dir, os.path.join(local_dir, STATE_FILE))
        except BaseException:
            shutil.rmtree(local_dir, ignore_errors=True)
            raise
        return ray.train.Checkpoint.from_directory(local_dir)

    def stage_sharded(self, state: tuple[ShardedState, dict[str, Any] | None]) -> tuple:
        """Every worker, on the training thread: its shards copied to host memory and their write started, rank
        0's small state copied (see `write_sharded`)."""
        sharded, best = state
        local_dir = tempfile.mkdtemp(prefix="raytrain-ckpt-")
        try:
            written = self.shards.stage(sharded.tensors, os.path.join(local_dir, SHARDS_DIR))
        except BaseException:
            shutil.rmtree(local_dir, ignore_errors=True)
            raise
        index = self.writer.snapshot(sharded.index) if sharded.index is not None else None
        return local_dir, written, index, best

    def write_sharded(self, staged: tuple, is_best: bool, dir_name: str) -> Any:
        """Every worker, in the background: its shard written, then its manifest (rank 0: state.pt, meta.json,
        manifest.json and best_model.pt). Ray copies every worker's folder into the one checkpoint folder."""
        local_dir, written, index, best = staged
        try:
            written.result()
            finish_sharded_dir(local_dir, index, rank=self.rank, world_size=self.trainer.world_size)
            if best is not None:
                write_best_model(self.save_dir, best)
        except BaseException:
            shutil.rmtree(local_dir, ignore_errors=True)
            raise
        return ray.train.Checkpoint.from_directory(local_dir)

    def report(self, metrics: dict[str, Any], checkpoint: Any, dir_name: str, urgent: bool) -> None:
        """Every rank, at the same step (the report is a barrier). Ray copies rank 0's folder to the run's storage
        (in its own background thread, unless --no-async-checkpoint or `urgent`: a preemption or stop save),
        registers the checkpoint once it is there, then deletes the folder."""
        if checkpoint is None:
            ray.train.report(metrics, checkpoint_dir_name=dir_name)
            return
        background = self.cfg.async_checkpoint and not urgent
        mode = ray.train.CheckpointUploadMode.ASYNC if background else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)

    # --- helpers -------------------------------------------------------------------------------------------------
    def _print_load_report(self, source: str, report: LoadReport) -> None:
        """One line confirming what the workers restored (the driver printed the full summary before starting)."""
        trainer = self.trainer
        parts = ["weights", "optimizer" if report.optimizer else
                 "optimizer reset (--reset-optimizer)" if report.reset else "no optimizer state (fresh)"]
        if trainer.scaler.is_enabled():
            parts.append("gradient scaler" if report.scaler else "no gradient scaler state (fresh)")
        log.info(f"{self.log_prefix}Workers loaded {source}: {', '.join(parts)}; at epoch {trainer.epoch}, global "
                 f"step {trainer.global_step}, batch {trainer.batch_index}; {trainer.world_size} worker(s), "
                 f"{trainer.grad_accum} micro-batch(es) per step")

    def _record_end(self, completed: bool, first_step: int, loop_s: float) -> None:
        """Rank 0: the event that ends this attempt in metrics.jsonl (benchmarks/ray_overhead.py reads its times)."""
        if self.recorder is None:
            return
        trainer, d = self.trainer, self.trainer.diverged
        if d is not None:  # the steps that led there, and why it ended
            event = {"event": "diverged", "step": d.last_step, "first_step": d.first_step,
                     "cause": f"steps {d.first_step}-{d.last_step} had a non-finite loss or gradients"}
        else:  # this attempt's training loop, checkpoints included
            event = {"event": "finished" if completed else "stopped", "step": trainer.global_step,
                     "steps": trainer.global_step - first_step, "loop_s": loop_s,
                     "checkpoint_blocked_total_s": self.writer.blocked_s,
                     "checkpoint_write_total_s": self.writer.write_s}
        self.recorder.commit(None, events=[event])

    def _report_divergence(self) -> None:
        """Tell the driver (a run's) or Tune (a trial's) that training stopped itself; nothing was saved."""
        trainer, d = self.trainer, self.trainer.diverged
        info = {"first_step": d.first_step, "last_step": d.last_step, "epoch": trainer.epoch,
                "global_step": trainer.global_step}
        if self.rank == 0:
            log.info(f"{self.log_prefix}Diverged: global steps {d.first_step}-{d.last_step} all had a non-finite "
                     f"loss or gradients and were skipped; stopping without saving.")
            if self.control is not None:
                ray.get(self.control.report_divergence.remote(info))
        # A sweep trial's last report: ASHA and the results table see a diverged trial (no checkpoint with it).
        ray.train.report({"epoch": trainer.epoch, "global_step": trainer.global_step,
                          "batch_index": trainer.batch_index, "val_loss": float("inf"),
                          **{name: unvalidated(name) for name in self.cfg.scores},
                          "best_val_loss": trainer.best_val_loss,
                          **{f"best_{name}": best if math.isfinite(best) else unvalidated(name)
                             for name, best in trainer.best_scores.items()},
                          "train_ema_loss": trainer.mean_ema(),
                          "skipped_steps": int(trainer.skipped_steps), "validated": False, "diverged": True})


def validation_line(metrics: dict[str, Any], epochs: int) -> str:
    """The console line of one checkpoint: where, the losses and the task's scores (val_accuracy; val_rmse and
    val_mae), the best of them so far, the learning rate."""
    validated, scores = metrics["validated"], scores_in(metrics)
    return (f"epoch {metrics['epoch'] + (metrics['batch_index'] > 0)}/{epochs} step {metrics['global_step']} "
            f"train_ema_loss {metrics['train_ema_loss']:.4f} "
            + ("saved on request (not validated) " if not validated else
               f"val_loss {metrics['val_loss']:.6f} " + "".join(f"{name} {metrics[name]:.4f} " for name in scores)
               if metrics["val_loss_finite"] else "val_loss non-finite ")
            + (f"best {metrics['best_val_loss']:.6f} " if metrics["best_val_loss"] < UNVALIDATED_LOSS else "")
            + (f"best_{SCORE_LABELS[scores[0]].lower()} {metrics[f'best_{scores[0]}']:.4f} "
               if scores and measured(scores[0], metrics[f"best_{scores[0]}"]) else "")
            + f"lr {metrics['lr']:.2e}"
            + (f" skipped_steps {metrics['skipped_steps']}" if metrics["skipped_steps"] else ""))


def wait_uploaded(timeout_s: float) -> None:
    """Return once Ray Train has uploaded and registered every checkpoint this worker reported."""
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=timeout_s)
