"""Training-time augmentation, deterministic in (seed, epoch, rank, batch)."""

from __future__ import annotations

import torch

from raytrain_app.datasets.order import seeded_generator


def augment(x: torch.Tensor, noise_std: float, *, seed: int, epoch: int, rank: int, batch_index: int) -> torch.Tensor:
    """Gaussian feature noise from a generator keyed by the batch's position, so resume reproduces it."""
    if noise_std == 0.0:
        return x
    g = seeded_generator(seed, epoch, rank, batch_index)
    return x + noise_std * torch.randn(x.shape, generator=g, dtype=x.dtype)

