"""Dataset loading (safe, validated), order and sharding, and the synthetic generator."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain_app.data import main as data_main
from raytrain_app.datasets.augment import augment
from raytrain_app.datasets.dataset import DataError
from raytrain_app.datasets.formats import load_dataset, make_synthetic
from raytrain_app.datasets.order import batches_per_epoch, eval_batches, shard_batches
from tests.helpers import run_in_process


def dump(path: Path, obj: object, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def arrays(n: int = 20, t: int = 4, f: int = 3, per_step: bool = False) -> dict:
    rng = np.random.default_rng(0)
    y_shape = (n, t) if per_step else (n,)
    return {"x": rng.standard_normal((n, t, f)).astype(np.float32), "y": rng.integers(0, 3, y_shape)}


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious pickle does
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = dump(tmp_path / "evil.pkl", {"train": {"x": _RunsCode(str(marker)), "y": np.zeros(3)}})
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_dataset(str(path))
    assert not marker.exists()
    # Control: the same pickle through the standard unpickler really would have run it.
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path: Path, protocol: int) -> None:
    ds = load_dataset(str(dump(tmp_path / "d.pkl", {"train": arrays(), "val": arrays(8)}, protocol)))
    assert (len(ds.train), len(ds.val), ds.seq_len, ds.feature_dim, ds.num_classes) == (20, 8, 4, 3, 3)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64


def test_torch_tensors_and_per_step_labels(tmp_path: Path) -> None:
    raw = arrays(per_step=True)
    data = {"train": {"x": torch.from_numpy(raw["x"]), "y": torch.from_numpy(raw["y"])}, "num_classes": 5}
    ds = load_dataset(str(dump(tmp_path / "d.pkl", data)))
    assert ds.per_step and ds.num_classes == 5 and ds.num_classes_given


def test_missing_val_holds_out_a_seeded_fraction(tmp_path: Path) -> None:
    path = str(dump(tmp_path / "d.pkl", {"train": arrays(100)}))
    a, b = load_dataset(path, val_fraction=0.2, seed=1), load_dataset(path, val_fraction=0.2, seed=1)
    assert (len(a.train), len(a.val)) == (80, 20)
    assert torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.x, load_dataset(path, val_fraction=0.2, seed=2).val.x)


@pytest.mark.parametrize(("data", "message"), [
    ({"train": {"x": np.zeros(100, np.float32), "y": np.zeros(100, np.int64)}},
     r"train.x must be \[N, ...\] with at least one axis after N \(\[N, F\] rows, \[N, T, F\] sequences\), got "
     r"shape \(100,\)$"),
    ({"train": {"x": np.zeros((4, 2, 3), np.int64), "y": np.zeros(4, np.int64)}}, "train.x must be a float array"),
    ({"train": {"x": np.zeros((4, 2, 3), np.float32), "y": np.zeros(4, np.bool_)}}, "train.y must be an integer"),
    ({"train": {"x": np.zeros((4, 2, 3), np.float32), "y": np.zeros(4, np.complex64)}}, "train.y must be an integer"),
    ({"train": {"x": np.zeros((4, 2, 3), np.float32), "y": np.zeros(5, np.int64)}}, "train.y has 5 rows"),
    ({"train": {"x": np.zeros((4, 2, 3), np.float32), "y": np.zeros((4, 3), np.int64)}}, "train.y is \\[N, T\\]"),
    ({"train": {"x": np.zeros((4, 2, 3), np.float32), "y": np.array([0, 1, 2, 7])}, "num_classes": 3},
     r"labels must be in \[0, 3\), found values from 0 to 7"),
    ({"train": {"x": np.full((4, 2, 3), np.nan, np.float32), "y": np.zeros(4, np.int64)}}, "NaN or inf"),
    ({"train": {"x": np.zeros((0, 2, 3), np.float32), "y": np.zeros(0, np.int64)}}, "train is empty"),
    ({"training": {}}, "must hold keys 'train'"),
    ({"train": {"inputs": 1}}, "train must be a dict with keys 'x' and 'y'"),
    ([1, 2], "must hold a dict"),
])
def test_malformed_datasets_get_precise_messages(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(str(dump(tmp_path / "d.pkl", data)))


def test_missing_and_non_pickle_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data file not found"):
        load_dataset(str(tmp_path / "nope.pkl"))
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(DataError, match="is not a readable pickle"):
        load_dataset(str(tmp_path / "text.pkl"))


def test_order_depends_on_seed_and_epoch_and_shards_are_disjoint() -> None:
    split = load_split(64)
    def ids(rank: int, world: int, epoch: int = 0, seed: int = 0, start: int = 0) -> list[int]:
        return [int(v) for _, x, _ in shard_batches(split, seed=seed, epoch=epoch, rank=rank, world_size=world,
                                                     batch_size=4, start_batch=start) for v in x[:, 0, 0]]
    r0, r1 = ids(0, 2), ids(1, 2)
    assert len(r0) == len(r1) == 32 and not set(r0) & set(r1)
    assert ids(0, 2) == r0  # same (seed, epoch, rank, world) -> same batches
    assert ids(0, 2, epoch=1) != r0 and ids(0, 2, seed=1) != r0
    assert ids(0, 2, start=3) == r0[12:]  # mid-epoch resume continues exactly
    assert batches_per_epoch(64, 4, 2) == 8


def test_eval_batches_cover_every_sample_once() -> None:
    split = load_split(10)
    seen = [int(v) for r in range(3) for x, _ in eval_batches(split, rank=r, world_size=3, batch_size=2)
            for v in x[:, 0, 0]]
    assert sorted(seen) == list(range(10))


def test_augmentation_noise_is_keyed_by_batch_position() -> None:
    x = torch.zeros(2, 3, 4)
    a = augment(x, 0.1, seed=0, epoch=1, rank=0, batch_index=5)
    assert torch.equal(a, augment(x, 0.1, seed=0, epoch=1, rank=0, batch_index=5))
    assert not torch.equal(a, augment(x, 0.1, seed=0, epoch=1, rank=0, batch_index=6))
    assert augment(x, 0.0, seed=0, epoch=1, rank=0, batch_index=5) is x


def load_split(n: int):
    from raytrain_app.datasets.dataset import Split

    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 3).contiguous()
    return Split(x=x, y=torch.zeros(n, dtype=torch.int64))


def test_synth_cli_writes_a_loadable_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synth.pkl"
    result = run_in_process(data_main, ["synth", "--out", str(out), "--num-train", "50", "--num-val", "10",
                                        "--seq-len", "6", "--feature-dim", "2", "--per-step"])
    assert result.returncode == 0, result.stderr
    ds = load_dataset(str(out))
    assert (len(ds.train), len(ds.val), ds.seq_len, ds.feature_dim, ds.per_step) == (50, 10, 6, 2, True)


def test_synthetic_labels_are_balanced_enough_to_learn() -> None:
    data = make_synthetic(num_train=2000, num_val=10, seq_len=8, feature_dim=4, num_classes=4, per_step=False, seed=0)
    counts = np.bincount(data["train"]["y"], minlength=4)
    assert counts.min() > 100  # every class present: a model can beat chance only by learning the map


# --- any input shape, and regression targets ----------------------------------------------------------------

def test_rows_with_float_targets_are_a_regression_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 6)).astype(np.float32), rng.standard_normal(30)  # y float64: read as float32
    ds = load_dataset(str(dump(tmp_path / "rows.pkl", {"train": {"x": x, "y": y}, "val": {"x": x[:5], "y": y[:5]}})))
    assert (ds.input_shape, ds.task, ds.num_classes, ds.num_classes_given, ds.per_step) == (
        (6,), "regression", 0, False, False)
    assert (ds.seq_len, ds.feature_dim) == (1, 6)  # a row: no steps
    assert ds.train.y.dtype == torch.float32 and torch.equal(ds.train.y, torch.from_numpy(y.astype(np.float32)))
    assert torch.equal(ds.train.x, torch.from_numpy(x))


def test_per_step_regression_and_more_axes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    seq = {"x": rng.standard_normal((12, 5, 3)).astype(np.float32),
           "y": rng.standard_normal((12, 5)).astype(np.float32)}
    ds = load_dataset(str(dump(tmp_path / "seq.pkl", {"train": seq})), val_fraction=0.25)
    assert (ds.input_shape, ds.seq_len, ds.feature_dim, ds.per_step, ds.task) == ((5, 3), 5, 3, True, "regression")
    assert (len(ds.train), len(ds.val)) == (9, 3) and ds.val.y.shape == (3, 5)
    grid = {"x": rng.standard_normal((10, 4, 2, 3)).astype(np.float32), "y": rng.integers(0, 3, (10, 4))}
    ds = load_dataset(str(dump(tmp_path / "grid.pkl", {"train": grid, "num_classes": 3})))
    assert (ds.input_shape, ds.seq_len, ds.feature_dim, ds.per_step, ds.task, ds.num_classes) == (
        (4, 2, 3), 4, 3, True, "classification", 3)


def test_dataset_built_with_seq_len_and_feature_dim_still_works() -> None:
    from raytrain_app.datasets.dataset import Dataset

    split = load_split(4)
    ds = Dataset(train=split, val=split, num_classes=3, seq_len=2, feature_dim=3, per_step=False)
    assert (ds.input_shape, ds.seq_len, ds.feature_dim, ds.task) == ((2, 3), 2, 3, "classification")
    rows = Dataset(train=split, val=split, num_classes=0, input_shape=(6,), task="regression")
    assert (rows.seq_len, rows.feature_dim, rows.per_step) == (1, 6, False)


def _rows(y: np.ndarray, n: int = 4) -> dict:
    return {"x": np.zeros((n, 3), np.float32), "y": y}


@pytest.mark.parametrize(("data", "message"), [
    ({"train": _rows(np.array([0.0, np.nan, 1.0, 2.0], np.float32))},
     r"train\.y contains NaN or inf values \(regression targets, in float32, must be finite\)$"),
    ({"train": _rows(np.array([0.0, 1.0, 2.0, 1e300]))}, r"train\.y contains NaN or inf values"),  # inf in float32
    ({"train": _rows(np.array([0.0, 1.0, 1.0, 0.0], np.float32)), "num_classes": 2},
     r"the dataset states num_classes 2, but its y is float \(regression targets\): num_classes is only meaningful "
     r"for integer labels; drop it, or give integer labels$"),
    ({"train": _rows(np.zeros((4, 3), np.float32))},
     r"train\.y is \[N, T\] \(a target per step\) but train\.x is \[4, 3\], rows without steps: give y as \[N\], or "
     r"x as \[N, T, F\]$"),
    ({"train": _rows(np.zeros(4, np.float32)), "val": _rows(np.zeros(4, np.int64))},
     r"val\.y holds integer labels but train\.y holds float targets: every split needs integer labels "
     r"\(classification\) or every split float targets \(regression\)$"),
    ({"train": _rows(np.zeros(4, np.int64)), "val": {"x": np.zeros((4, 2, 3), np.float32), "y": np.zeros(4)}},
     r"val\.x is \[N, 2, 3\] but train\.x is \[N, 3\]$"),
])
def test_shape_and_target_mistakes_are_one_line(tmp_path: Path, data: dict, message: str) -> None:
    path = dump(tmp_path / "d.pkl", data)
    with pytest.raises(DataError, match=message) as refused:
        load_dataset(str(path))
    assert str(refused.value).startswith(f"--data {path}: ") and "\n" not in str(refused.value)


def test_feature_statistics_of_rows_are_per_feature() -> None:
    from raytrain_app.datasets.dataset import Split
    from raytrain_app.datasets.normalize import feature_stats

    x = torch.from_numpy(np.random.default_rng(3).normal(2.0, 3.0, (2500, 5)).astype(np.float32))
    mean, std = feature_stats(Split(x, torch.zeros(2500)), block_rows=1000)
    values = x.numpy().astype(np.float64)
    assert torch.allclose(mean, torch.from_numpy(values.mean(0)), rtol=0, atol=1e-12)
    assert torch.allclose(std, torch.from_numpy(values.std(0)), rtol=0, atol=1e-12)


def _least_squares_val_mse(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    def design(x: np.ndarray) -> np.ndarray:
        return np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(design(train_x), train_y.astype(np.float64), rcond=None)
    return float(((design(val_x) @ w - val_y) ** 2).mean())


@pytest.mark.parametrize("shape", [(6,), (8, 4)])
def test_synthetic_regression_is_learnable(shape: tuple[int, ...]) -> None:
    data = make_synthetic(num_train=2000, num_val=500, input_shape=shape, per_step=False, seed=0, task="regression")
    assert "num_classes" not in data and data["train"]["y"].dtype == np.float32 and data["train"]["y"].shape == (2000,)
    features = {name: data[name]["x"].reshape(len(data[name]["x"]), -1, shape[-1]).mean(1) for name in ("train", "val")}
    val_y = data["val"]["y"]
    mse = _least_squares_val_mse(features["train"], data["train"]["y"], features["val"], val_y)
    assert mse < 0.1 * val_y.var()  # a linear model of the (mean) features explains the targets
    assert val_y.var() > 0.02  # not a trivially constant target


def test_synthetic_per_step_regression_targets_follow_the_running_mean() -> None:
    data = make_synthetic(num_train=2000, num_val=400, input_shape=(5, 3), per_step=True, seed=1, task="regression")
    x, y = data["train"]["x"], data["train"]["y"]
    assert y.shape == (2000, 5) and y.dtype == np.float32
    running = x.cumsum(1) / np.arange(1, 6).reshape(1, -1, 1)
    val_running = data["val"]["x"].cumsum(1) / np.arange(1, 6).reshape(1, -1, 1)
    mse = _least_squares_val_mse(running.reshape(-1, 3), y.reshape(-1), val_running.reshape(-1, 3),
                                 data["val"]["y"].reshape(-1))
    assert mse < 0.1 * data["val"]["y"].var()


def test_synthetic_classification_is_the_same_with_input_shape_as_with_seq_len_and_feature_dim() -> None:
    a = make_synthetic(num_train=20, num_val=5, seq_len=4, feature_dim=3, num_classes=3, per_step=True, seed=2,
                       num_test=4)
    b = make_synthetic(num_train=20, num_val=5, input_shape=(4, 3), num_classes=3, per_step=True, seed=2, num_test=4)
    assert pickle.dumps(a) == pickle.dumps(b)


def test_synth_cli_regression_rows_and_refusals(tmp_path: Path) -> None:
    out = tmp_path / "rows.pkl"
    result = run_in_process(data_main, ["synth", "--out", str(out), "--num-train", "40", "--num-val", "8",
                                        "--num-test", "4", "--task", "regression", "--input-shape", "6"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (f"Wrote {out}: train 40 x [6], val 8, test 4, per-row regression "
                                              "targets")
    ds = load_dataset(str(out))
    assert (ds.input_shape, ds.task, len(ds.train), len(ds.val), len(ds.test)) == ((6,), "regression", 40, 8, 4)
    for flags, message in [
        (["--input-shape", "6", "--per-step"], "--per-step needs sequences: --input-shape 6 is rows without steps"),
        (["--input-shape", "6", "--seq-len", "4"], "--input-shape replaces --seq-len and --feature-dim"),
        (["--task", "regression", "--num-classes", "3"], "--num-classes is for --task classification"),
    ]:
        refused = run_in_process(data_main, ["synth", "--out", str(tmp_path / "no.pkl"), *flags])
        assert refused.returncode == 2 and message in refused.stderr.splitlines()[-1]
    assert not (tmp_path / "no.pkl").exists()
