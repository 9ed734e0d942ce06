"""A dataset in memory or streamed: its splits, shapes and the one error type of data problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raytrain_app.datasets.order import RowSource


class DataError(ValueError):
    """The dataset file is missing, unsafe or malformed; the message names the file and the field."""


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, T, F]
    y: torch.Tensor  # int64 [N] or [N, T]

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
    train and val only; `test`, when the dataset has one, is for `python -m raytrain_app.evaluate`."""

    train: RowSource
    val: RowSource
    num_classes: int
    seq_len: int
    feature_dim: int
    per_step: bool
    num_classes_given: bool = False  # False: inferred as max label + 1
    uri: str = ""  # where it was read from, canonical (what workers are given)
    test: RowSource | None = None

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

