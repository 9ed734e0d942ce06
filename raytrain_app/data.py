"""Datasets in the "new format": load safely, validate, shard per worker, and write synthetic ones.

Format: a pickled dict {"train": {"x": X, "y": Y}, "val": {"x": X, "y": Y}, "num_classes": C (optional)} with
X float [N, T, F] and Y int [N] (one class per sequence) or [N, T] (one class per step), numpy or torch.

Order and sharding are pure functions: the epoch's permutation depends only on (seed, epoch) and a worker's
shard only on (rank, world size), so a resumed run sees exactly the batches the uninterrupted one would.

    python -m raytrain_app.data synth --out data/demo.pkl
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import io
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import torch

from raytrain_app.order import RowSource, seeded_generator
from raytrain_app.storage import Location, StorageError, check_bucket, parse_location


class DataError(ValueError):
    """The dataset file is missing, unsafe or malformed; the message names the file and the field."""


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

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
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
    """Two splits (in memory or streamed from Parquet) and the shapes the model is built for."""

    train: RowSource
    val: RowSource
    num_classes: int
    seq_len: int
    feature_dim: int
    per_step: bool
    num_classes_given: bool = False  # False: inferred as max label + 1
    uri: str = ""  # where it was read from, canonical (what workers are given)


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
    unknown = sorted(set(raw) - {"train", "val", "num_classes"})
    if "train" not in raw or unknown:
        raise DataError(
            f"--data {path} must hold keys 'train', optional 'val' and 'num_classes'; got {sorted(raw)}"
        )
    train = _validate_split(raw["train"], "train")
    if "val" in raw:
        val = _validate_split(raw["val"], "val")
    else:
        train, val = hold_out(train, val_fraction, seed)
    if val.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"val.x is [N, {', '.join(map(str, val.x.shape[1:]))}] but train.x is "
                        f"[N, {', '.join(map(str, train.x.shape[1:]))}]")
    if val.y.dim() != train.y.dim():
        raise DataError(f"val.y has {val.y.dim()} dims but train.y has {train.y.dim()}")
    labels_max = int(max(train.y.max(), val.y.max()))
    labels_min = int(min(train.y.min(), val.y.min()))
    num_classes, given = check_num_classes(raw.get("num_classes"), labels_min, labels_max)
    return Dataset(train=train, val=val, num_classes=num_classes, num_classes_given=given,
                   seq_len=train.x.shape[1], feature_dim=train.x.shape[2], per_step=train.y.dim() == 2, uri=uri)


def check_num_classes(given: object, labels_min: int, labels_max: int) -> tuple[int, bool]:
    """The class count (stated, or max label + 1) and whether it was stated; labels must lie in [0, C)."""
    if given is not None and (not isinstance(given, (int, np.integer)) or int(given) < 2):
        raise DataError(f"num_classes must be an integer >= 2, got {given!r}")
    num_classes = int(given) if given is not None else max(labels_max + 1, 2)
    if labels_min < 0 or labels_max >= num_classes:
        raise DataError(f"labels must be in [0, {num_classes}), found values from {labels_min} to {labels_max}")
    return num_classes, given is not None


def open_dataset(path: str, *, val_fraction: float = 0.1, seed: int = 0, check_labels: bool = True) -> Dataset:
    """A pickle is loaded into memory; Parquet (a file, a folder, or a URI to either) is streamed.
    `check_labels=False` skips scanning a Parquet label column (workers: the driver already did)."""
    from raytrain_app.parquet import is_parquet, open_parquet_dataset

    location = parse_location(path, flag="--data")
    check_bucket(location)
    if is_parquet(location):
        return open_parquet_dataset(location, val_fraction=val_fraction, label=path, check_labels=check_labels)
    return _load_pickle(location, path, val_fraction=val_fraction, seed=seed)


# --- augmentation -------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, noise_std: float, *, seed: int, epoch: int, rank: int, batch_index: int) -> torch.Tensor:
    """Gaussian feature noise from a generator keyed by the batch's position, so resume reproduces it."""
    if noise_std == 0.0:
        return x
    g = seeded_generator(seed, epoch, rank, batch_index)
    return x + noise_std * torch.randn(x.shape, generator=g, dtype=x.dtype)


