"""The Python API's pieces that start no Ray (`raytrain_app.api`): datasets written from numpy arrays and pandas
DataFrames read back as `--data` reads them, and settings become the command's flags. (`train` runs on a cluster
in tests/integration/test_resume_e2e.py; `score` and `load_model` in test_evaluate.py and test_ckpt.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import raytrain_app as rt
from raytrain_app.api import as_argv
from raytrain_app.cli.flags import parse_config
from raytrain_app.core.config import ConfigError, TrainConfig, cli_fields
from raytrain_app.datasets.dataset import DataError
from raytrain_app.datasets.formats import open_dataset


def rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 5)).astype(np.float32), columns=[f"f{i}" for i in range(5)])
    frame["price"] = (frame.to_numpy() @ np.arange(5)).astype(np.float32)
    return frame


@pytest.mark.parametrize("out", ["rows.pkl", "rows-parquet"])
def test_a_dataframe_becomes_a_regression_dataset_in_either_format(tmp_path: Path, out: str) -> None:
    train, test = rows(200, 0), rows(40, 1)
    where = rt.write_dataset(str(tmp_path / out), train, test=test, target="price")
    data = open_dataset(where)
    assert (data.task, data.input_shape, data.num_classes) == ("regression", (5,), 0)
    # The validation rows are the ones training would hold out of train (a Parquet folder gets them as a file).
    assert data.train.num_rows + data.val.num_rows == 200 and data.val.num_rows == 20
    x, y = data.test.read_rows(0, 40)
    assert torch.equal(x, torch.from_numpy(test.drop(columns=["price"]).to_numpy(np.float32)))
    assert torch.equal(y, torch.from_numpy(test["price"].to_numpy()))


def test_numpy_arrays_become_a_classification_dataset_and_bad_ones_are_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(64, 8, 4)).astype(np.float32)
    y = np.arange(64) % 3
    where = rt.write_dataset(str(tmp_path / "seq.pkl"), (x, y), val=(x[:16], y[:16]))
    data = open_dataset(where)
    assert (data.task, data.input_shape, data.num_classes) == ("classification", (8, 4), 3)
    with pytest.raises(DataError, match="train.y has 63 rows but train.x has 64"):
        rt.write_dataset(str(tmp_path / "bad.pkl"), (x, y[:-1]))
    assert not (tmp_path / "bad.pkl").exists()  # checked before anything is written
    with pytest.raises(ConfigError, match="name its target column"):
        rt.write_dataset(str(tmp_path / "frame.pkl"), rows(10, 0))


def test_settings_become_the_flags_that_give_the_same_config() -> None:
    settings = {"data": "d.pkl", "model": "examples.conv_classifier.model:spec", "model_args": {"channels": 8},
                "lr": 3e-4, "use_amp": True, "compile": False, "num_workers": "1-2", "run_name": None}
    cfg, given = parse_config(as_argv(settings, {f.name for f in cli_fields(TrainConfig)}))
    assert given == set(settings) - {"run_name"}
    assert (cfg.model_args, cfg.lr, cfg.use_amp, cfg.compile, cfg.min_workers) == ({"channels": 8}, 3e-4, True,
                                                                                    False, 1)
    assert cfg.default_run_name() == TrainConfig(**{k: v for k, v in settings.items() if v is not None}
                                                 ).default_run_name()
    with pytest.raises(ConfigError, match="unknown setting"):
        as_argv({"learning_rate": 1.0}, {f.name for f in cli_fields(TrainConfig)})
