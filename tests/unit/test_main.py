"""The driver's checks before any worker starts: architecture from the checkpoint, and what cannot fit."""

from __future__ import annotations

import pytest

from raytrain_app.checkpoint.fit import check_weights_fit, fit_to_checkpoint
from raytrain_app.checkpoint.resolve import StateSummary
from raytrain_app.cli.preflight import start_position
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.model import SequenceTransformer

DATA_SHAPE = dict(feature_dim=4, seq_len=8, num_classes=3)


def summary_of(cfg: TrainConfig, *, config: dict | None = None, epoch: int = 2, position: dict | None = None):
    return StateSummary(
        path="ckpt.pt", epoch=epoch, global_step=32, best_val_loss=0.5, train_ema_loss=0.6,
        config=cfg.to_dict() if config is None else config, has_optimizer=True, has_scaler=False,
        data_position=position,
        model_shapes={k: tuple(v.shape) for k, v in SequenceTransformer(cfg).state_dict().items()},
    )


def saved_cfg(**overrides: object) -> TrainConfig:
    return TrainConfig(**{"hidden_dim": 16, "num_layers": 3, "num_heads": 2, **DATA_SHAPE, **overrides})


def test_architecture_flags_not_given_come_from_the_checkpoint() -> None:
    current = TrainConfig(**DATA_SHAPE, lr=1e-5)  # default hidden/layers/heads, none given
    fitted = fit_to_checkpoint(current, {"lr"}, summary_of(saved_cfg()), num_classes_given=True)
    assert (fitted.hidden_dim, fitted.num_layers, fitted.num_heads, fitted.lr) == (16, 3, 2, 1e-5)


def test_architecture_read_from_weights_when_the_file_has_no_config() -> None:
    summary = summary_of(saved_cfg(), config={})
    fitted = fit_to_checkpoint(TrainConfig(**DATA_SHAPE, num_heads=2), {"num_heads"}, summary,
                               num_classes_given=True)
    assert (fitted.hidden_dim, fitted.num_layers) == (16, 3)
    check_weights_fit(fitted, summary)


def test_given_flags_that_differ_are_all_named() -> None:
    with pytest.raises(UserError, match=r"--hidden-dim 32 \(checkpoint has 16\); --num-layers 2 \(checkpoint has 3\)"):
        fit_to_checkpoint(TrainConfig(**DATA_SHAPE, hidden_dim=32, num_layers=2), {"hidden_dim", "num_layers"},
                          summary_of(saved_cfg()), num_classes_given=True)


@pytest.mark.parametrize(("data", "message"), [
    ({"feature_dim": 5}, r"dataset feature dimension 5 \(checkpoint has 4\)"),
    ({"seq_len": 9}, r"dataset sequence length 9 \(checkpoint has 8\)"),
    ({"num_classes": 4}, r"dataset class count 4 \(checkpoint has 3\)"),
    ({"per_step": True}, r"dataset has per-step labels \[N, T\] \(checkpoint has per-sequence labels \[N\]\)"),
])
def test_data_that_does_not_fit_the_checkpoint(data: dict, message: str) -> None:
    current = TrainConfig(**{**DATA_SHAPE, **data})
    with pytest.raises(UserError, match=message):
        fit_to_checkpoint(current, set(), summary_of(saved_cfg()), num_classes_given=False)


def test_data_using_fewer_classes_keeps_the_checkpoints_head() -> None:
    current = TrainConfig(**{**DATA_SHAPE, "num_classes": 2})  # labels 0..1 seen, count not stated
    assert fit_to_checkpoint(current, set(), summary_of(saved_cfg()), num_classes_given=False).num_classes == 3
    with pytest.raises(UserError, match="class count 2"):
        fit_to_checkpoint(current, set(), summary_of(saved_cfg()), num_classes_given=True)


def test_weights_of_another_model_are_refused() -> None:
    summary = summary_of(saved_cfg())
    summary.model_shapes = {"encoder.weight": (3, 3)}
    with pytest.raises(UserError, match="holds a different model .*missing .*unexpected encoder.weight"):
        check_weights_fit(saved_cfg(), summary)


def test_start_position_mid_epoch() -> None:
    cfg = saved_cfg()
    assert start_position(None) == (0, 0)
    assert start_position(summary_of(cfg, epoch=2, position={"epoch": 2, "batch_index": 5})) == (2, 5)
    assert start_position(summary_of(cfg, epoch=2, position={"epoch": 1, "batch_index": 5})) == (2, 0)
