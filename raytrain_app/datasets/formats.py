"""Datasets in the "new format": load safely, validate, shard per worker, and write synthetic ones.

Format: a pickled dict {"train": {"x": X, "y": Y}, "val": {"x": X, "y": Y}, "test": {...}, "num_classes": C}
(val, test and num_classes optional), numpy or torch. X: floats of any fixed shape with at least one axis after N
([N, F] rows, [N, T, F] sequences, [N, A, B, F] ...). Y: integers (classification: [N] a class per sample, or
[N, T] a class per step of a sequence) or floats (regression: [N] or [N, T], finite; no num_classes). Training
never reads test: it is for scoring a trained model.

Order and sharding are pure functions: the epoch's permutation depends only on (seed, epoch) and a worker's
shard only on (rank, world size), so a resumed run sees exactly the batches the uninterrupted one would.

    python -m raytrain_app.data synth --out data/demo.pkl
"""

from __future__ import annotations

import builtins
import codecs
import collections
import io
import os
import pickle
import tempfile

import numpy as np
import pyarrow.fs as pafs
import torch

from raytrain_app.datasets.dataset import (
    CLASSIFICATION,
    REGRESSION,
    DataError,
    Dataset,
    Split,
    check_num_classes,
    refuse_num_classes_for_regression,
)
from raytrain_app.storage.location import Location, check_bucket, parse_location


def _load_tensor_bytes(b: bytes) -> torch.Tensor:
    # torch's own pickle hook calls torch.load(weights_only=False); this one cannot run code.
    return torch.load(io.BytesIO(b), weights_only=True)


# Everything a pickle of arrays in plain containers needs, and nothing that can run arbitrary code.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("_codecs", "encode"): codecs.encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): builtins.dict,
    ("builtins", "list"): builtins.list,
    ("builtins", "tuple"): builtins.tuple,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_tensor_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only arrays, dtypes and plain containers: loading a dataset never executes code from it."""

    def find_class(self, module: str, name: str):  # pickle's signature
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {module}.{name}: the dataset may only contain arrays, dtypes and "
                "plain containers (dict, list, tuple)"
            ) from None


def safe_unpickle(raw: bytes, source: str) -> object:
    try:
        return RestrictedUnpickler(io.BytesIO(raw)).load()
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not a dataset pickle"
        raise DataError(f"{source} is not a readable pickle ({type(e).__name__}: {e})") from None


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{name} must be a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DataError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def _validate_split(raw: object, name: str) -> Split:
    if not isinstance(raw, dict) or set(raw) != {"x", "y"}:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{name} must be a dict with keys 'x' and 'y', got {keys}")
    x = _as_tensor(raw["x"], f"{name}.x")
    y = _as_tensor(raw["y"], f"{name}.y")
    if x.dim() < 2:
        raise DataError(f"{name}.x must be [N, ...] with at least one axis after N ([N, F] rows, [N, T, F] "
                        f"sequences), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{name}.x must be a float array, got dtype {x.dtype}")
    if y.dim() not in (1, 2):
        raise DataError(f"{name}.y must be [N] or [N, T], got shape {tuple(y.shape)}")
    if y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{name}.y must be an integer array (classes) or a float array (regression targets), "
                        f"got dtype {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{name}.y has {y.shape[0]} rows but {name}.x has {x.shape[0]}")
    if y.dim() == 2 and x.dim() < 3:
        raise DataError(f"{name}.y is [N, T] (a target per step) but {name}.x is {list(x.shape)}, rows without "
                        f"steps: give y as [N], or x as [N, T, F]")
    if y.dim() == 2 and y.shape[1] != x.shape[1]:
        raise DataError(f"{name}.y is [N, T] with T={y.shape[1]} but {name}.x has T={x.shape[1]}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 sequences)")
    if not torch.isfinite(x).all():
        raise DataError(f"{name}.x contains NaN or inf values")
    if y.is_floating_point():
        y = y.to(torch.float32)
        if not torch.isfinite(y).all():
            raise DataError(f"{name}.y contains NaN or inf values (regression targets, in float32, must be finite)")
        return Split(x=x.to(torch.float32), y=y)
    return Split(x=x.to(torch.float32), y=y.to(torch.int64))


def _y_kind(split: Split) -> str:
    return "float targets" if split.y.is_floating_point() else "integer labels"


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a seeded `fraction` of train off as validation (the same rows for the same seed)."""
    n = len(train)
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 1:
        raise DataError(f"train has only {n} sequences: too few to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def load_dataset(path: str, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load a dataset pickle from a local path or URI into memory, validated."""
    location = parse_location(path, flag="--data")
    check_bucket(location)
    return _load_pickle(location, path, val_fraction=val_fraction, seed=seed)


def _load_pickle(location: Location, path: str, *, val_fraction: float, seed: int) -> Dataset:
    info = location.info()
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"--data file not found: {path}")
    if info.type == pafs.FileType.Directory:
        raise DataError(f"--data {path} is a folder without Parquet files; pass a dataset .pkl or Parquet data")
    raw = safe_unpickle(location.read_bytes(), f"--data {path}")
    try:
        return _dataset_from_dict(raw, path, val_fraction=val_fraction, seed=seed, uri=location.uri)
    except DataError as e:
        if path in str(e):
            raise
        raise DataError(f"--data {path}: {e}") from None


