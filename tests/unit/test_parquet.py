"""Parquet datasets: the same rows in the same order as the in-memory pickle, streamed, with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raytrain_app.data import main as data_main
from raytrain_app.datasets.dataset import DataError
from raytrain_app.datasets.formats import load_dataset, make_synthetic, open_dataset
from raytrain_app.datasets.order import ORDER_BLOCK_ROWS, eval_batches, shard_batches
from raytrain_app.datasets.parquet import _table
from tests.conftest import write_dataset
from tests.helpers import run_in_process


def convert(pickle_path: Path, out: Path, *extra: str) -> None:
    result = run_in_process(data_main, ["convert", str(pickle_path), str(out), *extra])
    assert result.returncode == 0, result.stderr


def all_batches(split, world: int, epoch: int, batch: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for r in range(world)
            for _, x, y in shard_batches(split, seed=3, epoch=epoch, rank=r, world_size=world, batch_size=batch)]


@pytest.mark.parametrize("per_step", [False, True])
def test_converted_parquet_yields_the_same_batches_as_the_pickle(tmp_path: Path, per_step: bool) -> None:
    n = 2 * ORDER_BLOCK_ROWS + 300  # several order blocks, the last one short
    pkl = write_dataset(tmp_path / "d.pkl", num_train=n, num_val=50, per_step=per_step)
    convert(pkl, tmp_path / "pq")
    memory, streamed = load_dataset(str(pkl)), open_dataset(str(tmp_path / "pq"))
    assert (streamed.seq_len, streamed.feature_dim, streamed.per_step, streamed.num_classes) == (
        memory.seq_len, memory.feature_dim, memory.per_step, memory.num_classes)
    for world in (1, 2):
        for epoch in (0, 1):
            a, b = all_batches(memory.train, world, epoch), all_batches(streamed.train, world, epoch)
            assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                            for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    ev_a = list(eval_batches(memory.val, rank=1, world_size=2, batch_size=4))
    ev_b = list(eval_batches(streamed.val, rank=1, world_size=2, batch_size=4))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(ev_a, ev_b, strict=True))


def test_order_is_a_permutation_shards_are_disjoint_and_resume_is_exact(tmp_path: Path) -> None:
    n = 3 * ORDER_BLOCK_ROWS + 17
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1)
    table = _table(x, np.zeros(n, np.int64), {"seq_len": "1", "feature_dim": "1"})
    (tmp_path / "rows").mkdir()
    pq.write_table(table, tmp_path / "rows" / "part.parquet", row_group_size=700)  # not aligned to blocks
    split = open_dataset(str(tmp_path / "rows" / "part.parquet"), val_fraction=0.01).train
    ids = [[int(v) for _, xb, _ in shard_batches(split, seed=0, epoch=0, rank=r, world_size=2, batch_size=8)
            for v in xb.flatten()] for r in range(2)]
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0])) == len(ids[0])
    assert set(ids[0]) | set(ids[1]) <= set(range(split.num_rows))  # validation rows never trained on
    resumed = [int(v) for _, xb, _ in shard_batches(split, seed=0, epoch=0, rank=1, world_size=2, batch_size=8,
                                                     start_batch=37) for v in xb.flatten()]
    assert resumed == ids[1][37 * 8:]


def test_parquet_without_val_holds_out_the_last_rows(tmp_path: Path) -> None:
    raw = make_synthetic(num_train=100, num_val=1, seq_len=4, feature_dim=2, num_classes=3, per_step=False, seed=0)
    table = _table(raw["train"]["x"], raw["train"]["y"], {"seq_len": "4", "feature_dim": "2"})
    pq.write_table(table, tmp_path / "only.parquet")
    ds = open_dataset(str(tmp_path / "only.parquet"), val_fraction=0.2)
    assert (ds.train.num_rows, ds.val.num_rows) == (80, 20)
    x_val, _ = ds.val.read_rows(0, 20)
    assert torch.equal(x_val, torch.from_numpy(raw["train"]["x"][80:]))


def test_synth_parquet_cli(tmp_path: Path) -> None:
    result = run_in_process(data_main, ["synth", "--format", "parquet", "--out", str(tmp_path / "s"), "--num-train",
                                        "64", "--num-val", "8"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["test.parquet", "train.parquet", "val.parquet"]
    ds = open_dataset(str(tmp_path / "s"))
    assert (ds.train.num_rows, ds.val.num_rows, ds.num_classes) == (64, 8, 4)


def test_folder_without_parquet_and_bad_schemas(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a folder without Parquet files"):
        open_dataset(str(tmp_path / "empty"))
    import pyarrow as pa

    pq.write_table(pa.table({"features": [1.0]}), tmp_path / "wrong.parquet")
    with pytest.raises(DataError, match="must have columns 'x' and 'y'"):
        open_dataset(str(tmp_path / "wrong.parquet"))
    x = np.zeros((4, 2, 3), np.float32)
    pq.write_table(_table(x, np.array([0, 1, 2, 9]), {"seq_len": "2", "feature_dim": "3", "num_classes": "3"}),
                   tmp_path / "labels.parquet")
    with pytest.raises(DataError, match=r"labels must be in \[0, 3\), found values from 0 to 9"):
        open_dataset(str(tmp_path / "labels.parquet"))


def test_parquet_converted_from_a_pickle_trains_to_the_same_state(tmp_path: Path) -> None:
    from raytrain_app.core.config import TrainConfig
    from raytrain_app.core.model import SequenceTransformer
    from raytrain_app.core.rng import seed_everything
    from raytrain_app.core.trainer import Trainer

    pkl = write_dataset(tmp_path / "d.pkl", num_train=300)
    convert(pkl, tmp_path / "pq")
    finals = []
    for ds in (load_dataset(str(pkl)), open_dataset(str(tmp_path / "pq"))):
        cfg = TrainConfig(hidden_dim=16, num_layers=1, num_heads=2, feature_dim=4, seq_len=8, num_classes=3,
                          epochs=2, batch_size=16, eval_every=5, num_workers=1)
        seed_everything(0, 0)
        model = SequenceTransformer(cfg)
        trainer = Trainer(cfg, model, model, torch.device("cpu"))
        losses: list[float] = []
        trainer.fit(ds, lambda metrics, state, is_best, out=losses: out.append(metrics["val_loss"]))
        finals.append((losses, trainer.mean_ema(), model.state_dict()))
    (losses_a, ema_a, weights_a), (losses_b, ema_b, weights_b) = finals
    assert losses_a == losses_b and ema_a == ema_b  # the same losses, exactly
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# --- any input shape, and regression targets ----------------------------------------------------------------

def write_pickle(path: Path, data: dict) -> Path:
    from raytrain_app.datasets.formats import write_pickle_atomic

    write_pickle_atomic(data, str(path))
    return path


@pytest.mark.parametrize(("shape", "per_step"), [((6,), False), ((5, 3), True), ((4, 2, 3), False)])
def test_regression_of_any_input_shape_converts_to_the_same_tensors_and_statistics(
        tmp_path: Path, shape: tuple[int, ...], per_step: bool) -> None:
    from raytrain_app.datasets.normalize import feature_stats

    raw = make_synthetic(num_train=ORDER_BLOCK_ROWS + 200, num_val=40, num_test=16, input_shape=shape,
                         per_step=per_step, seed=4, task="regression")
    pkl = write_pickle(tmp_path / "d.pkl", raw)
    convert(pkl, tmp_path / "pq")
    meta = pq.read_schema(tmp_path / "pq" / "train.parquet").metadata
    assert meta[b"input_shape"] == str(list(shape)).encode() and b"num_classes" not in meta
    assert (b"seq_len" in meta) == (len(shape) == 2)  # old readers still read [T, F] sequences
    memory, streamed = load_dataset(str(pkl)), open_dataset(str(tmp_path / "pq"))
    for ds in (memory, streamed):
        assert (ds.input_shape, ds.task, ds.num_classes, ds.per_step) == (shape, "regression", 0, per_step)
    for name in ("train", "val", "test"):
        a, b = getattr(memory, name), getattr(streamed, name)
        (xa, ya), (xb, yb) = a.read_rows(0, a.num_rows), b.read_rows(0, b.num_rows)
        assert yb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    stats_a, stats_b = feature_stats(memory.train), feature_stats(streamed.train)
    assert all(torch.equal(sa, sb) for sa, sb in zip(stats_a, stats_b, strict=True))
    a, b = all_batches(memory.train, 2, 1), all_batches(streamed.train, 2, 1)
    assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_synth_parquet_rows_and_a_file_written_before_input_shape(tmp_path: Path) -> None:
    result = run_in_process(data_main, ["synth", "--format", "parquet", "--out", str(tmp_path / "rows"),
                                        "--num-train", "64", "--num-val", "8", "--num-test", "0", "--input-shape", "6"])
    assert result.returncode == 0, result.stderr
    assert pq.read_schema(tmp_path / "rows" / "train.parquet").metadata == {b"input_shape": b"[6]",
                                                                            b"num_classes": b"4"}
    ds = open_dataset(str(tmp_path / "rows"))
    assert (ds.input_shape, ds.seq_len, ds.feature_dim, ds.task, ds.num_classes) == ((6,), 1, 6, "classification", 4)
    # Only seq_len and feature_dim, as every file was written before input_shape: read exactly as before.
    raw = make_synthetic(num_train=50, num_val=1, seq_len=4, feature_dim=2, num_classes=3, per_step=True, seed=0)
    pq.write_table(_table(raw["train"]["x"], raw["train"]["y"], {"seq_len": "4", "feature_dim": "2"}),
                   tmp_path / "old.parquet")
    old = open_dataset(str(tmp_path / "old.parquet"), val_fraction=0.2)
    assert (old.input_shape, old.seq_len, old.feature_dim, old.per_step, old.task) == (
        (4, 2), 4, 2, True, "classification")
    x, y = old.train.read_rows(0, 40)
    assert torch.equal(x, torch.from_numpy(raw["train"]["x"][:40])) and y.dtype == torch.int64


def test_float64_targets_are_read_as_float32(tmp_path: Path) -> None:
    import pyarrow as pa

    y = np.linspace(-1, 1, 20)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(60, dtype=np.float32)), 3),
                      "y": pa.array(y)}).replace_schema_metadata({"input_shape": "[3]"})
    pq.write_table(table, tmp_path / "f64.parquet")
    ds = open_dataset(str(tmp_path / "f64.parquet"), val_fraction=0.25)
    _, y_read = ds.train.read_rows(0, 15)
    assert ds.task == "regression" and y_read.dtype == torch.float32
    assert torch.equal(y_read, torch.from_numpy(y[:15].astype(np.float32)))


@pytest.mark.parametrize("case", ["nan", "num_classes", "per_step_rows", "bad_metadata", "disagree"])
def test_parquet_shape_and_target_mistakes_are_one_line(tmp_path: Path, case: str) -> None:
    rows = np.zeros((4, 3), np.float32)
    target = tmp_path / "d.parquet"
    if case == "nan":
        pq.write_table(_table(rows, np.array([0, np.inf, 1, 2], np.float32), {"input_shape": "[3]"}), target)
        expected = f"--data {target}: y contains NaN or inf values (row group 0); regression targets must be finite"
    elif case == "num_classes":
        pq.write_table(_table(rows, np.zeros(4, np.float32), {"input_shape": "[3]", "num_classes": "3"}), target)
        expected = (f"--data {target} states num_classes 3, but its y is float (regression targets): num_classes is "
                    "only meaningful for integer labels; drop it, or give integer labels")
    elif case == "per_step_rows":
        pq.write_table(_table(rows, np.zeros((4, 3), np.int64), {"input_shape": "[3]"}), target)
        y_type = pq.read_schema(target).field("y").type  # how pyarrow prints it depends on its version
        expected = (f"--data {target}: y is a list a row ({y_type}, a target per step) but x rows (input_shape [3]) "
                    "have no steps: give y one value a row")
    elif case == "bad_metadata":
        pq.write_table(_table(rows, np.zeros(4, np.int64), {"input_shape": "3"}), target)
        expected = (f"--data {target}: schema metadata input_shape must be a JSON list of positive integers such as "
                    "[8, 4] or [6], got '3'")
    else:
        target = tmp_path / "splits"
        target.mkdir()
        pq.write_table(_table(rows, np.zeros(4, np.float32), {"input_shape": "[3]"}), target / "train.parquet")
        pq.write_table(_table(rows, np.zeros(4, np.int64), {"input_shape": "[3]"}), target / "val.parquet")
        expected = (f"--data {target}: files disagree on the input shape (seq_len, feature_dim) or the kind of y "
                    "(integer or float, per sample or per step)")
    with pytest.raises(DataError) as refused:
        open_dataset(str(target), val_fraction=0.5)
    assert str(refused.value) == expected
