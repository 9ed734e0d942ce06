"""Model and optimizer state in any layout: sharded checkpoints (torch.distributed.checkpoint), and moving state
between a full state file and a sharded model, or between sharded layouts (resharding).

A sharded checkpoint (--strategy fsdp) holds the weights and AdamW moments in `shards/`, written by every worker
with torch.distributed.checkpoint (DCP): worker r writes `__r_0.distcp`, the part of each tensor it holds, and
rank 0 `.metadata`, where every piece of every tensor lives. Only tensors go into DCP: it reads any other value
with pickle, and a checkpoint must never run code. The optimizer's param_groups (numbers) go into the small
state.pt beside it, with the counters and the config.

Loading goes through DCP's planner, which reads for each tensor of the model being loaded exactly the pieces it
needs: a checkpoint from 2 workers loads into 1 or 4, into a sharded model or a whole one (DDP), and no
process ever holds more than its own part (a whole model: its whole copy). A full state file loads into a
sharded model by each worker taking its slice of the (memory-mapped) tensors.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint is imported in the functions that use it: with the DTensor code it pulls in, it
# costs every process that imports it 0.7 s, and a DDP run's processes never need it.


# --- what a sharded checkpoint holds ------------------------------------------------------------------------
def sharded_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """(the tensors DCP writes: {"model": {fqn: tensor}, "optimizer": {fqn: {"step", "exp_avg", ...}}}, the
    optimizer's param_groups keyed by parameter name). Under FSDP the tensors are DTensor shards: nothing is
    gathered. Every worker calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, values in osd["state"].items():
        others = [k for k, v in values.items() if not isinstance(v, torch.Tensor)]
        if others:  # AdamW (fused) keeps tensors only; anything else would need pickle to load
            raise TypeError(f"optimizer state {fqn}.{others[0]} is not a tensor: it cannot go into a checkpoint")
    return {"model": msd, "optimizer": osd["state"]}, osd["param_groups"]


def model_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every weight's full shape by name, from the module itself: a DTensor knows its global shape."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


class ShardStager:
    """Writes a worker's shards in the background, one checkpoint after another (one per worker)."""

    def __init__(self, group: Any) -> None:
        """`group`: a gloo group for the write's own collectives, so that they never interleave with training's."""
        self.group = group

    def stage(self, tensors: dict[str, Any], shards_dir: str) -> Future:
        """Copy this worker's shards to host memory now (DCP's FileSystemWriter stages before returning) and
        write them to `shards_dir` in a background thread; the future is done once every worker's part and rank
        0's .metadata are written."""
        import torch.distributed.checkpoint as dcp

        os.makedirs(shards_dir, exist_ok=True)
        return dcp.async_save(tensors, storage_writer=dcp.FileSystemWriter(shards_dir, thread_count=1),
                              process_group=self.group)


def save_shards(tensors: dict[str, Any], shards_dir: str, group: Any = None) -> None:
    """Write this worker's shards to `shards_dir` and return once every worker's are written (tools, tests)."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(shards_dir, exist_ok=True)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(shards_dir, thread_count=1), process_group=group)


# --- loading into whatever layout this run has ----------------------------------------------------------------
def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, shards_dir: str,
                 param_groups: list[dict] | None) -> None:
    """Load a sharded checkpoint's weights (and, given an optimizer, its moments) into `model`, sharded or not,
    on any number of workers. Every worker calls it (DCP plans the reads together)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    stored = dcp.FileSystemReader(shards_dir).read_metadata().state_dict_metadata
    # Input statistics absent from checkpoints written before normalisation: the model loads them as none.
    target: dict[str, Any] = {"model": {k: v for k, v in get_model_state_dict(model).items()
                                        if f"model.{k}" in stored}}
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)  # initialises empty AdamW state to load into
        target["optimizer"] = osd["state"]
    dcp.load(target, storage_reader=dcp.FileSystemReader(shards_dir), planner=None)
    set_model_state_dict(model, target["model"])
    if optimizer is not None:
        groups = [dict(g) for g in param_groups] if param_groups else osd["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": target["optimizer"], "param_groups": groups})


def load_full_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None) -> None:
    """Load a full state (a DDP checkpoint's state.pt, best_model.pt) into a sharded model: each worker keeps
    its slice of every tensor. `optimizer_state` is torch's own format (parameters by index)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optimizer_state:
        by_name = optimizer_state_by_name(optimizer_state, parameter_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter in the optimizer's order (torch's state_dict numbers them in this order)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's optimizer state_dict (parameters numbered) with parameters named instead."""
    return {"state": {names[int(i)]: dict(v) for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `optimizer_state_by_name`: the format `torch.optim.Optimizer.load_state_dict` takes."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[k]: dict(v) for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


# --- one consolidated file ----------------------------------------------------------------------------------
def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
                      ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(weights, optimizer state in torch's own format) gathered whole into rank 0's host memory, one tensor at a
    time (each all-gathered on the device, copied to the host, freed); (None, None) on the other ranks.
    Collective. `optimizer=None`: weights only."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = None
    if optimizer is not None:
        by_name = get_optimizer_state_dict(model, optimizer, options=options)
        optimizer_state = by_name and optimizer_state_by_index(by_name, parameter_names(model, optimizer))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return None, None
    return weights, optimizer_state


def read_full_weights(shards_dir: str, shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Every weight of a sharded checkpoint, whole, in this one process (fp32: FSDP keeps parameters in fp32)."""
    import torch.distributed.checkpoint as dcp

    target = {"model": {name: torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=dcp.FileSystemReader(shards_dir), no_dist=True)
    return target["model"]


def read_full_state(shards_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint (weights `model.<name>`, moments `optimizer.<name>.<key>`), whole, in
    this one process: for tools and tests that compare checkpoints."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(shards_dir).read_metadata().state_dict_metadata
    target = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in metadata.items()
              if hasattr(meta, "size")}  # tensors only: DCP would unpickle anything else
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=dcp.FileSystemReader(shards_dir), no_dist=True)
    return target
