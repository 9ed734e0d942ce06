"""Parquet datasets: streamed per worker with bounded memory, in the same order as in-memory data.

Layout (local or on object storage):
  DATA/train.parquet or DATA/train/*.parquet   training rows
  DATA/val.parquet   or DATA/val/*.parquet     validation rows (optional)
  DATA/test.parquet  or DATA/test/*.parquet    test rows (optional; never read by training)
or a single Parquet file / a folder of Parquet files: all rows are training rows, and the last --val-fraction of
them is held out for validation (write rows shuffled, or give a val split).

Schema: `x` fixed_size_list<float32>[prod(input_shape)] (one sample, row-major); `y` int64 (a class per sample)
or fixed_size_list<int64>[T] (a class per step), or for regression float32/float64 or fixed_size_list<float>[T].
Schema metadata: `input_shape` (a JSON list: [F] rows, [T, F] sequences, ...), optional `num_classes` (integer y
only). Files written before `input_shape` have `seq_len` and `feature_dim` instead, read as [seq_len, feature_dim];
the writer still writes those two beside it for a [T, F] input shape.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raytrain_app.datasets.dataset import (
    CLASSIFICATION,
    REGRESSION,
    DataError,
    Dataset,
    check_num_classes,
    refuse_num_classes_for_regression,
)
from raytrain_app.datasets.order import ORDER_BLOCK_ROWS
from raytrain_app.storage.location import Location, parse_location

SUFFIXES = (".parquet", ".pq")


def _parquet_files(location: Location) -> list[Location]:
    info = location.info()
    if info.type == pafs.FileType.File:
        return [location] if location.path.endswith(SUFFIXES) else []
    if info.type == pafs.FileType.Directory:
        return [location.join(e.base_name) for e in location.list()
                if e.type == pafs.FileType.File and e.base_name.endswith(SUFFIXES)]
    return []


def _split_files(location: Location, name: str) -> list[Location]:
    for candidate in (location.join(f"{name}{suffix}") for suffix in SUFFIXES):
        if candidate.is_file():
            return [candidate]
    folder = location.join(name)
    return _parquet_files(folder) if folder.is_dir() else []


def is_parquet(location: Location) -> bool:
    """True for a .parquet file, or a folder holding Parquet files or train/val splits of them."""
    info = location.info()
    if info.type == pafs.FileType.File:
        return location.path.endswith(SUFFIXES)
    if info.type == pafs.FileType.Directory:
        return bool(_parquet_files(location) or _split_files(location, "train"))
    return False


@dataclass
class _Shape:
    input_shape: tuple[int, ...]
    per_step: bool
    num_classes: object  # as stated in the metadata, or None
    task: str = CLASSIFICATION  # REGRESSION: y is float

    @property
    def size(self) -> int:
        return math.prod(self.input_shape)


def _input_shape(meta: dict[str, str], label: str) -> tuple[int, ...]:
    """`input_shape` from the schema metadata, or [seq_len, feature_dim] (files written before it)."""
    if "input_shape" not in meta:
        try:
            return int(meta["seq_len"]), int(meta["feature_dim"])
        except (KeyError, ValueError):
            raise DataError(f"{label} needs 'input_shape' (a JSON list such as [8, 4]), or integer 'seq_len' and "
                            "'feature_dim', in its schema metadata") from None
    try:
        shape = json.loads(meta["input_shape"])
    except ValueError:
        shape = None
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise DataError(f"{label}: schema metadata input_shape must be a JSON list of positive integers such as "
                        f"[8, 4] or [6], got {meta['input_shape']!r}")
    return tuple(shape)


def _shape_of(schema: pa.Schema, label: str) -> _Shape:
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if "x" not in schema.names or "y" not in schema.names:
        raise DataError(f"{label} must have columns 'x' and 'y', got {schema.names}")
    input_shape = _input_shape(meta, label)
    size = math.prod(input_shape)
    x_type, y_type = schema.field("x").type, schema.field("y").type
    if not (pa.types.is_fixed_size_list(x_type) and pa.types.is_floating(x_type.value_type)
            and x_type.list_size == size):
        what = "T*F" if len(input_shape) == 2 else f"input_shape {list(input_shape)}"
        raise DataError(f"{label}: x must be fixed_size_list<float>[{size}] ({what}), got {x_type}")
    per_step = pa.types.is_fixed_size_list(y_type)
    y_value = y_type.value_type if per_step else y_type
    if per_step and len(input_shape) < 2:
        raise DataError(f"{label}: y is a list a row ({y_type}, a target per step) but x rows (input_shape "
                        f"{list(input_shape)}) have no steps: give y one value a row")
    if not (pa.types.is_integer(y_value) or pa.types.is_floating(y_value)) or (
            per_step and y_type.list_size != input_shape[0]):
        raise DataError(f"{label}: y must be int64 or float (a target per sample) or fixed_size_list<int64 or "
                        f"float>[{input_shape[0] if len(input_shape) >= 2 else 'T'}] (per step), got {y_type}")
    task = REGRESSION if pa.types.is_floating(y_value) else CLASSIFICATION
    num_classes = int(meta["num_classes"]) if "num_classes" in meta else None
    if task == REGRESSION:
        refuse_num_classes_for_regression(num_classes, label)
    return _Shape(input_shape, per_step, num_classes, task)


class ParquetSplit:
    """Rows of one split across Parquet files, read by range one row group at a time (a RowSource)."""

    def __init__(self, files: list[Location], shape: _Shape, label: str):
        self.files, self.shape, self.label = files, shape, label
        self._groups: list[tuple[int, int]] = []  # (file index, row group) in global row order
        starts = [0]
        self._handles: dict[int, pq.ParquetFile] = {}
        for i, _ in enumerate(files):
            metadata = self._handle(i).metadata
            for g in range(metadata.num_row_groups):
                self._groups.append((i, g))
                starts.append(starts[-1] + metadata.row_group(g).num_rows)
        self._starts = starts
        self._offset, self._num_rows = 0, starts[-1]
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None  # the last row group decoded

    def _handle(self, i: int) -> pq.ParquetFile:
        if i not in self._handles:
            location = self.files[i]
            self._handles[i] = pq.ParquetFile(location.fs.open_input_file(location.path))
        return self._handles[i]

    def rows(self, start: int, stop: int) -> ParquetSplit:
        """A view of rows [start, stop) sharing this split's row-group index, with its own open files and cache
        (a view may be read on another thread than its parent)."""
        view = copy.copy(self)
        view._offset, view._num_rows = self._offset + start, stop - start
        view._handles, view._cache = {}, None
        return view

    @property
    def num_rows(self) -> int:
        return self._num_rows

    def _row_group(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != k:
            file_index, group = self._groups[k]
            table = self._handle(file_index).read_row_group(group, columns=["x", "y"])
            self._cache = (k, *self._to_tensors(table))
        return self._cache[1], self._cache[2]

    def _to_tensors(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        x = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        # A copy: Arrow's buffers are read-only, and a row group is small.
        x = torch.from_numpy(np.array(x, dtype=np.float32).reshape(-1, *s.input_shape))
        y_dtype = np.float32 if s.task == REGRESSION else np.int64
        y = torch.from_numpy(np.array(self._labels(table.column("y").combine_chunks()), dtype=y_dtype))
        return x, y.reshape((-1, s.input_shape[0]) if s.per_step else (-1,))

    def _labels(self, y: pa.Array) -> np.ndarray:
        """The label values of a y column, flat (per-step lists are flattened)."""
        return (y.flatten() if self.shape.per_step else y).to_numpy(zero_copy_only=False)

    def read_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = start + self._offset, stop + self._offset
        xs, ys = [], []
        k = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            x, y = self._row_group(k)
            lo, hi = start - self._starts[k], min(stop, self._starts[k + 1]) - self._starts[k]
            xs.append(x[lo:hi])
            ys.append(y[lo:hi])
            start, k = self._starts[k] + hi, k + 1
        return (torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else (xs[0], ys[0])

    def label_range(self) -> tuple[int, int]:
        """(min, max) label, reading only the y column one row group at a time. Float targets (regression) are
        checked finite instead, and give (0, 0)."""
        lo, hi = None, None
        first, last = self._offset, self._offset + self._num_rows
        for k, (file_index, group) in enumerate(self._groups):
            a, b = max(first, self._starts[k]), min(last, self._starts[k + 1])  # this split's rows in group k
            if a >= b:
                continue
            y = self._handle(file_index).read_row_group(group, columns=["y"]).column("y").combine_chunks()
            values = self._labels(y.slice(a - self._starts[k], b - a))
            if self.shape.task == REGRESSION:
                if not np.isfinite(np.asarray(values, dtype=np.float32)).all():  # as read: in float32
                    raise DataError(f"--data {self.files[file_index]}: y contains NaN or inf values (row group "
                                    f"{group}); regression targets must be finite")
                continue
            lo = int(values.min()) if lo is None else min(lo, int(values.min()))
            hi = int(values.max()) if hi is None else max(hi, int(values.max()))
        return (lo, hi) if lo is not None else (0, 0)


def open_parquet_dataset(location: Location, *, val_fraction: float, label: str, check_labels: bool = True) -> Dataset:
    """Open (not read) a Parquet dataset: schemas and row counts are checked up front, and with `check_labels`
    the label range too (a scan of the y column: the driver does it once, workers skip it)."""
    train_files = _split_files(location, "train")
    if train_files:
        val_files, test_files = _split_files(location, "val"), _split_files(location, "test")
    else:
        train_files, val_files, test_files = _parquet_files(location), [], []
    if not train_files:
        raise DataError(f"--data {label} holds no Parquet files")
    shapes = []
    for f in train_files + val_files + test_files:
        try:
            schema = pq.read_schema(f.fs.open_input_file(f.path))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"--data {f}: not a readable Parquet file ({' '.join(str(e).split())[:160]})") from None
        shapes.append(_shape_of(schema, f"--data {f}"))
    shape = shapes[0]
    if any((s.input_shape, s.per_step, s.task) != (shape.input_shape, shape.per_step, shape.task) for s in shapes):
        raise DataError(f"--data {label}: files disagree on the input shape (seq_len, feature_dim) or the kind of y "
                        "(integer or float, per sample or per step)")
    train = ParquetSplit(train_files, shape, label)
    if val_files:
        val = ParquetSplit(val_files, shape, label)
    else:  # hold out the last rows: a streamed split cannot pick random rows without reading them all
        n = train.num_rows
        n_val = max(1, int(round(n * val_fraction)))
        if n - n_val < 1:
            raise DataError(f"--data {label} has only {n} rows: too few to hold out a validation split")
        train, val = train.rows(0, n - n_val), train.rows(n - n_val, n)
    if train.num_rows == 0 or val.num_rows == 0:
        raise DataError(f"--data {label}: the {'train' if train.num_rows == 0 else 'val'} split is empty")
    if check_labels:
        (lo_t, hi_t), (lo_v, hi_v) = train.label_range(), val.label_range()
    if shape.task == REGRESSION:
        num_classes, given = 0, False
    elif check_labels:
        num_classes, given = check_num_classes(shape.num_classes, min(lo_t, lo_v), max(hi_t, hi_v))
    else:  # the driver checked them and put the class count into the config
        num_classes, given = shape.num_classes or 0, shape.num_classes is not None
    return Dataset(train=train, val=val, num_classes=num_classes, num_classes_given=given,
                   input_shape=shape.input_shape, per_step=shape.per_step, uri=location.uri, task=shape.task,
                   test=ParquetSplit(test_files, shape, label) if test_files else None)


def _table(x: np.ndarray, y: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """Rows of x [N, ...] and y (integer: int64; float: float32) as a table with the schema metadata given."""
    size = math.prod(x.shape[1:])
    x_col = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).reshape(-1)), size)
    y = np.ascontiguousarray(y, np.float32 if np.issubdtype(y.dtype, np.floating) else np.int64)
    y_col = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1]) if y.ndim == 2 else pa.array(y)
    schema = pa.schema([("x", x_col.type), ("y", y_col.type)], metadata=metadata)
    return pa.Table.from_arrays([x_col, y_col], schema=schema)


def shape_metadata(input_shape: tuple[int, ...]) -> dict[str, str]:
    """The schema metadata of an input shape: `input_shape`, and for sequences [T, F] also `seq_len` and
    `feature_dim` (what readers written before input_shape need)."""
    metadata = {"seq_len": str(input_shape[0]), "feature_dim": str(input_shape[1])} if len(input_shape) == 2 else {}
    metadata["input_shape"] = json.dumps([int(d) for d in input_shape])
    return metadata


def write_parquet_dataset(out: str, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                          num_classes: int | None, test: tuple[np.ndarray, np.ndarray] | None = None) -> Location:
    """Write OUT/train.parquet, OUT/val.parquet (and OUT/test.parquet), one row group per order block (so a block
    is one read). x of any shape [N, ...]; y integer labels or float targets (then `num_classes` is None)."""
    location = parse_location(out, flag="OUT")
    if location.is_local:
        location.fs.create_dir(location.path, recursive=True)
    metadata = shape_metadata(tuple(train[0].shape[1:]))
    if num_classes is not None:
        metadata["num_classes"] = str(num_classes)
    for name, (x, y) in (("train", train), ("val", val), *((("test", test),) if test is not None else ())):
        target = location.join(f"{name}.parquet")
        with location.fs.open_output_stream(target.path) as sink:
            # Uncompressed: float features barely compress, and decompression would cost read throughput.
            pq.write_table(_table(x, y, metadata), sink, row_group_size=ORDER_BLOCK_ROWS, compression="none")
    return location
