"""The optimizer: AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from raytrain_app.core.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters: matrices decay by --weight-decay, biases and norms not at all (the first
    parameter group is the decayed one; a fine-tune's new --weight-decay is applied to it on restore)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        # Fused on every device: its kernel skips a step flagged non-finite on the device (see Trainer.train_step).
        lr=cfg.lr, betas=(0.9, 0.95), fused=True,
    )
