"""`python -m raytrain_app.evaluate`: a checkpoint scored on a test split, against the same numbers computed here
with plain torch and numpy, and the mistakes it refuses with one line and exit code 2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import build_model
from raytrain_app.data import main as data_main
from raytrain_app.datasets.formats import make_synthetic, open_dataset, write_pickle_atomic
from raytrain_app.evaluate import main
from tests.helpers import PLUGIN, run_in_process, trained_checkpoint_of

BATCH = 32  # the batch size evaluate is run with below, and the one the computation here uses


MODELS = {"transformer": {"hidden_dim": 16, "num_layers": 2, "num_heads": 2},  # the built-in, and a user's own
          "plug-in": {"model": PLUGIN, "model_args": {"channels": 16, "num_blocks": 2}}}


def trained_checkpoint(folder: Path, per_step: bool, model: str = "transformer") -> tuple[Path, Path]:
    """(a dataset pickle with a test split, a checkpoint trained on it for one epoch in this process with its
    inputs standardised): the checkpoint's predictions are neither constant nor perfect."""
    raw = make_synthetic(num_train=256, num_val=64, num_test=90, seq_len=8, feature_dim=4, num_classes=3,
                         per_step=per_step, seed=1)
    return trained_checkpoint_of(raw, folder, **MODELS[model], epochs=1, batch_size=16, eval_every=100,
                                 num_workers=1)


def expected_scores(checkpoint: Path, data: Path) -> dict:
    """The test split scored here: the checkpoint's model in batches of BATCH, every label counted once."""
    state = torch.load(checkpoint, weights_only=True)
    model = build_model(TrainConfig.from_dict(state["config"]))
    model.load_state_dict(state["model_state_dict"])
    model.eval()
    test = open_dataset(str(data)).test
    loss_sum, truth, predicted = 0.0, [], []
    with torch.no_grad():
        for lo in range(0, test.num_rows, BATCH):
            x, y = test.read_rows(lo, min(lo + BATCH, test.num_rows))
            logits = model(x)
            loss_sum += torch.nn.functional.cross_entropy(logits.reshape(-1, 3), y.reshape(-1),
                                                         reduction="sum").double().item()
            truth.append(y.reshape(-1).numpy())
            predicted.append(logits.argmax(-1).reshape(-1).numpy())
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    classes = []
    for c in range(3):
        tp = int(((truth == c) & (predicted == c)).sum())
        precision = tp / int((predicted == c).sum()) if (predicted == c).any() else 0.0
        recall = tp / int((truth == c).sum()) if (truth == c).any() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        classes.append({"class": c, "precision": precision, "recall": recall, "f1": f1,
                        "support": int((truth == c).sum())})
    return {"loss": loss_sum / truth.size, "accuracy": float((truth == predicted).mean()), "count": int(truth.size),
            "confusion": confusion.tolist(), "classes": classes}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("per_step", [False, True], ids=["per-sequence", "per-step"])
def test_evaluate_on_a_test_split_is_the_in_process_computation(tmp_path: Path, per_step: bool, model: str) -> None:
    data, checkpoint = trained_checkpoint(tmp_path, per_step, model)
    result = run_in_process(main, ["--checkpoint", str(checkpoint), "--data", str(data), "--out",
                                   str(tmp_path / "eval"), "--batch-size", str(BATCH)])
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = expected_scores(checkpoint, data)
    assert {k: report[k] for k in expected} == expected  # exactly: the same numbers, to the last bit
    assert 0.3 < report["accuracy"] < 1.0 and report["rows"] == 90 and report["split"] == "test"
    assert report["macro"]["f1"] == pytest.approx(sum(c["f1"] for c in expected["classes"]) / 3, abs=1e-15)
    assert f"loss {expected['loss']:.6f}  accuracy {expected['accuracy']:.4f}" in result.stdout
    image = Image.open(tmp_path / "eval" / "confusion.png")
    assert image.format == "PNG" and json.loads(image.text["Description"]) == expected["confusion"]
    # The same split as Parquet (python -m raytrain_app.data convert) scores the same.
    assert run_in_process(data_main, ["convert", str(data), str(tmp_path / "pq")]).returncode == 0
    assert (tmp_path / "pq" / "test.parquet").is_file()
    again = run_in_process(main, ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "pq"), "--out",
                                  str(tmp_path / "eval-pq"), "--batch-size", str(BATCH)])
    assert again.returncode == 0, again.stderr
    parquet = json.loads((tmp_path / "eval-pq" / "metrics.json").read_text())
    assert {k: parquet[k] for k in expected} == expected


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return trained_checkpoint(tmp_path_factory.mktemp("scored"), per_step=False)


def write(tmp_path: Path, name: str, **changes: object) -> Path:
    sizes = dict(num_train=32, num_val=8, num_test=8, seq_len=8, feature_dim=4, num_classes=3, per_step=False, seed=0)
    sizes.update(changes)
    raw = make_synthetic(**sizes)
    write_pickle_atomic(raw, str(tmp_path / name))
    return tmp_path / name


def with_labels_up_to(tmp_path: Path, top: int) -> Path:
    raw = make_synthetic(num_train=32, num_val=8, num_test=8, seq_len=8, feature_dim=4, num_classes=3,
                         per_step=False, seed=0)
    raw["test"]["y"][0] = top
    raw.pop("num_classes")
    write_pickle_atomic(raw, str(tmp_path / "labels.pkl"))
    return tmp_path / "labels.pkl"


@pytest.mark.parametrize(("make_data", "message"), [
    (lambda p: write(p, "f.pkl", feature_dim=5), "feature dimension 5 (checkpoint has 4)"),
    (lambda p: write(p, "t.pkl", seq_len=6), "sequence length 6 (checkpoint has 8)"),
    (lambda p: write(p, "s.pkl", per_step=True), "labels per-step labels [N, T] (checkpoint has per-sequence"),
    (lambda p: with_labels_up_to(p, 5), "has labels from 0 to 5, but the checkpoint's model has 3 classes"),
    (lambda p: write(p, "n.pkl", num_test=0), "has no test split"),
], ids=["feature-dim", "seq-len", "label-kind", "classes", "no-test-split"])
def test_data_that_does_not_fit_the_checkpoint_exits_2_with_one_line_and_writes_nothing(
        scored: tuple[Path, Path], tmp_path: Path, make_data, message: str) -> None:
    data = make_data(tmp_path)
    result = run_in_process(main, ["--checkpoint", str(scored[1]), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_is_not_there_exits_2(tmp_path: Path) -> None:
    result = run_in_process(main, ["--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "d.pkl")])
    assert result.returncode == 2 and result.stderr == f"error: --checkpoint {tmp_path / 'none.pt'}: nothing there\n"


def test_the_confusion_png_shows_the_matrix(tmp_path: Path) -> None:
    from raytrain_app.observability.evaluation_report import confusion_png

    image = Image.open(io.BytesIO(confusion_png([[3, 1], [0, 4]], "t")))
    assert image.format == "PNG" and json.loads(image.text["Description"]) == [[3, 1], [0, 4]]


def test_the_python_api_scores_as_the_command_and_returns_the_report(
        scored: tuple[Path, Path], tmp_path: Path) -> None:
    import raytrain_app as rt

    data, checkpoint = scored
    report = rt.score(str(checkpoint), str(data), out=str(tmp_path / "eval"), batch_size=BATCH)
    assert report == json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = expected_scores(checkpoint, data)
    assert {k: report[k] for k in expected} == expected
