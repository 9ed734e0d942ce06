"""A 1-D convolutional classifier over feature sequences: a model of your own, trained by raytrain_app.

    python -m raytrain_app.main --model examples.conv_classifier.model:spec --model-args channels=32,num_blocks=3 ...

Everything raytrain_app needs is `spec` at the bottom: how to build the module from the data's shape, the task,
and, optionally, the settings `--model-args` gives, the units FSDP shards and activation checkpointing
recomputes, and a FLOP count for the MFU figure (see docs/own-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raytrain_app import DataShape, ModelSpec


@dataclass(frozen=True)
class ConvArgs:
    """The model's own settings (--model-args channels=64,num_blocks=4,kernel_size=5)."""

    channels: int = 32
    num_blocks: int = 2
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred window keeps the length), got {self.kernel_size}")


class ConvBlock(nn.Module):
    """A residual block: norm, activation, a convolution along time, dropout."""

    def __init__(self, channels: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)  # no running statistics: nothing to keep in step across workers
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(self.conv(self.act(self.norm(h))))


class ConvClassifier(nn.Module):
    """x [B, T, F] -> logits [B, C] (one class per sequence, mean over time) or [B, T, C] (one per step)."""

    def __init__(self, shape: DataShape, args: ConvArgs, dropout: float) -> None:
        super().__init__()
        _, num_features = shape.input_shape
        self.per_step = shape.per_step
        self.input = nn.Conv1d(num_features, args.channels, 1)
        self.blocks = nn.ModuleList(ConvBlock(args.channels, args.kernel_size, dropout)
                                    for _ in range(args.num_blocks))
        self.head = nn.Linear(args.channels, shape.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x.transpose(1, 2))  # convolutions want [B, channels, T]
        for block in self.blocks:
            h = block(h)
        h = h.transpose(1, 2)
        return self.head(h if self.per_step else h.mean(dim=1))


def build(shape: DataShape, args: ConvArgs, dropout: float) -> ConvClassifier:
    if len(shape.input_shape) != 2:
        raise ValueError(f"reads sequences [T, F], got inputs of shape {list(shape.input_shape)}")
    return ConvClassifier(shape, args, dropout)


def flops_per_sample(shape: DataShape, args: ConvArgs) -> float:
    """Training FLOPs of one sequence: 6 per weight and time step (forward and backward), convolutions included."""
    seq_len, num_features = shape.input_shape
    c = args.channels
    per_step = num_features * c + args.num_blocks * c * c * args.kernel_size + c * shape.num_classes
    return 6.0 * per_step * seq_len


spec = ModelSpec(build=build, task="classification", args=ConvArgs,
                 shard_units=lambda model: model.blocks,  # each block its own FSDP unit
                 flops_per_sample=flops_per_sample)
