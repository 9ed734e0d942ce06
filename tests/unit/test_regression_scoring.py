"""A regression checkpoint scored by `python -m raytrain_app.evaluate` and by predict's `score_table`, against the
same numbers computed here with plain torch; and checkpoints refused, in one line with exit code 2, on data of
the other task or of another shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytrain_app.checkpoint.inference import load_trained_model, score_table
from raytrain_app.cli.preflight import with_data_shape
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import build_model
from raytrain_app.data import main as data_main
from raytrain_app.datasets.formats import make_synthetic, open_dataset, write_pickle_atomic
from raytrain_app.datasets.prediction_input import Shape, open_prediction_input, read_piece
from raytrain_app.evaluate import main
from raytrain_app.predict import outputs_text
from tests.helpers import run_in_process, trained_checkpoint_of

BATCH = 32  # the batch size evaluate is run with below, and the one the computation here uses
REGRESSOR = "tests.plugins:regressor"
# Rows of 6 features with a value each, and sequences of 8 steps of 4 features with a value per step.
SHAPES = {False: (6,), True: (8, 4)}


def config_for(data_path: Path, model: str, **changes: object) -> TrainConfig:
    """The config of `model` on the data at `data_path`, its shapes and task as the driver fills them in."""
    return with_data_shape(TrainConfig(data=str(data_path), model=model, **changes), open_dataset(str(data_path)))


def trained_regression(folder: Path, per_step: bool) -> tuple[Path, Path]:
    """(a regression dataset pickle with a test split, a checkpoint of the tiny regressor trained on it for four
    epochs in this process with its inputs standardised): its predictions are neither constant nor perfect."""
    raw = make_synthetic(num_train=256, num_val=64, num_test=90, per_step=per_step, seed=1, task="regression",
                         input_shape=SHAPES[per_step])
    return trained_checkpoint_of(raw, folder, model=REGRESSOR, epochs=4, lr=1e-2, warmup_steps=4, batch_size=16,
                                 eval_every=100, num_workers=1)


@pytest.fixture(scope="module", params=[False, True], ids=["per-sample", "per-step"])
def regression(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return trained_regression(tmp_path_factory.mktemp("regression"), per_step=request.param)


def loaded(checkpoint: Path) -> torch.nn.Module:
    state = torch.load(checkpoint, weights_only=True)
    model = build_model(TrainConfig.from_dict(state["config"]))
    model.load_state_dict(state["model_state_dict"])
    return model.eval()


def expected_scores(checkpoint: Path, data: Path) -> tuple[dict, dict]:
    """The test split scored here in batches of BATCH as validation sums it, and every (true, predicted) pair."""
    model = loaded(checkpoint)
    test = open_dataset(str(data)).test
    loss_sum = squared_sum = absolute_sum = 0.0
    truth, predicted = [], []
    with torch.no_grad():
        for lo in range(0, test.num_rows, BATCH):
            x, y = test.read_rows(lo, min(lo + BATCH, test.num_rows))
            out = model(x)
            assert out.shape == y.shape
            loss_sum += torch.nn.functional.mse_loss(out, y, reduction="sum").double().item()
            error = out.double() - y.double()
            squared_sum += (error * error).sum().item()
            absolute_sum += error.abs().sum().item()
            truth.append(y.reshape(-1))
            predicted.append(out.reshape(-1))
    truth, predicted = torch.cat(truth), torch.cat(predicted)
    count = truth.numel()
    total = float(((truth.double() - truth.double().mean()) ** 2).sum())
    scores = {"loss": loss_sum / count, "rmse": (squared_sum / count) ** 0.5, "mae": absolute_sum / count,
              "r2": 1.0 - squared_sum / total, "count": count, "rows": test.num_rows, "task": "regression"}
    return scores, {"true": truth.tolist(), "predicted": predicted.tolist()}


def test_evaluate_on_a_regression_test_split_is_the_in_process_computation(
        regression: tuple[Path, Path], tmp_path: Path) -> None:
    data, checkpoint = regression
    result = run_in_process(main, ["--checkpoint", str(checkpoint), "--data", str(data), "--out",
                                   str(tmp_path / "eval"), "--batch-size", str(BATCH)])
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected, points = expected_scores(checkpoint, data)
    assert {k: report[k] for k in expected} == expected  # exactly: the same sums in the same order
    per_step = load_trained_model(str(checkpoint)).cfg.per_step
    assert report["per_step"] == per_step and report["count"] == 90 * (8 if per_step else 1)
    assert set(report) == {"task", "checkpoint", "global_step", "data", "split", "rows", "count", "per_step",
                           "loss", "rmse", "mae", "r2"}
    assert 0.0 < report["r2"] < 1.0 and report["rmse"] ** 2 == pytest.approx(report["loss"], rel=1e-5)
    assert (f"loss {expected['loss']:.6f}  RMSE {expected['rmse']:.6f}  MAE {expected['mae']:.6f}  "
            f"R2 {expected['r2']:.4f}") in result.stdout
    assert not (tmp_path / "eval" / "confusion.png").exists()
    image = Image.open(tmp_path / "eval" / "regression.png")
    assert image.format == "PNG" and json.loads(image.text["Description"]) == points
    # The same split as Parquet (python -m raytrain_app.data convert) scores the same.
    assert run_in_process(data_main, ["convert", str(data), str(tmp_path / "pq")]).returncode == 0
    again = run_in_process(main, ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "pq"), "--out",
                                  str(tmp_path / "eval-pq"), "--batch-size", str(BATCH)])
    assert again.returncode == 0, again.stderr
    parquet = json.loads((tmp_path / "eval-pq" / "metrics.json").read_text())
    assert {k: parquet[k] for k in expected} == expected


def untrained_checkpoint(path: Path, data: Path, model: str, **arch: object) -> Path:
    """A checkpoint of `model` with random weights, for the data at `data`'s shapes and task."""
    cfg = config_for(data, model, **arch)
    torch.manual_seed(0)
    torch.save({"model_state_dict": build_model(cfg).state_dict(), "config": cfg.to_dict(), "global_step": 1}, path)
    return path


