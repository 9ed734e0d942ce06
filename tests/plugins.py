"""Model specs that go wrong in the ways a user's own can, for the one-line refusals (tests/unit/test_bad_inputs.py):
named on the command line as `tests.plugins:<name>`, like any plug-in."""

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


broken_build = ModelSpec(build=_raises)
rejects_shape = ModelSpec(build=_flattening)
wrong_outputs = ModelSpec(build=_one_output)
not_a_spec = "a string"
