"""Model specs that go wrong in the ways a user's own can, for the one-line refusals (tests/unit/test_bad_inputs.py),
and a tiny regression model (tests/unit/test_regression_scoring.py): named on the command line as
`tests.plugins:<name>`, like any plug-in."""

from __future__ import annotations

import torch
from torch import nn

from raytrain_app import DataShape, ModelSpec


def _raises(shape: DataShape, args: None, dropout: float) -> nn.Module:
    raise RuntimeError("out of ideas")


def _flattening(shape: DataShape, args: None, dropout: float) -> nn.Module:
    """Flattens 16 steps of 4 features: any other sequence length is rejected by its first layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 4, shape.num_classes))


def _one_output(shape: DataShape, args: None, dropout: float) -> nn.Module:
    """One number per sequence: a regression head, not the class scores a classification model gives."""
    return nn.Sequential(nn.Flatten(), nn.Linear(torch.Size(shape.input_shape).numel(), 1))


class _Regressor(nn.Module):
    """A value per sample (an MLP over the whole input, flattened) or per step (the same MLP on the running mean
    of the features up to each step): outputs [B] or [B, T], the targets' shape."""

    def __init__(self, shape: DataShape) -> None:
        super().__init__()
        self.per_step = shape.per_step
        width = shape.input_shape[-1] if shape.per_step else torch.Size(shape.input_shape).numel()
        self.net = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_step:
            steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
            return self.net(x.cumsum(1) / steps.view(1, -1, 1)).squeeze(-1)
        return self.net(x.flatten(1)).squeeze(-1)


broken_build = ModelSpec(build=_raises)
rejects_shape = ModelSpec(build=_flattening)
wrong_outputs = ModelSpec(build=_one_output)
not_a_spec = "a string"
regressor = ModelSpec(build=lambda shape, args, dropout: _Regressor(shape), task="regression")
