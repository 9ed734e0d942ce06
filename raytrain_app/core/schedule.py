"""The learning-rate schedule: a pure function of the optimizer step, so resuming needs only the step."""

from __future__ import annotations

import math
from typing import Any

import torch

from raytrain_app.core.config import TrainConfig

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

