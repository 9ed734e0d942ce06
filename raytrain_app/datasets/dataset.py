"""A dataset in memory or streamed: its splits, shapes and the one error type of data problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raytrain_app.datasets.order import RowSource


class DataError(ValueError):
    """The dataset file is missing, unsafe or malformed; the message names the file and the field."""


CLASSIFICATION, REGRESSION = "classification", "regression"  # the same words as core.model_spec's tasks
TASKS = (CLASSIFICATION, REGRESSION)


def sequence_length(input_shape: tuple[int, ...]) -> int:
    """The steps of a sample of this input shape: its first axis for a sequence ([T, F] or more axes), 1 for a
    row of features ([F])."""
    return input_shape[0] if len(input_shape) >= 2 else 1


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, ...]: [N, F] rows, [N, T, F] sequences, [N, A, B, F] ...
    y: torch.Tensor  # int64 classes (classification) or float32 targets (regression): [N] or [N, T] (per step)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    def read_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.y[start:stop]


@dataclass
class Dataset:
    """The splits (in memory or streamed from Parquet) and the shapes the model is built for. Training reads
    train and val only; `test`, when the dataset has one, is for `python -m raytrain_app.evaluate`.

    `input_shape` is one sample's x after N; `seq_len` and `feature_dim` are derived from it (feature_dim its last
    axis, seq_len its first for a sequence, 1 for a row of features). Given without `input_shape` (as callers
    written before it did), `seq_len` and `feature_dim` define it as (seq_len, feature_dim)."""

    train: RowSource
    val: RowSource
    num_classes: int  # 0 for regression
    seq_len: int = 0
    feature_dim: int = 0
    per_step: bool = False  # targets [N, T], one per step, rather than [N]
    num_classes_given: bool = False  # False: inferred as max label + 1
    uri: str = ""  # where it was read from, canonical (what workers are given)
    test: RowSource | None = None
    input_shape: tuple[int, ...] = ()
    task: str = CLASSIFICATION  # integer labels; REGRESSION: float targets

    def __post_init__(self) -> None:
        if not self.input_shape:
            if self.seq_len <= 0 or self.feature_dim <= 0:
                raise ValueError("Dataset needs input_shape, or seq_len and feature_dim")
            self.input_shape = (self.seq_len, self.feature_dim)
        self.input_shape = tuple(int(d) for d in self.input_shape)
        self.seq_len, self.feature_dim = sequence_length(self.input_shape), self.input_shape[-1]
        if self.task not in TASKS:
            raise ValueError(f"Dataset.task must be {' or '.join(TASKS)}, got {self.task!r}")

    def split(self, name: str) -> RowSource:
        """The split called `name` (train, val or test); DataError when the dataset has no such split."""
        source = getattr(self, name) if name in SPLITS else None
        if source is None:
            raise DataError(f"{self.uri or 'the dataset'} has no {name} split" + (
                " (a pickle's 'test' key, or test.parquet / test/ beside train)" if name == "test" else ""))
        return source


SPLITS = ("train", "val", "test")


def check_num_classes(given: object, labels_min: int, labels_max: int) -> tuple[int, bool]:
    """The class count (stated, or max label + 1) and whether it was stated; labels must lie in [0, C)."""
    if given is not None and (not isinstance(given, (int, np.integer)) or int(given) < 2):
        raise DataError(f"num_classes must be an integer >= 2, got {given!r}")
    num_classes = int(given) if given is not None else max(labels_max + 1, 2)
    if labels_min < 0 or labels_max >= num_classes:
        raise DataError(f"labels must be in [0, {num_classes}), found values from {labels_min} to {labels_max}")
    return num_classes, given is not None


def refuse_num_classes_for_regression(given: object, where: str) -> None:
    """Float targets are regression: a stated class count means the file's y is not what its writer meant."""
    if given is not None:
        raise DataError(f"{where} states num_classes {given!r}, but its y is float (regression targets): "
                        "num_classes is only meaningful for integer labels; drop it, or give integer labels")

