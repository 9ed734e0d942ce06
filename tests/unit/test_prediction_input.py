"""What `python -m raytrain_app.predict` reads and scores, without Ray: inputs checked against the checkpoint
(one line, exit 2, nothing written), rows that cannot be scored kept with their reason, ids carried, and a batch
scored exactly as the model in this process scores it (per sequence and per step). The Ray Data pipeline itself:
tests/integration/test_predict_e2e.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytrain_app.checkpoint.inference import load_trained_model, score_table
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.model import SequenceTransformer, set_normalization
from raytrain_app.datasets.prediction_input import Shape, open_prediction_input, read_piece
from raytrain_app.predict import SUCCESS_FILE, main, move_into_place, prepare_output
from raytrain_app.storage.location import parse_location
from tests.helpers import run_in_process

T, F, C = 6, 3, 4


def write_checkpoint(path: Path, per_step: bool) -> Path:
    """A tiny model with random weights and input statistics that are not the identity, as one .pt file."""
    cfg = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=F, seq_len=T, num_classes=C,
                      per_step=per_step, dropout=0.0)
    torch.manual_seed(1)
    model = SequenceTransformer(cfg)
    set_normalization(model, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 3.0]))
    torch.save({"model_state_dict": model.state_dict(), "config": cfg.to_dict(), "global_step": 5, "epoch": 1}, path)
    return path


def write_parquet(path: Path, x: np.ndarray, *, fixed: bool = True, ids: list | None = None,
                  metadata: dict[str, str] | None = None) -> Path:
    values = pa.array(x.reshape(-1).astype(np.float32))
    column = pa.FixedSizeListArray.from_arrays(values, x.shape[1]) if fixed else pa.array(
        [list(row) for row in x.astype(np.float32)], type=pa.list_(pa.float32()))
    table = pa.table({"x": column, **({"id": ids} if ids is not None else {})})
    pq.write_table(table.replace_schema_metadata(metadata or {"seq_len": str(T), "feature_dim": str(F)}), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", per_step=False)


def decoded(data: str, split: str | None = None) -> pa.Table:
    source = open_prediction_input(data, split, Shape(T, F))
    return pa.concat_tables(t for piece in source.pieces for t in read_piece(piece, source.shape, source.id_type))


def test_rows_that_cannot_be_scored_keep_their_place_and_reason_and_ids_are_carried(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, T * F)).astype(np.float32)
    bad = x.copy()
    bad[1, 4] = np.inf
    write_parquet(tmp_path / "a.parquet", x, ids=None)  # no id column: its rows get null ids
    write_parquet(tmp_path / "b.parquet", bad, ids=[10, 11, 12, 13, 14])
    ragged = pa.array([list(x[0]), list(x[1][:-1]), None, list(x[3])], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": ragged, "id": pa.array([20, 21, 22, 23])}), tmp_path / "c.parquet")
    table = decoded(str(tmp_path))
    assert table.column_names == ["row", "id", "x", "error"]
    assert table.column("row").to_pylist() == list(range(14))  # files in sorted order
    assert table.column("id").to_pylist() == [None] * 5 + [10, 11, 12, 13, 14] + [20, 21, 22, 23]
    assert table.column("error").to_pylist() == (
        [None] * 6 + ["x has NaN, infinite or missing values"] + [None] * 4
        + [f"x has {T * F - 1} values, the checkpoint expects seq_len {T} x feature_dim {F} = {T * F} values",
           "x is null", None])
    assert table.column("x").null_count == 3
    scored = np.array(table.column("x").drop_null().to_pylist(), dtype=np.float32)
    assert np.array_equal(scored, np.concatenate([x, bad[[0, 2, 3, 4]], x[[0, 3]]]))


@pytest.mark.parametrize("per_step", [False, True])
def test_a_batch_is_scored_as_the_model_scores_it_in_this_process(tmp_path: Path, per_step: bool) -> None:
    model_file = write_checkpoint(tmp_path / "model.pt", per_step)
    trained = load_trained_model(str(model_file))
    x = np.random.default_rng(1).normal(size=(7, T * F)).astype(np.float32)
    x[2, 0] = np.nan
    write_parquet(tmp_path / "data.parquet", x, ids=[f"r{i}" for i in range(7)])
    out = score_table(trained.build(), decoded(str(tmp_path / "data.parquet")), trained.cfg)
    assert out.column_names == ["row", "id", "predicted", "probabilities", "error"]
    assert out.column("id").to_pylist() == [f"r{i}" for i in range(7)]
    kept = [i for i in range(7) if i != 2]
    model = SequenceTransformer(trained.cfg)
    model.load_state_dict(torch.load(model_file, weights_only=True)["model_state_dict"])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x[kept].reshape(-1, T, F)))
    expected_shape = (T, C) if per_step else (C,)
    assert out.schema.field("probabilities").type == pa.list_(pa.float32(), int(np.prod(expected_shape)))
    assert out.schema.field("predicted").type == (pa.list_(pa.int64(), T) if per_step else pa.int64())
    probabilities = torch.tensor(out.column("probabilities").drop_null().to_pylist()).reshape(-1, *expected_shape)
    assert torch.equal(probabilities, torch.softmax(logits, dim=-1))  # the same batch: the same bits
    assert torch.equal(torch.tensor(out.column("predicted").drop_null().to_pylist()), logits.argmax(-1))
    row_2 = out.slice(2, 1).to_pylist()[0]
    assert row_2 == {"row": 2, "id": "r2", "predicted": None, "probabilities": None,
                     "error": "x has NaN, infinite or missing values"}


def test_a_pickles_split_is_read_and_checked(tmp_path: Path, checkpoint: Path) -> None:
    x = np.random.default_rng(2).normal(size=(4, T, F)).astype(np.float32)
    with open(tmp_path / "data.pkl", "wb") as f:
        pickle.dump({"train": {"x": x, "y": np.zeros(4, np.int64)}, "test": {"x": x[:3], "y": np.zeros(3)}}, f)
    source = open_prediction_input(str(tmp_path / "data.pkl"), None, Shape(T, F))
    assert source.num_rows == 3 and np.array_equal(source.array, x[:3].reshape(3, -1))
    assert open_prediction_input(str(tmp_path / "data.pkl"), "train", Shape(T, F)).num_rows == 4


def run_predict(tmp_path: Path, checkpoint: Path, data: Path | str, *extra: str) -> object:
    return run_in_process(main, ["--checkpoint", str(checkpoint), "--data", str(data),
                                 "--out", str(tmp_path / "out"), *extra])


def dataset_with_splits(root: Path, x: np.ndarray) -> Path:
    root.mkdir()
    write_parquet(root / "train.parquet", x)
    write_parquet(root / "val.parquet", x)
    return root


@pytest.mark.parametrize("case", ["feature_dim", "metadata", "split", "missing", "pickle_shape", "out_exists"])
def test_a_mistake_is_one_line_exit_2_and_nothing_is_written(tmp_path: Path, checkpoint: Path, case: str) -> None:
    x = np.zeros((2, T * F), np.float32)
    extra: list[str] = []
    if case == "feature_dim":  # 4 features a step where the model was trained on 3
        data = write_parquet(tmp_path / "wide.parquet", np.zeros((2, T * 4)), metadata={"seq_len": str(T)})
        expected = f"error: --data {data}: x holds {T * 4} values a row but the checkpoint expects seq_len {T} x " \
                   f"feature_dim {F} = {T * F} values: score data shaped like the data the model was trained on"
    elif case == "metadata":  # the same number of values, another shape
        data = write_parquet(tmp_path / "t.parquet", x, metadata={"seq_len": str(F), "feature_dim": str(T)})
        expected = f"error: --data {data} has seq_len {F} (its schema metadata) but the checkpoint was trained on " \
                   f"seq_len {T}: score data shaped like the data the model was trained on"
    elif case == "split":
        data = dataset_with_splits(tmp_path / "ds", x)
        expected = f"error: --data {data} has no test split (test.parquet or test/); it has train, val: pick one " \
                   "with --split"
    elif case == "missing":
        data = tmp_path / "nowhere"
        expected = f"error: --data {data}: no such file or folder"
    elif case == "pickle_shape":
        data = tmp_path / "d.pkl"
        data.write_bytes(pickle.dumps({"test": {"x": np.zeros((2, T, F + 1), np.float32)}}))
        expected = f"error: --data {data}: test.x is [N, {T}, {F + 1}] but the checkpoint expects [N, {T}, {F}] " \
                   f"(seq_len {T} x feature_dim {F} = {T * F} values): score data shaped like the data the model " \
                   "was trained on"
    else:
        data = write_parquet(tmp_path / "ok.parquet", x)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "part.parquet").write_bytes(b"earlier output")
        expected = f"error: --out {tmp_path / 'out'} exists and is not empty: pass --overwrite to replace it, or " \
                   "choose another --out"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_predict(tmp_path, checkpoint, data, *extra)
    assert (result.returncode, result.stderr.splitlines()) == (2, [expected])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no out.partial


def test_a_cut_off_copy_into_place_is_replaced_but_another_output_is_not(tmp_path: Path) -> None:
    out = parse_location(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.parquet").write_bytes(b"copied before the cut")
    staged = tmp_path / "out.partial" / "0a1b2c3d"
    staged.mkdir(parents=True)
    (staged / SUCCESS_FILE).write_text("{}")
    staging = prepare_output(out, overwrite=False)
    assert staging.path.startswith(str(tmp_path / "out.partial") + "/") and not (tmp_path / "out.partial").exists()
    with pytest.raises(UserError) as refused:  # no staged whole output: someone else's files
        prepare_output(out, overwrite=False)
    assert str(refused.value) == (f"--out {tmp_path / 'out'} exists and is not empty: pass --overwrite to replace it, "
                                  "or choose another --out")
    assert (tmp_path / "out" / "a.parquet").read_bytes() == b"copied before the cut"  # left as it was


def test_overwrite_replaces_a_whole_earlier_output_only_once_the_new_one_is_whole(tmp_path: Path) -> None:
    """--overwrite: the earlier output stays as it was while the new one is staged beside it, and is then
    replaced whole (none of its files left), the staging folder gone."""
    out = parse_location(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    for name in ("part-0.parquet", "part-1.parquet", SUCCESS_FILE):
        (tmp_path / "out" / name).write_bytes(b"earlier")
    with pytest.raises(UserError, match="exists and is not empty: pass --overwrite"):
        prepare_output(out, overwrite=False)
    staging = prepare_output(out, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_SUCCESS", "part-0.parquet", "part-1.parquet"]
    Path(staging.path).mkdir(parents=True)
    for name in ("part-9.parquet", SUCCESS_FILE):
        Path(staging.path, name).write_bytes(b"new")
    move_into_place(staging, out)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {"part-9.parquet": b"new",
                                                                              SUCCESS_FILE: b"new"}
    assert not (tmp_path / "out.partial").exists()


# --- inputs of any shape: rows [N, F] for a model of input shape (F,) ------------------------------------------

def test_shape_of_any_input_shape_and_the_sequence_constructor() -> None:
    assert Shape(T, F) == Shape((T, F)) and (Shape(T, F).seq_len, Shape(T, F).size) == (T, T * F)
    assert Shape(T, F).describe() == f"seq_len {T} x feature_dim {F} = {T * F} values"  # as before
    rows = Shape(F)
    assert (rows.dims, rows.seq_len, rows.feature_dim, rows.size, rows.rows()) == ((F,), 1, F, F, f"[N, {F}]")
    assert Shape(2, T, F).rows() == f"[N, 2, {T}, {F}]" and Shape(2, T, F).describe() == (
        f"input shape [2, {T}, {F}] = {2 * T * F} values")


def test_rows_are_read_for_a_model_of_rows(tmp_path: Path) -> None:
    x = np.random.default_rng(4).normal(size=(5, F)).astype(np.float32)
    write_parquet(tmp_path / "rows.parquet", x, metadata={"input_shape": f"[{F}]"})
    source = open_prediction_input(str(tmp_path / "rows.parquet"), None, Shape(F))
    table = pa.concat_tables(t for piece in source.pieces for t in read_piece(piece, source.shape, source.id_type))
    assert table.column("error").to_pylist() == [None] * 5
    assert np.array_equal(np.array(table.column("x").to_pylist(), dtype=np.float32), x)
    with open(tmp_path / "rows.pkl", "wb") as f:
        pickle.dump({"test": {"x": x, "y": np.zeros(5, np.float32)}}, f)
    source = open_prediction_input(str(tmp_path / "rows.pkl"), None, Shape(F))
    assert source.num_rows == 5 and np.array_equal(source.array, x)


@pytest.mark.parametrize("case", ["parquet", "metadata", "pickle"])
def test_rows_one_feature_too_wide_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    from raytrain_app.datasets.dataset import DataError

    wide = np.zeros((3, F + 1), np.float32)
    if case == "parquet":
        data = write_parquet(tmp_path / "wide.parquet", wide, metadata={"note": "no shape"})
        expected = (f"--data {data}: x holds {F + 1} values a row but the checkpoint expects input shape [{F}] = {F} "
                    "values: score data shaped like the data the model was trained on")
    elif case == "metadata":
        data = write_parquet(tmp_path / "wide.parquet", wide, metadata={"input_shape": f"[{F + 1}]"})
        expected = (f"--data {data} has input_shape [{F + 1}] (its schema metadata) but the checkpoint was trained "
                    f"on [N, {F}]: score data shaped like the data the model was trained on")
    else:
        data = tmp_path / "wide.pkl"
        data.write_bytes(pickle.dumps({"test": {"x": wide}}))
        expected = (f"--data {data}: test.x is [N, {F + 1}] but the checkpoint expects [N, {F}] (input shape [{F}] "
                    f"= {F} values): score data shaped like the data the model was trained on")
    with pytest.raises(DataError) as refused:
        open_prediction_input(str(data), None, Shape(F))
    assert str(refused.value) == expected