def dataset_from_arrays(raw: dict, label: str, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A dataset held as the pickle format's dict of arrays, checked as `--data` is (DataError naming `label`)."""
    try:
        return _dataset_from_dict(raw, label, val_fraction=val_fraction, seed=seed, uri=label)
    except DataError as e:
        raise DataError(f"{label}: {e}") from None


def _dataset_from_dict(raw: object, path: str, *, val_fraction: float, seed: int, uri: str) -> Dataset:
    if not isinstance(raw, dict):
        raise DataError(f"--data {path} must hold a dict with 'train' (and optionally 'val'), got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"train", "val", "test", "num_classes"})
    if "train" not in raw or unknown:
        raise DataError(
            f"--data {path} must hold keys 'train', optional 'val', 'test' and 'num_classes'; got {sorted(raw)}"
        )
    train = _validate_split(raw["train"], "train")
    if "val" in raw:
        val = _validate_split(raw["val"], "val")
    else:
        train, val = hold_out(train, val_fraction, seed)
    test = _validate_split(raw["test"], "test") if "test" in raw else None
    for name, split in (("val", val), ("test", test)):
        if split is None:
            continue
        if split.x.shape[1:] != train.x.shape[1:]:
            raise DataError(f"{name}.x is [N, {', '.join(map(str, split.x.shape[1:]))}] but train.x is "
                            f"[N, {', '.join(map(str, train.x.shape[1:]))}]")
        if split.y.dim() != train.y.dim():
            raise DataError(f"{name}.y has {split.y.dim()} dims but train.y has {train.y.dim()}")
        if split.y.is_floating_point() != train.y.is_floating_point():
            raise DataError(f"{name}.y holds {_y_kind(split)} but train.y holds {_y_kind(train)}: every split needs "
                            "integer labels (classification) or every split float targets (regression)")
    if train.y.is_floating_point():
        refuse_num_classes_for_regression(raw.get("num_classes"), "the dataset")
        task, num_classes, given = REGRESSION, 0, False
    else:
        labels_max = int(max(train.y.max(), val.y.max()))
        labels_min = int(min(train.y.min(), val.y.min()))
        task, (num_classes, given) = CLASSIFICATION, check_num_classes(raw.get("num_classes"), labels_min, labels_max)
    # The test split's labels are not part of the class count: training never reads them (evaluate checks them).
    return Dataset(train=train, val=val, num_classes=num_classes, num_classes_given=given,
                   input_shape=tuple(train.x.shape[1:]), per_step=train.y.dim() == 2, uri=uri, test=test, task=task)


def open_dataset(path: str, *, val_fraction: float = 0.1, seed: int = 0, check_labels: bool = True) -> Dataset:
    """A pickle is loaded into memory; Parquet (a file, a folder, or a URI to either) is streamed.
    `check_labels=False` skips scanning a Parquet label column (workers: the driver already did)."""
    from raytrain_app.datasets.parquet import is_parquet, open_parquet_dataset

    location = parse_location(path, flag="--data")
    check_bucket(location)
    if is_parquet(location):
        return open_parquet_dataset(location, val_fraction=val_fraction, label=path, check_labels=check_labels)
    return _load_pickle(location, path, val_fraction=val_fraction, seed=seed)


def make_synthetic(
    *, num_train: int, num_val: int, seq_len: int = 0, feature_dim: int = 0, num_classes: int = 0, per_step: bool,
    seed: int, num_test: int = 0, task: str = CLASSIFICATION, input_shape: tuple[int, ...] | None = None,
) -> dict:
    """Features ~ N(0, 1) of `input_shape` (default (seq_len, feature_dim)) and targets a fixed random linear map
    of their (running) feature means, so a model can learn them. Classification: the argmax over `num_classes`
    (the loss falls well below chance, ln C). Regression: one float32 value, plus small seeded noise (the loss
    falls well below the variance of y). A test split (`num_test`) is drawn after the others, so train and val
    are the same with or without it."""
    shape = tuple(input_shape) if input_shape is not None else (seq_len, feature_dim)
    if task not in (CLASSIFICATION, REGRESSION) or (task == CLASSIFICATION and num_classes < 2):
        raise ValueError(f"task must be {CLASSIFICATION} (with num_classes >= 2) or {REGRESSION}, got {task!r} with "
                         f"num_classes {num_classes}")
    if per_step and len(shape) < 2:
        raise ValueError(f"per-step targets need sequences (an input shape of 2 or more axes), got {list(shape)}")
    g = torch.Generator().manual_seed(seed)
    n = num_train + num_val
    x = torch.randn(n, *shape, generator=g)
    regression = task == REGRESSION
    # Scaled so that y has a variance of about 1/T (the variance of a mean over T steps) whatever F is.
    w = torch.randn(shape[-1], generator=g) / shape[-1] ** 0.5 if regression else \
        torch.randn(shape[-1], num_classes, generator=g)

    def means(x: torch.Tensor) -> torch.Tensor:
        """Per step, the running mean over steps ([N, T, F]); else the mean over all axes but N and F ([N, F])."""
        if per_step:
            steps = x.shape[1]
            x = x.cumsum(1) / torch.arange(1, steps + 1).view(1, -1, *[1] * (x.dim() - 2))
            return x.mean(dim=tuple(range(2, x.dim() - 1))) if x.dim() > 3 else x
        return x.mean(dim=tuple(range(1, x.dim() - 1))) if x.dim() > 2 else x

    def targets(x: torch.Tensor) -> torch.Tensor:
        if not regression:
            return (means(x) @ w).argmax(-1)
        signal = means(x) @ w
        return signal + REGRESSION_NOISE_STD * torch.randn(signal.shape, generator=g)

    y = targets(x)
    split = lambda a, b: {"x": x[a:b].numpy(), "y": y[a:b].numpy()}  # noqa: E731
    data = {"train": split(0, num_train), "val": split(num_train, n)}
    if not regression:
        data["num_classes"] = num_classes
    if num_test:
        x_test = torch.randn(num_test, *shape, generator=g)
        data["test"] = {"x": x_test.numpy(), "y": targets(x_test).numpy()}
    return data


# Small against the signal's variance (about 1/T, 1/16 with the default 16 steps; 1 for rows), so the fit is good
REGRESSION_NOISE_STD = 0.05


def write_pickle_atomic(obj: object, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=4)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

