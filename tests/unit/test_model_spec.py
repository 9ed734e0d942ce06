"""The model plug-in point (`raytrain_app.core.model_spec`): a user's spec trains, checkpoints and resumes with the
bits of an uninterrupted run in this process, activation checkpointing changes nothing, and checkpoints written
before models were pluggable are the built-in model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.fit import fit_to_checkpoint
from raytrain_app.checkpoint.format import load_state, save_checkpoint_dir
from raytrain_app.checkpoint.inference import load_trained_model
from raytrain_app.checkpoint.resolve import summarize
from raytrain_app.checkpoint.state import restore_training_state, with_training_state
from raytrain_app.core.config import ConfigError, TrainConfig, as_flags, parse_model_args
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.core.model_spec import Standardized, build_model, model_identity
from raytrain_app.core.parallel import parallelize
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.datasets.formats import make_synthetic, open_dataset, write_pickle_atomic
from raytrain_app.storage.location import parse_location
from tests.helpers import CKPT_CFG, PLUGIN, trained_state

ARGS = {"channels": 8, "num_blocks": 2}


def plugin_config(data: Path, **changes: object) -> TrainConfig:
    values = dict(data=str(data), model=PLUGIN, model_args=ARGS, feature_dim=4, seq_len=8, num_classes=3,
                  batch_size=16, eval_every=5, epochs=2, num_workers=1, warmup_steps=2)
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.pkl"
    write_pickle_atomic(make_synthetic(num_train=96, num_val=32, seq_len=8, feature_dim=4, num_classes=3,
                                       per_step=False, seed=0), str(path))
    return path


def trainer_for(cfg: TrainConfig) -> Trainer:
    seed_everything(cfg.seed, 0)
    model = build_model(cfg)
    return Trainer(cfg, model, parallelize(cfg, model, torch.device("cpu"), 1), torch.device("cpu"))


def test_a_plugin_resumed_from_a_checkpoint_ends_with_the_bits_of_an_uninterrupted_run(
        data: Path, tmp_path: Path) -> None:
    cfg = plugin_config(data)
    dataset = open_dataset(str(data))
    straight = trainer_for(cfg)
    saved: list[dict] = []

    def save_epoch_1(metrics: dict, state: dict, is_best: bool) -> None:
        if state["epoch"] == 1 and state["data_position"]["batch_index"] == 0:  # epoch 1's end, written now
            save_checkpoint_dir(str(tmp_path / "ckpt"), state)
            saved.append(state["config"])

    assert straight.fit(dataset, with_training_state(straight, save_epoch_1))
    assert isinstance(straight.model, Standardized)
    assert saved[0]["model"] == PLUGIN and saved[0]["model_args"] == ARGS

    resumed = trainer_for(cfg)
    restore_training_state(resumed, load_state(str(tmp_path / "ckpt" / "state.pt")))
    assert resumed.fit(dataset, lambda *a: None) and resumed.global_step == straight.global_step
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_activation_checkpointing_of_a_plugins_shard_units_changes_nothing(data: Path) -> None:
    dataset = open_dataset(str(data))
    plain = trainer_for(plugin_config(data, epochs=1, dropout=0.2))
    plain.fit(dataset, lambda *a: None)
    recomputed = trainer_for(plugin_config(data, epochs=1, dropout=0.2, activation_checkpointing=True))
    assert recomputed.model.net.blocks[0].forward.__name__ == "recomputed"  # the units are the spec's blocks
    recomputed.fit(dataset, lambda *a: None)
    for a, b in zip(plain.model.parameters(), recomputed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_from_before_models_were_pluggable_is_the_built_in_model(tmp_path: Path) -> None:
    state = trained_state()
    for key in ("model", "model_args"):  # what a config written before --model existed lacks
        del state["config"][key]
    save_checkpoint_dir(str(tmp_path / "old"), state)
    summary = summarize(parse_location(str(tmp_path / "old" / "state.pt")))
    cfg = fit_to_checkpoint(TrainConfig(feature_dim=CKPT_CFG.feature_dim, seq_len=CKPT_CFG.seq_len,
                                        num_classes=CKPT_CFG.num_classes), set(), summary, num_classes_given=True)
    assert (cfg.model, cfg.hidden_dim) == ("transformer", CKPT_CFG.hidden_dim)
    assert model_identity(state["config"]) == {"spec": "transformer", "args": {
        "hidden_dim": CKPT_CFG.hidden_dim, "num_layers": CKPT_CFG.num_layers, "num_heads": CKPT_CFG.num_heads}}
    model = load_trained_model(str(tmp_path / "old")).build()
    assert type(model) is SequenceTransformer
    assert all(torch.equal(t, state["model_state_dict"][k]) for k, t in model.state_dict().items())


def test_model_args_read_as_pairs_or_json_and_print_back_as_pairs() -> None:
    assert parse_model_args("channels=16, act=gelu,deep=true,rate=0.5") == {
        "channels": 16, "act": "gelu", "deep": True, "rate": 0.5}
    assert parse_model_args('{"channels": 16, "sizes": [1, 2]}') == {"channels": 16, "sizes": [1, 2]}
    with pytest.raises(ConfigError, match="give key=value pairs"):
        parse_model_args("channels")
    values = TrainConfig(model=PLUGIN, model_args="channels=16,act=gelu").to_dict()
    assert "--model-args channels=16,act=gelu" in as_flags(values) and "--hidden-dim" not in as_flags(values)


class WithVocabulary(torch.nn.Module):
    """A model with state that is not a tensor (PyTorch's get_extra_state): what docs/own-model.md says is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.vocabulary: list[str] = []

    def get_extra_state(self) -> dict:
        return {"vocabulary": list(self.vocabulary)}

    def set_extra_state(self, state: dict) -> None:
        self.vocabulary = list(state["vocabulary"])


def test_a_models_extra_state_goes_into_checkpoints_and_back(tmp_path: Path) -> None:
    model = Standardized(WithVocabulary(), num_features=4)
    model.net.vocabulary = ["cat", "dog"]
    save_checkpoint_dir(str(tmp_path / "ckpt"), {"epoch": 1, "global_step": 2, "val_loss": 0.5,
                                                 "model_state_dict": model.state_dict()})
    loaded = Standardized(WithVocabulary(), num_features=4)
    loaded.load_state_dict(load_state(str(tmp_path / "ckpt" / "state.pt"))["model_state_dict"])  # weights_only
    assert loaded.net.vocabulary == ["cat", "dog"]
    assert torch.equal(loaded.net.linear.weight, model.net.linear.weight)
