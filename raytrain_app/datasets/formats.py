"""Datasets in the "new format": load safely, validate, shard per worker, and write synthetic ones.

Format: a pickled dict {"train": {"x": X, "y": Y}, "val": {"x": X, "y": Y}, "test": {...}, "num_classes": C}
(val, test and num_classes optional) with X float [N, T, F] and Y int [N] (one class per sequence) or [N, T] (one
class per step), numpy or torch. Training never reads test: it is for scoring a trained model.

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

from raytrain_app.datasets.dataset import DataError, Dataset, Split, check_num_classes
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
    if x.dim() != 3:
        raise DataError(f"{name}.x must be [N, T, F], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{name}.x must be a float array, got dtype {x.dtype}")
    if y.dim() not in (1, 2):
        raise DataError(f"{name}.y must be [N] or [N, T], got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{name}.y must be an integer array, got dtype {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{name}.y has {y.shape[0]} rows but {name}.x has {x.shape[0]}")
    if y.dim() == 2 and y.shape[1] != x.shape[1]:
        raise DataError(f"{name}.y is [N, T] with T={y.shape[1]} but {name}.x has T={x.shape[1]}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 sequences)")
    if not torch.isfinite(x).all():
        raise DataError(f"{name}.x contains NaN or inf values")
    return Split(x=x.to(torch.float32), y=y.to(torch.int64))


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
    labels_max = int(max(train.y.max(), val.y.max()))
    labels_min = int(min(train.y.min(), val.y.min()))
    num_classes, given = check_num_classes(raw.get("num_classes"), labels_min, labels_max)
    # The test split's labels are not part of the class count: training never reads them (evaluate checks them).
    return Dataset(train=train, val=val, num_classes=num_classes, num_classes_given=given,
                   seq_len=train.x.shape[1], feature_dim=train.x.shape[2], per_step=train.y.dim() == 2, uri=uri,
                   test=test)


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
    *, num_train: int, num_val: int, seq_len: int, feature_dim: int, num_classes: int, per_step: bool, seed: int,
    num_test: int = 0,
) -> dict:
    """Features ~ N(0, 1); labels are the argmax of a fixed random linear map of (running) feature means,
    so a model can learn them: the loss falls well below chance (ln C). A test split (`num_test`) is drawn after
    the others, so train and val are the same with or without it."""
    g = torch.Generator().manual_seed(seed)
    n = num_train + num_val
    x = torch.randn(n, seq_len, feature_dim, generator=g)
    w = torch.randn(feature_dim, num_classes, generator=g)

    def labels(x: torch.Tensor) -> torch.Tensor:
        if per_step:
            running = x.cumsum(1) / torch.arange(1, seq_len + 1).view(1, -1, 1)
            return (running @ w).argmax(-1)
        return (x.mean(1) @ w).argmax(-1)

    y = labels(x)
    split = lambda a, b: {"x": x[a:b].numpy(), "y": y[a:b].numpy()}  # noqa: E731
    data = {"train": split(0, num_train), "val": split(num_train, n), "num_classes": num_classes}
    if num_test:
        x_test = torch.randn(num_test, seq_len, feature_dim, generator=g)
        data["test"] = {"x": x_test.numpy(), "y": labels(x_test).numpy()}
    return data


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

