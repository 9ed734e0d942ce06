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
    ({"train": {"x": np.zeros((100, 16), np.float32), "y": np.zeros(100, np.int64)}},
     r"train.x must be \[N, T, F\], got shape \(100, 16\)"),
    ({"train": {"x": np.zeros((4, 2, 3), np.int64), "y": np.zeros(4, np.int64)}}, "train.x must be a float array"),
    ({"train": {"x": np.zeros((4, 2, 3), np.float32), "y": np.zeros(4, np.float32)}}, "train.y must be an integer"),
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