def dataset(path: Path, **changes: object) -> Path:
    sizes = dict(num_train=32, num_val=8, num_test=8, per_step=False, seed=0, task="regression", input_shape=(6,))
    sizes.update(changes)
    write_pickle_atomic(make_synthetic(**sizes), str(path))
    return path


TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2}
CASES = {  # (the checkpoint's data and model, the data scored, what the one line says)
    "regression-on-classes": (dict(task="classification", num_classes=3, input_shape=(8, 4)), "transformer",
                              dict(input_shape=(8, 4)), "task regression (checkpoint has classification)"),
    "classes-on-regression": (dict(), REGRESSOR, dict(task="classification", num_classes=3),
                              "task classification (checkpoint has regression)"),
    "input-shape": (dict(), REGRESSOR, dict(input_shape=(8, 4)), "input shape [8, 4] (checkpoint has [6])"),
    "row-width": (dict(), REGRESSOR, dict(input_shape=(5,)), "feature dimension 5 (checkpoint has 6)"),
    "per-step": (dict(input_shape=(8, 4)), REGRESSOR, dict(input_shape=(8, 4), per_step=True),
                 "targets per-step targets [N, T] (checkpoint has per-sample targets [N])"),
}


@pytest.mark.parametrize("case", CASES)
def test_data_of_another_task_or_shape_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    trained_on, model, scored_on, message = CASES[case]
    checkpoint = untrained_checkpoint(tmp_path / "model.pt", dataset(tmp_path / "train.pkl", **trained_on), model,
                                      **(TINY if model == "transformer" else {}))
    data = dataset(tmp_path / "other.pkl", **scored_on)
    result = run_in_process(main, ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_score_table_gives_the_models_values_and_passes_rejected_rows_through(
        regression: tuple[Path, Path], tmp_path: Path) -> None:
    _, checkpoint = regression
    trained = load_trained_model(str(checkpoint))
    per_step, shape = trained.cfg.per_step, SHAPES[trained.cfg.per_step]
    size = int(np.prod(shape))
    x = np.random.default_rng(1).normal(size=(7, size)).astype(np.float32)
    x[2, 0] = np.nan
    rows = [list(row) for row in x]
    rows[4] = None
    pq.write_table(pa.table({"x": pa.array(rows, type=pa.list_(pa.float32())), "id": [f"r{i}" for i in range(7)]}),
                   tmp_path / "data.parquet")
    source = open_prediction_input(str(tmp_path / "data.parquet"), None, Shape(*shape))
    table = pa.concat_tables(t for piece in source.pieces for t in read_piece(piece, source.shape, source.id_type))
    out = score_table(trained.build(), table, trained.cfg)
    assert out.column_names == ["row", "id", "predicted", "error"]  # no probabilities
    assert out.schema.field("predicted").type == (pa.list_(pa.float32(), shape[0]) if per_step else pa.float32())
    kept = [0, 1, 3, 5, 6]
    with torch.no_grad():
        values = loaded(checkpoint)(torch.from_numpy(x[kept].reshape(-1, *shape)))
    assert values.shape == ((5, shape[0]) if per_step else (5,))
    predicted = torch.tensor(out.column("predicted").drop_null().to_pylist(), dtype=torch.float32)
    assert torch.equal(predicted, values)  # the same batch: the same bits
    assert out.slice(2, 1).to_pylist()[0] == {"row": 2, "id": "r2", "predicted": None,
                                              "error": "x has NaN, infinite or missing values"}
    assert out.slice(4, 1).to_pylist()[0] == {"row": 4, "id": "r4", "predicted": None, "error": "x is null"}


def test_predict_says_what_the_model_predicts() -> None:
    regression = TrainConfig(task="regression", input_shape=[8, 4])
    assert outputs_text(regression) == "a value per sample (regression)"
    assert outputs_text(regression.replace(per_step=True)) == "a value per step (regression)"
    assert outputs_text(TrainConfig(num_classes=3)) == "a class per sequence, 3 classes"  # as before


def test_the_regression_png_holds_its_points_and_a_large_split_is_thinned_evenly() -> None:
    import io

    from raytrain_app.observability.evaluation_report import MAX_PLOT_POINTS, plotted_points, regression_png

    image = Image.open(io.BytesIO(regression_png([1.0, 2.5], [1.25, 2.0], "t")))
    assert image.format == "PNG" and json.loads(image.text["Description"]) == {"true": [1.0, 2.5],
                                                                                "predicted": [1.25, 2.0]}
    assert plotted_points(3) == [0, 1, 2]
    shown = plotted_points(100_003)
    assert len(shown) == MAX_PLOT_POINTS and shown[0] == 0 and shown[-1] == 100_002 and shown == sorted(set(shown))


def test_r2_of_targets_without_spread_is_1_when_exact_else_0() -> None:
    from raytrain_app.core.evaluation import tally_regression

    class Constant(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x),), self.value)

    batches = [(torch.zeros(4, 2), torch.full((4,), 3.0))]
    assert tally_regression(Constant(3.0), batches, torch.device("cpu")).r2 == 1.0
    off = tally_regression(Constant(1.0), batches, torch.device("cpu"))
    assert (off.r2, off.rmse, off.mae, off.loss, off.count) == (0.0, 2.0, 2.0, 4.0, 4)
