"""The Transformer's heads and shapes."""

from __future__ import annotations

import torch

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer, loss_fn


def tiny(per_step: bool) -> TrainConfig:
    return TrainConfig(hidden_dim=8, num_layers=2, num_heads=2, feature_dim=3, seq_len=5, num_classes=4,
                       per_step=per_step)


def test_per_sequence_head() -> None:
    logits = SequenceTransformer(tiny(False))(torch.randn(6, 5, 3))
    assert logits.shape == (6, 4)


def test_per_step_head_and_loss() -> None:
    model = SequenceTransformer(tiny(True))
    logits = model(torch.randn(6, 5, 3))
    assert logits.shape == (6, 5, 4)
    loss = loss_fn(logits, torch.randint(0, 4, (6, 5)))
    loss.backward()
    assert loss.item() > 0 and model.input_proj.weight.grad is not None


def test_eval_is_deterministic_and_dropout_only_in_training() -> None:
    cfg = tiny(False).replace(dropout=0.5)
    model = SequenceTransformer(cfg)
    x = torch.randn(4, 5, 3)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
