"""The thin layer between Ray Train and the plain-PyTorch loop: restore, prepare, fit, report.

Runs on every Ray Train worker. Ray calls appear only here (and in the driver, `main.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from raytrain_app.async_checkpoint import CheckpointWriter
from raytrain_app.checkpoint import (
    STATE_FILE,
    checkpoint_dir_name,
    load_state,
    save_checkpoint_dir,
    verify_checkpoint_dir,
    write_best_model,
)
from raytrain_app.config import TrainConfig
from raytrain_app.data import open_dataset
from raytrain_app.graceful_stop import Interrupts
from raytrain_app.loop import UNVALIDATED_LOSS, LoadReport, Trainer, seed_everything
from raytrain_app.metrics import RunMetrics
from raytrain_app.model import SequenceTransformer
from raytrain_app.progress import ProgressSender
from raytrain_app.storage import parse_location


def _restore_source(loop_config: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(state, where it came from, is it a fork). The run's own latest checkpoint wins (restart, resubmission);
    else the checkpoint this run was forked from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            # The driver verified it before starting (recover_run); this copy is what this worker loads.
            verify_checkpoint_dir(checkpoint_dir, label=checkpoint.path)
            path = os.path.join(checkpoint_dir, STATE_FILE)
            # mmap: tensors are read as they are copied into the model, not all held in memory per worker.
            return load_state(path, mmap=True), checkpoint.path, False
    init_from = loop_config.get("init_from")
    if init_from:
        return load_state(init_from, mmap=True), init_from, True
    return None, None, False


def _print_load_report(source: str, report: LoadReport, trainer: Trainer, prefix: str) -> None:
    """One line confirming what the workers restored (the driver printed the full summary before starting)."""
    parts = ["weights", "optimizer" if report.optimizer else
             "optimizer reset (--reset-optimizer)" if report.reset else "no optimizer state (fresh)"]
    if trainer.scaler.is_enabled():
        parts.append("gradient scaler" if report.scaler else "no gradient scaler state (fresh)")
    print(f"{prefix}Workers loaded {source}: {', '.join(parts)}; at epoch {trainer.epoch}, global step "
          f"{trainer.global_step}, batch {trainer.batch_index}; {trainer.world_size} worker(s), "
          f"{trainer.grad_accum} micro-batch(es) per step", flush=True)


def _quiet_ray_report_logs() -> None:
    """Our one line per validation says what matters; Ray's per-report INFO lines repeat it at length."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):  # Ray names the first logger after its file path
        logging.getLogger(name).setLevel(logging.WARNING)


