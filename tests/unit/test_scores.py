"""Validation accuracy, --select-metric and input normalisation (--normalize), without Ray.

The 2-worker runs are the sharding tests' (tests/distributed.py: the product's loop in 2 gloo processes, the
validation split of 65 rows shared 32/33, so the average across ranks must weigh each sample once)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain_app.checkpoint.format import STATE_FILE, load_state, save_checkpoint_dir
from raytrain_app.checkpoint.resolve import summarize
from raytrain_app.checkpoint.state import restore_training_state, training_state, with_training_state
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer, set_normalization
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.datasets.formats import open_dataset, write_pickle_atomic
from raytrain_app.datasets.normalize import feature_stats
from raytrain_app.datasets.parquet import write_parquet_dataset
from raytrain_app.main import prepare
from tests.distributed import train_all
from tests.helpers import synthetic

SCALE = np.array([1.0, 10.0, 100.0, 0.1], dtype=np.float32)
SHIFT = np.array([5.0, -3.0, 0.0, 1000.0], dtype=np.float32)


@pytest.fixture(scope="session")
def runs(gloo_runs: Path) -> Path:
    return gloo_runs


def scores_in_process(state: dict, data_path: Path) -> tuple[float, int, int]:
    """(summed loss, correct predictions, labels) of the state's weights over the whole validation split, in one
    batch in this process."""
    cfg = TrainConfig.from_dict(state["config"])
    model = SequenceTransformer(cfg)
    model.load_state_dict(state["model_state_dict"])
    model.eval()
    x, y = open_dataset(str(data_path)).val.read_rows(0, 65)
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="sum").item()
    return loss, int((logits.argmax(-1) == y).sum()), y.numel()


@pytest.mark.parametrize(("run", "data", "labels"), [("ddp2", "data.pkl", 65), ("ddp2-per-step", "per-step.pkl", 520)])
def test_validation_accuracy_on_2_workers_is_the_saved_weights_accuracy(runs: Path, run: str, data: str,
                                                                        labels: int) -> None:
    accuracies = []
    for folder in sorted((runs / run).glob("checkpoint_step=*")):
        meta = json.loads((folder / "meta.json").read_text())
        loss, correct, count = scores_in_process(load_state(str(folder / STATE_FILE)), runs / data)
        assert count == labels
        assert meta["eval_val_accuracy"] == correct / count, folder.name  # every label counted once
        assert meta["eval_val_loss"] == pytest.approx(loss / count, rel=1e-5), folder.name
        accuracies.append(meta["eval_val_accuracy"])
    assert len(accuracies) == 5 and 0 < min(accuracies) and len(set(accuracies)) > 1  # not a constant
    assert meta["best_val_accuracy"] == max(accuracies)


def test_select_metric_val_accuracy_marks_the_most_accurate_validations_best() -> None:
    cfg = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, epochs=3,
                      batch_size=16, eval_every=2, warmup_steps=4, num_workers=1, select_metric="val_accuracy")
    seed_everything(cfg.seed, 0)
    model = SequenceTransformer(cfg)
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    seen: list[tuple[float, float, bool]] = []
    trainer.fit(synthetic(num_train=128), with_training_state(trainer, lambda m, s, best: seen.append(
        (m["val_loss"], m["val_accuracy"], best))))
    assert len(seen) == 12
    best_so_far, best_loss = -math.inf, math.inf
    for loss, accuracy, is_best in seen:
        assert is_best == (accuracy > best_so_far)  # strictly better accuracy; the loss plays no part
        best_so_far, best_loss = max(best_so_far, accuracy), min(best_loss, loss)
    # A case that tells the two metrics apart happens in this run: a new lowest loss that is not the best.
    assert any(not is_best and loss < min(s[0] for s in seen[:i]) for i, (loss, _, is_best) in enumerate(seen) if i)
    state = training_state(trainer, None)
    assert state["val_accuracy"] == best_so_far and state["val_loss"] == best_loss


def scaled_dataset(num_train: int = 2500, num_val: int = 64) -> dict:
    """Features with very different scales per channel (and one constant channel in the test split's copy)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((num_train + num_val, 8, 4)).astype(np.float32) * SCALE + SHIFT
    y = rng.integers(0, 3, num_train + num_val)
    return {"train": {"x": x[:num_train], "y": y[:num_train]}, "val": {"x": x[num_train:], "y": y[num_train:]},
            "num_classes": 3}


def test_feature_stats_are_numpys_for_a_pickle_and_its_parquet_copy(tmp_path: Path) -> None:
    raw = scaled_dataset()  # 2500 rows: 3 blocks of up to 1024 rows, combined
    write_pickle_atomic(raw, str(tmp_path / "d.pkl"))
    write_parquet_dataset(str(tmp_path / "pq"), (raw["train"]["x"], raw["train"]["y"]),
                          (raw["val"]["x"], raw["val"]["y"]), 3)
    mean, std = feature_stats(open_dataset(str(tmp_path / "d.pkl")).train)
    x = raw["train"]["x"].astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=(0, 1)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), x.std(axis=(0, 1)), rtol=1e-12)
    streamed = feature_stats(open_dataset(str(tmp_path / "pq")).train)
    assert torch.equal(streamed[0], mean) and torch.equal(streamed[1], std)  # the same bits, streamed
    assert torch.equal(feature_stats(open_dataset(str(tmp_path / "pq")).train)[0], mean)  # and again
    constant = {"train": {"x": np.ones((4, 8, 4), np.float32), "y": np.zeros(4, np.int64)}}
    assert torch.equal(feature_stats(open_dataset_from(constant, tmp_path / "c.pkl").train)[1], torch.ones(4,
                                                                                                      dtype=torch.float64))


