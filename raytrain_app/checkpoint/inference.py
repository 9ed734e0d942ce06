"""A checkpoint's model for using it: the weights and the settings that build them, from anything
`--resume-from-checkpoint` accepts (a .pt file, a checkpoint folder, a run folder meaning its best checkpoint;
local paths or URIs), verified. A sharded checkpoint's shards are gathered into this one process. And what
`python -m raytrain_app.predict` does with such a model to a batch (`score_table`): plain PyTorch and Arrow, so
that it runs without Ray too (a unit test, benchmarks/gpu_check.py on a machine that has no Ray)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raytrain_app.checkpoint.format import CheckpointError, load_state
from raytrain_app.checkpoint.resolve import parent_location, resolve_checkpoint
from raytrain_app.checkpoint.sharded import read_full_weights
from raytrain_app.core.config import CLASSIFICATION, TrainConfig
from raytrain_app.core.model_spec import BUILTIN
from raytrain_app.datasets.prediction_input import ERROR, ID, ROW, X
from raytrain_app.storage.location import Location

PREDICTED, PROBABILITIES = "predicted", "probabilities"  # the output columns score_table adds (a classifier both)


@dataclass
class TrainedModel:
    """What a model trained by this service needs to run: its weights (input statistics included) and config."""

    cfg: TrainConfig
    weights: dict[str, torch.Tensor]
    source: Location  # the state file it was read from
    global_step: int

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model, weights loaded, in eval mode on `device` (its spec imported: SpecError, one line, when the
        user's module is not importable here)."""
        from raytrain_app.core.model_spec import build_model

        model = build_model(self.cfg)
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
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state["model_state_dict"].items()}


def load_trained_model(where: str, flag: str = "--checkpoint") -> TrainedModel:
    """The model of the checkpoint at `where`, for evaluation and prediction (CheckpointError: one line)."""
    from raytrain_app.core.model import arch_from_shapes

    state_file = resolve_state_file(where, flag)
    state = load_state(state_file)
    weights = read_weights(state_file, state)
    config = _known_settings(state.get("config") or {})
    if (config.get("model") or BUILTIN) == BUILTIN:  # the built-in's shapes, from its weights
        config.update(arch_from_shapes({k: tuple(v.shape) for k, v in weights.items()}))
    if "per_step" not in (state.get("config") or {}):
        raise CheckpointError(f"{flag} {where}: the checkpoint does not say whether it predicts a class per "
                              "sequence or per step (no config); it was not written by raytrain_app")
    cfg = TrainConfig.from_dict(config, source=f"{flag} {where}")
    return TrainedModel(cfg=cfg, weights=weights, source=state_file, global_step=int(state.get("global_step") or 0))


def load_exported_model(where: str) -> TrainedModel:
    """The model of a safetensors file written by `python -m raytrain_app.ckpt export` (the settings that build
    it are in its metadata), local or a URI."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from raytrain_app.storage.location import parse_location

    location = parse_location(where, flag="model file")
    if not location.is_file():
        raise CheckpointError(f"{where}: no such file")
    with location.local_copy() as path:
        try:
            weights = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line naming it
            raise CheckpointError(f"{where}: not a safetensors file written by raytrain_app.ckpt export ({e})"
                                  ) from None
    if "config" not in metadata:
        raise CheckpointError(f"{where}: its metadata has no config (it was not written by raytrain_app.ckpt export)")
    config = _known_settings(json.loads(metadata["config"]))
    return TrainedModel(cfg=TrainConfig.from_dict(config, source=where), weights=weights, source=location,
                        global_step=int(metadata.get("global_step") or 0))


def _known_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings this version knows (a file from another tool, or a later version, may hold others)."""
    known = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in config.items() if k in known}


def score_table(model: torch.nn.Module, table: pa.Table, cfg: TrainConfig,
                device: torch.device | str = "cpu") -> pa.Table:
    """The output rows of a decoded input table (`raytrain_app.datasets.prediction_input`): the model applied to
    every row whose x is not null, the others passed through with their error. A classifier's rows get
    `predicted` (the argmax) and `probabilities` (the softmax); a regression model's get `predicted`, its output
    as float32, and no probabilities."""
    from raytrain_app.core.model_spec import data_shape

    input_shape = data_shape(cfg).input_shape
    x_column = table.column(X).combine_chunks()
    scored = x_column.is_valid().to_numpy(zero_copy_only=False)
    # flatten() leaves out null rows: the values of the scored rows only, in order. A copy: Arrow's buffers are
    # read-only, and torch wants to own what it reads.
    x = np.array(x_column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    x = torch.from_numpy(x.reshape(-1, *input_shape))
    steps = (input_shape[0],) if cfg.per_step else ()
    classes = (cfg.num_classes,) if cfg.task == CLASSIFICATION else ()
    with torch.inference_mode():
        outputs = model(x.to(device)).float() if len(x) else torch.zeros((0, *steps, *classes))
        if cfg.task == CLASSIFICATION:
            columns = {PREDICTED: _per_row(outputs.argmax(dim=-1).cpu().numpy(), scored, steps),
                       PROBABILITIES: _per_row(torch.softmax(outputs, dim=-1).cpu().numpy(), scored, steps, flat=True)}
        else:
            columns = {PREDICTED: _per_row(outputs.cpu().numpy(), scored, steps)}
    ids = [ID] if ID in table.column_names else []
    names = [ROW, *ids, *columns, ERROR]
    return pa.Table.from_arrays([table.column(ROW), *(table.column(i) for i in ids), *columns.values(),
                                 table.column(ERROR)], names=names)


def _per_row(values: np.ndarray, scored: np.ndarray, steps: tuple[int, ...], flat: bool = False) -> pa.Array:
    """An output column of every input row from `values` of the scored rows (null for the others): a scalar per
    row, or a fixed-size list per row of its `steps` values (`flat`: of all its values, row-major)."""
    n, rejected = len(scored), pa.array(~scored)
    per_row = int(np.prod(values.shape[1:], dtype=np.int64))
    if not steps and not flat:
        full = np.zeros(n, dtype=values.dtype)
        full[scored] = values
        return pa.array(full, mask=~scored)
    full = np.zeros((n, per_row), dtype=values.dtype)
    full[scored] = values.reshape(len(values), per_row)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), per_row, mask=rejected)
