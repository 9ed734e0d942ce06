"""A checkpoint's model for using it: the weights and the settings that build them, from anything
`--resume-from-checkpoint` accepts (a .pt file, a checkpoint folder, a run folder meaning its best checkpoint;
local paths or URIs), verified. A sharded checkpoint's shards are gathered into this one process."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from raytrain_app.checkpoint.format import CheckpointError, load_state
from raytrain_app.checkpoint.resolve import parent_location, resolve_checkpoint
from raytrain_app.checkpoint.sharded import read_full_weights
from raytrain_app.core.config import TrainConfig
from raytrain_app.storage.location import Location


@dataclass
class TrainedModel:
    """What a model trained by this service needs to run: its weights (input statistics included) and config."""

    cfg: TrainConfig
    weights: dict[str, torch.Tensor]
    source: Location  # the state file it was read from
    global_step: int

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model, weights loaded, in eval mode on `device`."""
        from raytrain_app.core.model import SequenceTransformer

        model = SequenceTransformer(self.cfg)
        model.load_state_dict(self.weights)
        return model.to(device).eval()


def resolve_state_file(where: str, flag: str, verify: bool = True) -> Location:
    found = resolve_checkpoint(where, flag=flag, verify=verify)
    if found is None:
        raise CheckpointError(f"{flag} {where}: nothing there")
    return found


def read_weights(state_file: Location, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole weights of a checkpoint whose state (`load_state`) is `state`."""
    if "sharded" in state:  # gathered here from every worker's shard: this process holds the whole weights
        with parent_location(state_file).local_copy() as checkpoint_dir:
            return read_full_weights(f"{checkpoint_dir}/{state['sharded']['dir']}", state["model_shapes"])
    return {k: v.contiguous() for k, v in state["model_state_dict"].items()}


def load_trained_model(where: str, flag: str = "--checkpoint") -> TrainedModel:
    """The model of the checkpoint at `where`, for evaluation and prediction (CheckpointError: one line)."""
    from raytrain_app.core.model import arch_from_shapes

    state_file = resolve_state_file(where, flag)
    state = load_state(state_file)
    weights = read_weights(state_file, state)
    known = {f.name for f in fields(TrainConfig)}
    # Settings this version knows (a file from another tool may hold others), the shapes from the weights.
    config = {k: v for k, v in (state.get("config") or {}).items() if k in known}
    config.update(arch_from_shapes({k: tuple(v.shape) for k, v in weights.items()}))
    if "per_step" not in (state.get("config") or {}):
        raise CheckpointError(f"{flag} {where}: the checkpoint does not say whether it predicts a class per "
                              "sequence or per step (no config); it was not written by raytrain_app")
    cfg = TrainConfig.from_dict(config, source=f"{flag} {where}")
    return TrainedModel(cfg=cfg, weights=weights, source=state_file, global_step=int(state.get("global_step") or 0))