def open_dataset_from(raw: dict, path: Path):
    write_pickle_atomic(raw, str(path))
    return open_dataset(str(path))


def test_the_model_standardises_its_inputs_with_the_statistics_in_its_weights() -> None:
    cfg = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, dropout=0.0)
    model = SequenceTransformer(cfg).eval()
    plain = SequenceTransformer(cfg).eval()
    plain.load_state_dict(model.state_dict())
    mean, std = torch.tensor(SHIFT, dtype=torch.float64), torch.tensor(SCALE, dtype=torch.float64)
    set_normalization(model, mean, std)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 8, 4)).astype(np.float32) * SCALE + SHIFT)
    with torch.no_grad():
        assert torch.equal(model(x), plain((x - mean.float()) / std.float()))
    assert set(model.state_dict()) - set(plain.state_dict()) == set()
    assert torch.equal(model.state_dict()["input_std"], std.float())


def test_normalisation_survives_a_resume_and_a_fine_tune_keeps_its_bases(tmp_path: Path, capsys) -> None:
    raw = scaled_dataset(num_train=256)
    write_pickle_atomic(raw, str(tmp_path / "d.pkl"))
    flags = ["--hidden-dim", "16", "--num-layers", "2", "--num-heads", "2", "--num-workers", "1",
             "--save-dir", str(tmp_path / "runs")]
    # A new run: the driver computes the training split's statistics once.
    plan = prepare(["--data", str(tmp_path / "d.pkl"), *flags])
    expected = feature_stats(open_dataset(str(tmp_path / "d.pkl")).train)
    assert plan.cfg.normalize == "standard" and plan.input_stats == (expected[0].tolist(), expected[1].tolist())
    # The checkpoint keeps them; restoring puts them back into a model that was built without them.
    cfg = plan.cfg
    model = SequenceTransformer(cfg)
    set_normalization(model, *plan.input_stats)
    state = training_state(Trainer(cfg, model, model, torch.device("cpu")))
    torch.save(state, tmp_path / "base.pt")
    resumed = Trainer(cfg, SequenceTransformer(cfg), None, torch.device("cpu"))
    resumed.train_model = resumed.model
    restore_training_state(resumed, load_state(str(tmp_path / "base.pt")))
    assert torch.equal(resumed.model.input_mean, expected[0].float())
    assert torch.equal(resumed.model.input_std, expected[1].float())
    # A fine-tune on other data keeps the base's statistics: none are computed for it.
    other = scaled_dataset(num_train=128)
    other["train"]["x"] = other["train"]["x"] * 3
    write_pickle_atomic(other, str(tmp_path / "other.pkl"))
    fork = prepare(["--data", str(tmp_path / "other.pkl"), "--resume-from-checkpoint", str(tmp_path / "base.pt"),
                    "--lr", "1e-4", *flags, "--normalize", "none"])
    assert fork.input_stats is None and fork.cfg.normalize == "standard"
    assert "--normalize none does not apply to a run started from a checkpoint" in capsys.readouterr().out


def test_a_checkpoint_from_before_normalisation_continues_without_it(tmp_path: Path) -> None:
    cfg = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3,
                      num_workers=1)
    model = SequenceTransformer(cfg)
    state = training_state(Trainer(cfg, model, model, torch.device("cpu")))
    for name in ("input_mean", "input_std"):  # what such a checkpoint holds: no statistics, no setting
        del state["model_state_dict"][name]
    del state["config"]["normalize"], state["config"]["select_metric"]
    torch.save(state, tmp_path / "old.pt")
    assert "input_mean" not in summarize_file(tmp_path / "old.pt")
    write_pickle_atomic(scaled_dataset(num_train=64), str(tmp_path / "d.pkl"))
    plan = prepare(["--data", str(tmp_path / "d.pkl"), "--resume-from-checkpoint", str(tmp_path / "old.pt"),
                    "--hidden-dim", "16", "--num-layers", "2", "--num-heads", "2", "--num-workers", "1",
                    "--save-dir", str(tmp_path / "runs")])
    assert plan.cfg.normalize == "none" and plan.input_stats is None
    trainer = Trainer(plan.cfg, SequenceTransformer(plan.cfg), None, torch.device("cpu"))
    trainer.model.input_mean.fill_(7.0)  # whatever it held: loading such a checkpoint makes it the identity
    trainer.train_model = trainer.model
    restore_training_state(trainer, load_state(str(tmp_path / "old.pt")))
    assert torch.equal(trainer.model.input_mean, torch.zeros(4)) and torch.equal(trainer.model.input_std,
                                                                                  torch.ones(4))


def summarize_file(path: Path) -> dict:
    from raytrain_app.storage.location import parse_location

    return summarize(parse_location(str(path))).model_shapes


def test_a_checkpoint_from_before_normalisation_loads_into_fsdp_without_statistics(runs: Path, tmp_path: Path) -> None:
    """The same through a sharded model (FSDP takes a full state by keys; what the state lacks it keeps), in a
    real gloo process: the model held other statistics before the restore, and has none after it."""
    state = load_state(str(runs / "ddp2" / "checkpoint_step=000005" / STATE_FILE))
    for name in ("input_mean", "input_std"):
        del state["model_state_dict"][name]
    save_checkpoint_dir(str(tmp_path / "old"), state)
    cfg = {**state["config"], "strategy": "fsdp", "epochs": 1}
    result = train_all(tmp_path / "runs", {"fsdp1": {"config": cfg, "resume": tmp_path / "old", "input_mean": 7.0}},
                       world_size=1)["fsdp1"]
    assert torch.equal(result["weights"]["input_mean"], torch.zeros(4))
    assert torch.equal(result["weights"]["input_std"], torch.ones(4))
    assert sorted(result["losses"]) == [6, 7, 8]  # and it trained on from the checkpoint's step 5