# --- synthetic data -----------------------------------------------------------------------------------------

def make_synthetic(
    *, num_train: int, num_val: int, seq_len: int, feature_dim: int, num_classes: int, per_step: bool, seed: int
) -> dict:
    """Features ~ N(0, 1); labels are the argmax of a fixed random linear map of (running) feature means,
    so a model can learn them: the loss falls well below chance (ln C)."""
    g = torch.Generator().manual_seed(seed)
    n = num_train + num_val
    x = torch.randn(n, seq_len, feature_dim, generator=g)
    w = torch.randn(feature_dim, num_classes, generator=g)
    if per_step:
        running = x.cumsum(1) / torch.arange(1, seq_len + 1).view(1, -1, 1)
        y = (running @ w).argmax(-1)
    else:
        y = (x.mean(1) @ w).argmax(-1)
    split = lambda a, b: {"x": x[a:b].numpy(), "y": y[a:b].numpy()}  # noqa: E731
    return {"train": split(0, num_train), "val": split(num_train, n), "num_classes": num_classes}


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


def _add_size_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--per-step", action="store_true", help="One class per step ([N, T] labels).")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_app.data")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="Write a synthetic, learnable dataset.")
    synth.add_argument("--out", required=True, help="Output: a .pkl file, or a folder / URI for Parquet.")
    synth.add_argument("--format", choices=("pickle", "parquet"), default="pickle")
    _add_size_flags(synth)
    convert = sub.add_parser("convert", help="Convert a dataset pickle to Parquet (OUT/train.parquet, val.parquet).")
    convert.add_argument("source", help="The dataset .pkl (local path or URI).")
    convert.add_argument("out", help="Output folder or URI.")
    convert.add_argument("--val-fraction", type=float, default=0.1,
                         help="Held out when the pickle has no 'val' (the same rows training would hold out).")
    convert.add_argument("--seed", type=int, default=0, help="The seed training will use (for the held-out rows).")
    args = parser.parse_args(argv)
    try:
        return _synth(parser, args) if args.command == "synth" else _convert(args)
    except (DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _synth(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for name in ("num_train", "num_val", "seq_len", "feature_dim"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.num_classes < 2:
        parser.error("--num-classes must be at least 2")
    data = make_synthetic(
        num_train=args.num_train, num_val=args.num_val, seq_len=args.seq_len, feature_dim=args.feature_dim,
        num_classes=args.num_classes, per_step=args.per_step, seed=args.seed,
    )
    if args.format == "parquet":
        from raytrain_app.parquet import write_parquet_dataset

        write_parquet_dataset(args.out, (data["train"]["x"], data["train"]["y"]),
                              (data["val"]["x"], data["val"]["y"]), data["num_classes"])
    else:
        write_pickle_atomic(data, args.out)
    print(f"Wrote {args.out}: train {args.num_train} x [{args.seq_len}, {args.feature_dim}], "
          f"val {args.num_val}, {args.num_classes} classes, {'per-step' if args.per_step else 'per-sequence'} labels")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from raytrain_app.parquet import write_parquet_dataset

    ds = load_dataset(args.source, val_fraction=args.val_fraction, seed=args.seed)
    train, val = ds.train, ds.val
    assert isinstance(train, Split) and isinstance(val, Split)
    out = write_parquet_dataset(args.out, (train.x.numpy(), train.y.numpy()), (val.x.numpy(), val.y.numpy()),
                                ds.num_classes if ds.num_classes_given else None)
    print(f"Wrote {out}: train {train.num_rows} rows, val {val.num_rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
