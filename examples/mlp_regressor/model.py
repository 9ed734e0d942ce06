"""An MLP that predicts one number per row of tabular features: a regression model of your own, trained by
raytrain_app.

    python -m raytrain_app.data synth --task regression --input-shape 12 --out data/rows.pkl
    python -m raytrain_app.main --data data/rows.pkl --model examples.mlp_regressor.model:spec \
        --model-args width=64,depth=3 --select-metric val_rmse

The service standardises the features (per column) before the model sees them and keeps the statistics in every
checkpoint; the loss is the mean squared error, and RMSE and MAE are reported beside it (docs/own-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raytrain_app import DataShape, ModelSpec


@dataclass(frozen=True)
class MLPArgs:
    """The model's own settings (--model-args width=128,depth=4)."""

    width: int = 64
    depth: int = 2

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be at least 1, got {self.width} and {self.depth}")


class ResidualLayer(nn.Module):
    """x + dropout(W2 gelu(W1 norm(x))): a layer that keeps its width, so layers stack deep."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, 2 * width)
        self.outer = nn.Linear(2 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(self.outer(nn.functional.gelu(self.inner(self.norm(h)))))


class MLPRegressor(nn.Module):
    """x [B, F] -> one value per row [B]."""

    def __init__(self, num_features: int, args: MLPArgs, dropout: float) -> None:
        super().__init__()
        self.input = nn.Linear(num_features, args.width)
        self.layers = nn.ModuleList(ResidualLayer(args.width, dropout) for _ in range(args.depth))
        self.head = nn.Linear(args.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).squeeze(-1)  # the targets' shape: [B]


def build(shape: DataShape, args: MLPArgs, dropout: float) -> MLPRegressor:
    if len(shape.input_shape) != 1 or shape.per_step:
        raise ValueError(f"reads rows of features [F] with one target each, got inputs {list(shape.input_shape)}"
                         + (" with a target per step" if shape.per_step else ""))
    return MLPRegressor(shape.input_shape[0], args, dropout)


def flops_per_sample(shape: DataShape, args: MLPArgs) -> float:
    """Training FLOPs of one row: 6 per weight (forward and backward)."""
    w = args.width
    return 6.0 * (shape.input_shape[0] * w + args.depth * 4 * w * w + w)


spec = ModelSpec(build=build, task="regression", args=MLPArgs,
                 shard_units=lambda model: model.layers,  # each residual layer its own FSDP unit
                 flops_per_sample=flops_per_sample)