def train_func(loop_config: dict[str, Any]) -> None:
    cfg = TrainConfig.from_dict(loop_config["config"])
    _quiet_ray_report_logs()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    seed_everything(cfg.seed, rank)
    data = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, check_labels=False)
    state, source, fork = _restore_source(loop_config)
    log_prefix = loop_config.get("log_prefix", "")  # a sweep's trials say which trial a line is from

    model = SequenceTransformer(cfg).to(device)  # built from the current config: a new --dropout applies
    train_model = torch.compile(model) if cfg.compile else model
    train_model = ray.train.torch.prepare_model(train_model, move_to_device=False)  # DDP when world size > 1
    trainer = Trainer(cfg, model, train_model, device)
    trainer.lineage = loop_config.get("lineage")  # a fork's; the run's own checkpoint restores its own
    state_restored = False
    if state is not None:
        report = trainer.load_state_dict(state, fork=fork, fork_keeps_best=loop_config.get("fork_keeps_best", True))
        del state
        state_restored = True
        if rank == 0:
            _print_load_report(str(source), report, trainer, log_prefix)

    save_dir = parse_location(cfg.save_dir)  # canonical: the driver's endpoint is written into the URI
    # Only a run's own driver listens to its workers (stop requests, divergence, progress); Tune has its own.
    control = loop_config.get("stop_request")
    recorder = None
    if rank == 0:
        recorder = RunMetrics(
            cfg, parse_location(loop_config["run_dir"]), start_step=trainer.global_step,
            restored_step=trainer.global_step if state_restored and not fork else None,
            attempt=loop_config.get("attempt", ""), fork_of=trainer.lineage if fork else None,
            num_params=sum(p.numel() for p in model.parameters()), device=device,
            wandb_group=loop_config.get("wandb_group"), wandb_run_id=trainer.wandb_run_id)
        trainer.wandb_run_id = recorder.wandb_run_id  # kept in every checkpoint from now on
    sender = None
    if rank == 0 and control is not None:
        sender = ProgressSender(control, cfg.epochs, trainer.global_step, cfg.progress_every, device)

    def on_step() -> None:
        if recorder is not None:
            recorder.on_step(trainer.global_step, trainer.ema, trainer.optimizer.param_groups[0]["lr"],
                             trainer.data_wait_s)
        if sender is not None:
            sender(trainer)

    def on_checkpoint(metrics: dict[str, float], state: dict[str, Any] | None, is_best: bool) -> None:
        if rank == 0:
            validated = metrics["validated"]
            print(
                f"{log_prefix}epoch {metrics['epoch'] + (metrics['batch_index'] > 0)}/{cfg.epochs} "
                f"step {metrics['global_step']} "
                f"train_ema_loss {metrics['train_ema_loss']:.4f} "
                + ("saved on request (not validated) " if not validated else
                    f"val_loss {metrics['val_loss']:.6f} " if metrics["val_loss_finite"] else "val_loss non-finite ")
                + (f"best {metrics['best_val_loss']:.6f} " if metrics["best_val_loss"] < UNVALIDATED_LOSS else "")
                + f"lr {metrics['lr']:.2e}"
                + (f" skipped_steps {metrics['skipped_steps']}" if metrics["skipped_steps"] else ""),
                flush=True,
            )
        if state is not None:
            # The metrics up to this step first (see RunMetrics.commit for why before the checkpoint).
            recorder.commit({
                "step": metrics["global_step"], "epoch": metrics["epoch"],
                "val_loss": metrics["val_loss"] if validated and metrics["val_loss_finite"] else None,
                "best_val_loss": metrics["best_val_loss"] if metrics["best_val_loss"] < UNVALIDATED_LOSS else None,
                "train_ema_loss": metrics["train_ema_loss"], "validated": validated,
                "skipped_steps": metrics["skipped_steps"],
                **recorder.speed(trainer.world_size, trainer.grad_accum),
                # Checkpoints so far: the training thread's time blocked by them, and their writes' time.
                "checkpoint_blocked_total_s": writer.blocked_s, "checkpoint_write_total_s": writer.write_s})
        writer.submit(metrics, state, is_best, checkpoint_dir_name(metrics["global_step"]))

    def write(snapshot: dict[str, Any], is_best: bool, dir_name: str) -> Any:
        """Rank 0, in the background: the checkpoint folder (state, meta, manifest) and best_model.pt."""
        local_dir = tempfile.mkdtemp(prefix="raytrain-ckpt-")
        try:
            save_checkpoint_dir(local_dir, snapshot)
            if is_best:  # the state file just written, copied: serialising a large model once is enough
                write_best_model(save_dir, os.path.join(local_dir, STATE_FILE))
        except BaseException:
            shutil.rmtree(local_dir, ignore_errors=True)
            raise
        return ray.train.Checkpoint.from_directory(local_dir)

    def report(metrics: dict[str, Any], checkpoint: Any, dir_name: str, urgent: bool) -> None:
        """Every rank, at the same step (the report is a barrier). Ray copies rank 0's folder to the run's storage
        (in its own background thread, unless --no-async-checkpoint or `urgent`: a preemption or stop save),
        registers the checkpoint once it is there, then deletes the folder."""
        if checkpoint is None:
            ray.train.report(metrics, checkpoint_dir_name=dir_name)
        else:
            background = cfg.async_checkpoint and not urgent
            mode = ray.train.CheckpointUploadMode.ASYNC if background else ray.train.CheckpointUploadMode.SYNC
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name,
                             checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)

    # The next checkpoint is written once Ray has uploaded and deleted the previous one's local folder.
    writer = CheckpointWriter(write, report, rank=rank, asynchronous=cfg.async_checkpoint,
                              uploaded=lambda checkpoint: not os.path.exists(checkpoint.path))
    trainer.checkpoints = writer

    def on_notice(info: Any) -> None:
        if rank == 0:  # the step just taken is checkpointed next, unless a validation already did
            print(f"{log_prefix}Preemption notice for node(s) {', '.join(info.preempted_node_ids)} (ranks "
                  f"{info.preempted_ranks}): checkpointing global step {trainer.global_step}", flush=True)

    failed = True
    first_step, started = trainer.global_step, time.perf_counter()
    try:
        completed = trainer.fit(data, on_checkpoint,
                                Interrupts(control, on_notice) if control is not None else None, on_step)
        writer.flush()  # the last checkpoint is reported before the workers end (Ray's upload ends with them)
        if trainer.diverged is not None and recorder is not None:  # the steps that led there, and why it ended
            d = trainer.diverged
            recorder.commit(None, events=[{"event": "diverged", "step": d.last_step, "first_step": d.first_step,
                                           "cause": f"steps {d.first_step}-{d.last_step} had a non-finite loss "
                                                    f"or gradients"}])
        elif recorder is not None:  # this attempt's training loop, checkpoints included (benchmarks/ray_overhead.py)
            recorder.commit(None, events=[{
                "event": "finished" if completed else "stopped", "step": trainer.global_step,
                "steps": trainer.global_step - first_step, "loop_s": time.perf_counter() - started,
                "checkpoint_blocked_total_s": writer.blocked_s, "checkpoint_write_total_s": writer.write_s}])
        failed = trainer.diverged is not None
    finally:
        if recorder is not None:
            recorder.close(failed=failed)
    if trainer.diverged is not None:
        _report_divergence(trainer, control, log_prefix, rank)
    elif not completed and rank == 0:
        print(f"{log_prefix}Stopped on request at epoch {trainer.epoch}, global step {trainer.global_step}, "
              f"batch {trainer.batch_index}: checkpoint saved.", flush=True)


def _report_divergence(trainer: Trainer, stop_request: Any, log_prefix: str, rank: int) -> None:
    """Tell the driver (a run's) or Tune (a trial's) that training stopped itself; nothing was saved."""
    d = trainer.diverged
    info = {"first_step": d.first_step, "last_step": d.last_step, "epoch": trainer.epoch,
            "global_step": trainer.global_step}
    if rank == 0:
        print(f"{log_prefix}Diverged: global steps {d.first_step}-{d.last_step} all had a non-finite loss or "
              f"gradients and were skipped; stopping without saving.", flush=True)
        if stop_request is not None:
            ray.get(stop_request.report_divergence.remote(info))
    # A sweep trial's last report: ASHA and the results table see a diverged trial (no checkpoint with it).
    ray.train.report({"epoch": trainer.epoch, "global_step": trainer.global_step, "batch_index": trainer.batch_index,
                      "val_loss": float("inf"), "best_val_loss": trainer.best_val_loss,
                      "train_ema_loss": trainer.mean_ema(), "skipped_steps": int(trainer.skipped_steps),
                      "validated": False, "diverged": True})
