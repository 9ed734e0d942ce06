"""What `python -m raytrain_app.predict` reads: Parquet files or a dataset pickle, checked against the shapes a
checkpoint was trained on before anything runs, cut into pieces that are read independently with bounded memory,
and decoded into one table layout the model replicas score.

Accepted inputs (local paths or URIs):
  a .parquet file; a folder of .parquet files; a dataset folder with splits (train.parquet or train/,
  val..., test...), of which one split is read; a dataset pickle (one of its splits' `x`).
Parquet columns: `x` (required) fixed_size_list<float>[size] or list<float>, one sample of the checkpoint's input
shape row-major ([F] a row, [T, F] a sequence: T*F values, ...); `id` (optional, any scalar type) is carried to the
output; `y` and any other column are ignored. Schema metadata `input_shape` (or, in files without it,
`seq_len`/`feature_dim`), when present, must be the checkpoint's.

Every row keeps its global index: rows are numbered across the files in sorted order (the order `data convert`
and training use). A row that cannot be scored (x null, of the wrong length, or with NaN or infinite values) is
kept with its reason in `error`; a whole input that does not fit the checkpoint is a DataError (one line).

The decoded table of every piece: `row` int64, `id` (when the input has one), `x` fixed_size_list<float32>[size]
(null when the row cannot be scored), `error` string (null when it can).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain_app.storage.location import Location, check_bucket, parse_location

SUFFIXES = (".parquet", ".pq")
SPLITS = ("train", "val", "test")  # as raytrain_app.datasets.dataset.SPLITS
ROW, ID, X, ERROR = "row", "id", "x", "error"
# A piece (one read task) is at most this many bytes of row groups, and is decoded this many bytes at a time:
# what one read holds in memory, whatever the size of the files.
PIECE_BYTES = 64 << 20
DECODE_BYTES = 16 << 20


@dataclass(frozen=True, init=False)
class Shape:
    """What one row of x must hold: one sample of the checkpoint's input shape. `Shape(T, F)` a sequence of T
    steps of F features (as before input shapes), `Shape(F)` a row of F features, `Shape(A, B, F)` ...; a tuple
    works too: `Shape((T, F))`."""

    dims: tuple[int, ...]

    def __init__(self, *dims: int | tuple[int, ...]) -> None:
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if not dims or any(int(d) <= 0 for d in dims):
            raise ValueError(f"an input shape needs at least one positive size, got {list(dims)}")
        object.__setattr__(self, "dims", tuple(int(d) for d in dims))

    @property
    def seq_len(self) -> int:
        """Steps: the first axis of a sequence, 1 for a row of features."""
        return self.dims[0] if len(self.dims) >= 2 else 1

    @property
    def feature_dim(self) -> int:
        return self.dims[-1]

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def rows(self) -> str:
        """The shape of x with N rows, as messages show it: [N, 6], [N, 8, 4]."""
        return f"[N, {', '.join(map(str, self.dims))}]"

    def describe(self) -> str:
        if len(self.dims) == 2:
            return f"seq_len {self.seq_len} x feature_dim {self.feature_dim} = {self.size} values"
        return f"input shape {list(self.dims)} = {self.size} values"


@dataclass(frozen=True)
class ParquetPiece:
    """Consecutive row groups of one file: one read task. `first_row` is the global index of its first row."""

    uri: str
    row_groups: tuple[int, ...]
    first_row: int
    num_rows: int
    size_bytes: int


@dataclass
class PredictionInput:
    """The rows to score: Parquet pieces, or (a pickle) the whole x array in memory as [N, size] float32."""

    label: str  # what the user passed, for messages
    shape: Shape
    num_rows: int
    split: str | None = None  # the split read, for a dataset with splits
    files: list[str] = field(default_factory=list)
    pieces: list[ParquetPiece] = field(default_factory=list)
    array: np.ndarray | None = None
    id_type: pa.DataType | None = None  # the `id` column's type, None when no file has one

    def describe(self) -> str:
        split = f" ({self.split} split)" if self.split else ""
        if self.array is not None:
            return f"{self.num_rows:,} rows of {self.label}{split}"
        return f"{self.num_rows:,} rows in {len(self.files)} Parquet file(s) of {self.label}{split}"


def open_prediction_input(data: str, split: str | None, shape: Shape, *, flag: str = "--data",
                          piece_bytes: int = PIECE_BYTES) -> PredictionInput:
    """Find and check what `data` names (DataError or StorageError: one line naming it and what to do).
    `split` None means test for a dataset with splits, and all files of a plain file or folder."""
    location = parse_location(data, flag=flag)
    check_bucket(location)
    info = location.info()
    if info.type == pafs.FileType.NotFound:
        raise _data_error(f"{flag} {data}: no such file or folder")
    if info.type == pafs.FileType.File and not location.path.endswith(SUFFIXES):
        return _pickle_input(location, data, split or "test", shape, flag)
    files, split = _input_files(location, data, split, flag)
    source = _parquet_input(files, data, shape, flag, piece_bytes)
    source.split = split
    return source


def _parquet_files(folder: Location) -> list[Location]:
    return [folder.join(e.base_name) for e in folder.list()
            if e.type == pafs.FileType.File and e.base_name.endswith(SUFFIXES)]


def _split_files(location: Location, name: str) -> list[Location] | None:
    """The files of split `name` (file or folder beside the others), None when the dataset has no such split."""
    for suffix in SUFFIXES:
        if location.join(f"{name}{suffix}").is_file():
            return [location.join(f"{name}{suffix}")]
    folder = location.join(name)
    return _parquet_files(folder) if folder.is_dir() else None


def _input_files(location: Location, data: str, split: str | None, flag: str) -> tuple[list[Location], str | None]:
    """The Parquet files to read, and the split they are (None: all files of a file or plain folder)."""
    if location.is_file():
        if split is not None:
            raise _data_error(f"{flag} {data} is one Parquet file, not a dataset with splits: drop --split {split}")
        return [location], None
    splits = {name: files for name in SPLITS if (files := _split_files(location, name)) is not None}
    if splits:
        wanted = split or "test"
        if wanted not in splits:
            raise _data_error(f"{flag} {data} has no {wanted} split ({wanted}.parquet or {wanted}/); it has "
                              f"{', '.join(splits)}: pick one with --split")
        files = splits[wanted]
        if not files:
            raise _data_error(f"{flag} {data}: the {wanted} split's folder holds no .parquet files")
        return files, wanted
    if split is not None:
        raise _data_error(f"{flag} {data} is a folder of Parquet files without splits: drop --split {split}")
    files = _parquet_files(location)
    if not files:
        raise _data_error(f"{flag} {data} holds no .parquet files (nor train/val/test splits of them): pass Parquet "
                          "data or a dataset .pkl")
    return files, None


def _parquet_input(files: list[Location], data: str, shape: Shape, flag: str, piece_bytes: int) -> PredictionInput:
    pieces, first_row, id_types = [], 0, {}
    for f in files:
        try:
            with f.fs.open_input_file(f.path) as handle:
                metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise _data_error(f"{flag} {f}: not a readable Parquet file ({' '.join(str(e).split())[:160]})") from None
        id_type = _check_schema(schema, shape, f"{flag} {f}")
        if id_type is not None:
            id_types[f.uri] = id_type
        for groups, rows, size in _group_row_groups(metadata, piece_bytes):
            pieces.append(ParquetPiece(f.uri, groups, first_row, rows, size))
            first_row += rows
    if len(set(id_types.values())) > 1:
        found = ", ".join(f"{t} in {uri}" for uri, t in id_types.items())
        raise _data_error(f"{flag} {data}: the files' id columns have different types ({found}): give them one type")
    if first_row == 0:
        raise _data_error(f"{flag} {data} holds no rows")
    return PredictionInput(label=data, shape=shape, num_rows=first_row, files=[f.uri for f in files],
                           pieces=pieces, id_type=next(iter(id_types.values()), None))


def _check_schema(schema: pa.Schema, shape: Shape, label: str) -> pa.DataType | None:
    """Raise DataError unless the file can be scored by a model of `shape`; the type of its id column (or None)."""
    if X not in schema.names:
        raise _data_error(f"{label} has no 'x' column (it has {', '.join(schema.names) or 'none'}): the features to "
                          "score go in a list column named x")
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if "input_shape" in meta:  # what the writer records for every file since input shapes
        try:
            dims = json.loads(meta["input_shape"])
        except ValueError:
            dims = meta["input_shape"]
        if dims != list(shape.dims):
            raise _data_error(f"{label} has input_shape {meta['input_shape']} (its schema metadata) but the checkpoint "
                              f"was trained on {shape.rows()}: score data shaped like the data the model was trained "
                              "on")
    for name in ("seq_len", "feature_dim") if "input_shape" not in meta else ():
        if name in meta and meta[name] != str(getattr(shape, name)):
            raise _data_error(f"{label} has {name} {meta[name]} (its schema metadata) but the checkpoint was trained "
                              f"on {name} {getattr(shape, name)}: score data shaped like the data the model was "
                              "trained on")
    x_type = schema.field(X).type
    is_list = pa.types.is_list(x_type) or pa.types.is_large_list(x_type) or pa.types.is_fixed_size_list(x_type)
    if not is_list or not pa.types.is_floating(x_type.value_type):
        raise _data_error(f"{label}: x must be a list of floats (fixed_size_list<float>[{shape.size}] or list<float>), "
                          f"got {x_type}")
    if pa.types.is_fixed_size_list(x_type) and x_type.list_size != shape.size:
        raise _data_error(f"{label}: x holds {x_type.list_size} values a row but the checkpoint expects "
                          f"{shape.describe()}: score data shaped like the data the model was trained on")
    if ID not in schema.names:
        return None
    id_type = schema.field(ID).type
    if pa.types.is_nested(id_type) or pa.types.is_null(id_type):
        raise _data_error(f"{label}: the id column must hold one scalar a row (a number or a string), got {id_type}")
    return id_type


def _group_row_groups(metadata: pq.FileMetaData, piece_bytes: int) -> Iterator[tuple[tuple[int, ...], int, int]]:
    """Consecutive row groups of a file, up to `piece_bytes` each: (row groups, rows, bytes)."""
    groups: list[int] = []
    rows = size = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        if groups and size + group.total_byte_size > piece_bytes:
            yield tuple(groups), rows, size
            groups, rows, size = [], 0, 0
        if group.num_rows:
            groups.append(g)
            rows, size = rows + group.num_rows, size + group.total_byte_size
    if groups:
        yield tuple(groups), rows, size


def _pickle_input(location: Location, data: str, split: str, shape: Shape, flag: str) -> PredictionInput:
    from raytrain_app.datasets.formats import safe_unpickle

    raw = safe_unpickle(location.read_bytes(), f"{flag} {data}")
    if not isinstance(raw, dict):
        raise _data_error(f"{flag} {data} must hold a dataset dict ({{'test': {{'x': ...}}, ...}}), got "
                          f"{type(raw).__name__}")
    present = [name for name in SPLITS if isinstance(raw.get(name), dict)]
    if split not in present:
        raise _data_error(f"{flag} {data} has no {split} split; it has {', '.join(present) or 'none'}: pick one with "
                          "--split")
    x = raw[split].get("x")
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # a torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray) or x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        got = f"shape {x.shape}, dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise _data_error(f"{flag} {data}: {split}.x must be a float array {shape.rows()}, got {got}")
    if x.shape[1:] != shape.dims:
        got = f"[N, {', '.join(map(str, x.shape[1:]))}]"
        raise _data_error(f"{flag} {data}: {split}.x is {got} but the checkpoint expects {shape.rows()} "
                          f"({shape.describe()}): score data shaped like the data the model was trained on")
    if x.shape[0] == 0:
        raise _data_error(f"{flag} {data}: {split}.x holds no rows")
    array = np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape[0], shape.size)
    return PredictionInput(label=data, shape=shape, num_rows=x.shape[0], split=split, array=array)


def _data_error(message: str) -> Exception:
    """A DataError (the datasets layer's one error type). Imported here, not at the top: the read tasks import this
    module, and the rest of the datasets layer imports torch, which they never need (a second or two of CPU for
    every worker process that starts)."""
    from raytrain_app.datasets.dataset import DataError

    return DataError(message)


# --- decoding: what the read tasks run ---------------------------------------------------------------------------

def read_piece(piece: ParquetPiece, shape: Shape, id_type: pa.DataType | None) -> Iterator[pa.Table]:
    """The decoded tables of one piece, about DECODE_BYTES at a time."""
    location = parse_location(piece.uri)
    with location.fs.open_input_file(location.path) as f:
        parquet = pq.ParquetFile(f)
        columns = [X, ID] if ID in parquet.schema_arrow.names else [X]
        rows_at_a_time = max(1, DECODE_BYTES * piece.num_rows // max(piece.size_bytes, 1))
        row = piece.first_row
        for batch in parquet.iter_batches(batch_size=rows_at_a_time, row_groups=list(piece.row_groups),
                                          columns=columns, use_threads=False):
            ids = batch.column(ID) if ID in columns else None
            yield decode(batch.column(X), row, shape, ids, id_type)
            row += batch.num_rows


def decode_array(x: np.ndarray, first_row: int, shape: Shape) -> pa.Table:
    """The decoded table of rows of an in-memory [n, size] float32 array (a pickle's)."""
    values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return decode(pa.FixedSizeListArray.from_arrays(values, shape.size), first_row, shape, None, None)


def decode(x: pa.Array | pa.ChunkedArray, first_row: int, shape: Shape, ids: pa.Array | None,
           id_type: pa.DataType | None) -> pa.Table:
    """Rows [first_row, first_row + len(x)) decoded: x as fixed_size_list<float32>[size], null where the row cannot
    be scored, and why in `error`."""
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks()
    n, size = len(x), shape.size
    errors = np.full(n, None, dtype=object)
    lengths = np.full(n, size) if pa.types.is_fixed_size_list(x.type) else \
        pc.list_value_length(x).fill_null(0).to_numpy(zero_copy_only=False)
    null = x.is_null().to_numpy(zero_copy_only=False)
    errors[null] = "x is null"
    for i in np.flatnonzero(~null & (lengths != size)):
        errors[i] = f"x has {lengths[i]} values, the checkpoint expects {shape.describe()}"
    fits = errors == None  # noqa: E711 - elementwise on an object array
    fitting = x if fits.all() else x.filter(pa.array(fits))
    values = np.asarray(fitting.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, size)
    finite = np.isfinite(values).all(axis=1)
    errors[np.flatnonzero(fits)[~finite]] = "x has NaN, infinite or missing values"
    if fits.all() and finite.all() and x.type == pa.list_(pa.float32(), size):
        column = x.cast(pa.list_(pa.float32(), size))  # already what the replicas read: no copy (names the child)
    else:
        full = np.zeros((n, size), dtype=np.float32)
        full[fits] = values
        column = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), size,
                                                   mask=pa.array(errors != None))  # noqa: E711
    arrays = [pa.array(np.arange(first_row, first_row + n, dtype=np.int64))]
    names = [ROW]
    if id_type is not None:
        arrays.append(ids.cast(id_type) if ids is not None else pa.nulls(n, id_type))
        names.append(ID)
    arrays += [column, pa.array(errors, type=pa.string())]
    return pa.Table.from_arrays(arrays, names=[*names, X, ERROR])
