"""What a model's outputs mean, by task: the loss, the validation scores and the output shape a model must give.
Pure PyTorch.

classification: outputs are logits [B, C] (or [B, T, C], a class per step), targets integer labels; the loss is
    cross-entropy, the score accuracy.
regression: outputs have the targets' shape ([B], or [B, T] a value per step), targets floats; the loss is the
    mean squared error, the scores RMSE and MAE.

Every score is a sum over samples (and steps) divided by their count, so that a validation split over ranks
adds up to the same numbers as one process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raytrain_app.core.config import CLASSIFICATION


def loss_fn(task: str, outputs: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss (`reduction="sum"`: summed over every target, for validation), in fp32."""
    if task == CLASSIFICATION:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), y.reshape(-1), reduction=reduction)
    return F.mse_loss(outputs.float(), y.float(), reduction=reduction)


def score_sums(task: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sums behind the task's scores over one batch, float64 [number of scores] (no host sync)."""
    if task == CLASSIFICATION:
        return (outputs.argmax(-1) == y).sum().double().reshape(1)
    error = outputs.double() - y.double()
    return torch.stack([(error * error).sum(), error.abs().sum()])


def scores_from_sums(task: str, sums: list[float], count: float) -> dict[str, float]:
    """The task's scores (core.config.TASK_SCORES) from their sums over `count` targets."""
    if task == CLASSIFICATION:
        return {"val_accuracy": sums[0] / count}
    return {"val_rmse": math.sqrt(sums[0] / count), "val_mae": sums[1] / count}


def output_shape(task: str, batch: int, input_shape: tuple[int, ...], per_step: bool, num_classes: int) -> list[int]:
    """The shape a model of `task` must return for `batch` inputs."""
    steps = [input_shape[0]] if per_step else []
    return [batch, *steps, num_classes] if task == CLASSIFICATION else [batch, *steps]


def describe_outputs(task: str, per_step: bool, num_classes: int) -> str:
    where = "per step" if per_step else "per sample"
    return (f"logits over {num_classes} classes {where}" if task == CLASSIFICATION else f"one value {where}")
