"""Scoring a trained model on a labelled split. A classifier: the confusion matrix and the summed loss, then
per-class precision, recall, F1 and support from the matrix. A regression model: the summed loss, squared and
absolute errors as validation sums them, R2, and every (true, predicted) pair for the plot. Plain PyTorch, no
I/O: `python -m raytrain_app.evaluate` feeds it batches and writes what it returns."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from raytrain_app.core import tasks
from raytrain_app.core.config import REGRESSION
from raytrain_app.core.errors import UserError
from raytrain_app.core.model import loss_fn


@dataclass
class Tally:
    """What scoring a split adds up: the summed cross-entropy (float64), the labels seen, and the confusion
    matrix (rows: true class, columns: predicted class)."""

    loss_sum: float
    count: int
    confusion: torch.Tensor  # int64 [C, C]

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        return int(self.confusion.diagonal().sum()) / self.count


@torch.no_grad()
def tally(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
          device: torch.device, label: str = "the data") -> Tally:
    """Score `model` (in eval mode) on every (x, y) batch: per sequence, or per step for [N, T] labels, as
    validation does (a batch's float32 loss sum, added up in float64). A label outside [0, num_classes) is a
    UserError naming `label`."""
    loss_sum, count = 0.0, 0
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for x, y in batches:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise UserError(f"{label} has labels from {low} to {high}, but the checkpoint's model has {num_classes} "
                            f"classes (0 to {num_classes - 1}): score it with data labelled as the model was trained")
        logits = model(x.to(device))
        y_device = y.to(device)
        loss_sum += loss_fn(logits, y_device, reduction="sum").double().item()
        count += y.numel()
        predicted = logits.argmax(-1).reshape(-1).cpu()
        confusion += torch.bincount(y.reshape(-1) * num_classes + predicted, minlength=num_classes * num_classes)
    if count == 0:
        raise UserError(f"{label} is empty: nothing to score")
    return Tally(loss_sum=loss_sum, count=count, confusion=confusion.reshape(num_classes, num_classes))


def class_report(confusion: torch.Tensor) -> list[dict[str, float]]:
    """Per class: precision (of the rows predicted as it), recall (of its rows), F1 and support (its rows). A
    ratio over nothing (a class never predicted, or absent) is 0.0, as scikit-learn's zero_division=0."""
    matrix = confusion.to(torch.float64)
    correct = matrix.diagonal()
    predicted, actual = matrix.sum(dim=0), matrix.sum(dim=1)
    rows = []
    for c in range(matrix.shape[0]):
        precision = float(correct[c] / predicted[c]) if predicted[c] else 0.0
        recall = float(correct[c] / actual[c]) if actual[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": c, "precision": precision, "recall": recall, "f1": f1, "support": int(actual[c])})
    return rows


@dataclass
class RegressionTally:
    """What scoring a split of float targets adds up, as validation does (each batch's sums added in float64):
    the summed squared error (the loss, in fp32 per batch), the squared and absolute errors (float64), the targets
    seen, and every target with its prediction (float32, flattened in the split's order, steps within a row)."""

    loss_sum: float
    squared_sum: float
    absolute_sum: float
    count: int
    truth: torch.Tensor  # float32 [count]
    predicted: torch.Tensor  # float32 [count]

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def rmse(self) -> float:
        return math.sqrt(self.squared_sum / self.count)

    @property
    def mae(self) -> float:
        return self.absolute_sum / self.count

    @property
    def r2(self) -> float:
        """1 - SSE/SST over every target value. Targets without spread (SST 0) give 1.0 when predicted exactly,
        else 0.0, as scikit-learn's r2_score."""
        truth = self.truth.double()
        total = float(((truth - truth.mean()) ** 2).sum())
        if total == 0.0:
            return 1.0 if self.squared_sum == 0.0 else 0.0
        return 1.0 - self.squared_sum / total


@torch.no_grad()
def tally_regression(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                     label: str = "the data") -> RegressionTally:
    """Score `model` (in eval mode, outputs of the targets' shape) on every (x, y) batch: per sample, or per step
    for [N, T] targets. An empty split is a UserError naming `label`."""
    loss_sum, sums, count = 0.0, torch.zeros(2, dtype=torch.float64), 0
    truth, predicted = [], []
    for x, y in batches:
        outputs = model(x.to(device))
        y_device = y.to(device)
        loss_sum += tasks.loss_fn(REGRESSION, outputs, y_device, reduction="sum").double().item()
        sums += tasks.score_sums(REGRESSION, outputs, y_device).cpu()
        count += y.numel()
        truth.append(y.reshape(-1).float())
        predicted.append(outputs.float().reshape(-1).cpu())
    if count == 0:
        raise UserError(f"{label} is empty: nothing to score")
    squared_sum, absolute_sum = sums.tolist()
    return RegressionTally(loss_sum=loss_sum, squared_sum=squared_sum, absolute_sum=absolute_sum, count=count,
                           truth=torch.cat(truth), predicted=torch.cat(predicted))
