"""The driver's progress display: a live bar on a terminal, plain periodic lines otherwise (`ray job logs`, CI).

Rank 0 sends its progress (epoch, step, EMA loss, best validation loss, throughput) to the run's control actor
about once a second, off the training step; the driver reads it from there. A Ray Train callback would only see
the reports made at checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TextIO

import torch

from raytrain_app.core.distributed import LazyHostValue
from raytrain_app.observability.metrics import scores_in

PUSH_INTERVAL_S = 1.0  # how often rank 0 sends its progress (more often when --progress-every asks for it)
MIN_PUSH_INTERVAL_S = 0.1


def push_interval(progress_every: float) -> float:
    return max(MIN_PUSH_INTERVAL_S, min(PUSH_INTERVAL_S, progress_every))


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def progress_line(p: dict[str, Any]) -> str:
    """`p`: rank 0's progress (see `ProgressSender`); the best scores shown are the task's (those in `p`)."""
    best = p.get("best_val_loss")
    done = p["step"] - p["start_step"]
    remaining = p["total_steps"] - p["step"]
    eta = remaining * p["step_time_s"] if p.get("step_time_s") else None
    return (f"progress: epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['total_steps']} "
            f"({100 * p['step'] / max(1, p['total_steps']):.0f}%) train_ema_loss {_loss(p['train_ema_loss'])} "
            f"best_val_loss {_loss(best)} "
            + "".join(f"best_{name} {_loss(p[f'best_{name}'])} " for name in scores_in(p, prefix="best_"))
            + f"samples/s {p.get('samples_per_s') or 0:.1f} "
            f"ETA {format_eta(eta) if done > 0 else '?'}")


def bar(p: dict[str, Any], width: int = 24) -> str:
    filled = round(width * min(1.0, p["step"] / max(1, p["total_steps"])))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class ProgressDisplay:
    """Called from the driver's main thread while it waits for training (`on_tick`). `read` returns rank 0's
    latest progress, or None (nothing yet, or the cluster did not answer in time). `out`: the console stream the
    command draws on (a line redrawn in place is not a log record)."""

    def __init__(self, read: Callable[[float], dict[str, Any] | None], every_s: float, out: TextIO) -> None:
        self.read, self.every_s, self.out = read, every_s, out
        self.interval = push_interval(every_s)
        self.live = out.isatty()
        self.last_read, self.last_line, self.seen = -math.inf, -math.inf, None

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last_read < self.interval:
            return
        self.last_read = now
        progress = self.read(self.interval)
        if progress is None or progress == self.seen:
            return
        self.seen = progress
        if self.live:  # one line redrawn in place
            self.out.write("\r\x1b[2K" + bar(progress) + " " + progress_line(progress).removeprefix("progress: "))
            self.out.flush()
        elif now - self.last_line >= self.every_s:
            self.last_line = now
            self.out.write(progress_line(progress) + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.live and self.seen is not None:
            self.out.write("\n")
            self.out.flush()


def read_from(control: Any) -> Callable[[float], dict[str, Any] | None]:
    """The reader of a run's control actor (see ray_adapter.control.StopRequest)."""

    def read(timeout: float) -> dict[str, Any] | None:
        import ray

        try:
            return ray.get(control.progress.remote(), timeout=timeout)
        except ray.exceptions.RayError:  # a busy or restarting cluster: the next tick asks again
            return None

    return read


class ProgressSender:
    """Rank 0's side: at most one small message a second to the control actor, fire and forget."""

    def __init__(self, control: Any, epochs: int, start_step: int, progress_every: float,
                 device: torch.device) -> None:
        self.control, self.epochs, self.start_step = control, epochs, start_step
        self.interval = push_interval(progress_every)
        self.ema = LazyHostValue(device, torch.float32)  # the EMA loss, copied without waiting for the device
        self.last = (time.perf_counter(), start_step)

    def __call__(self, trainer: Any) -> None:
        now = time.perf_counter()
        self.ema.push(trainer.ema)  # each step: a copy already in flight is left alone (see LazyHostValue)
        last_time, last_step = self.last
        if now - last_time < self.interval:
            return
        self.last = (now, trainer.global_step)
        step_time = (now - last_time) / max(1, trainer.global_step - last_step)
        samples = trainer.cfg.batch_size * trainer.grad_accum * trainer.world_size
        best = trainer.best_val_loss
        self.control.report_progress.remote({
            "epoch": trainer.epoch + (trainer.batch_index > 0), "epochs": self.epochs, "step": trainer.global_step,
            "total_steps": trainer.schedule.total_steps, "start_step": self.start_step,
            "train_ema_loss": self.ema.read(),  # the newest copy the device has finished: None at first
            "best_val_loss": best if math.isfinite(best) else None,
            **{f"best_{name}": value if math.isfinite(value) else None  # the task's: val_accuracy; val_rmse, val_mae
               for name, value in trainer.best_scores.items()},
            "samples_per_s": samples / step_time, "step_time_s": step_time,
        })

