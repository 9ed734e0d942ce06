"""How the model is spread over the workers (--strategy): DDP replicas or FSDP2 shards. Plain torch.distributed.

`parallelize` returns the module training runs forward through; the Trainer's other code does not change with
the strategy except where the two differ by nature: skipping gradient synchronisation while accumulating, the
gradient norm (a sharded one is a DTensor), and evaluation (FSDP all-gathers each block's weights in forward, so
every rank must run the same number of forwards).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import checkpoint_activations, units


def amp_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of --amp-dtype (autocast, and FSDP's parameters for compute)."""
    return torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16


def parallelize(cfg: TrainConfig, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Apply --activation-checkpointing, --compile and --strategy to `model` (already on `device`).

    ddp: the model (compiled as a whole), wrapped in DDP when there is more than one worker, its gradients
    views into DDP's communication buckets (no copy between them), all-reduced in fp32 or, with
    --grad-compression bf16, in bf16.
    fsdp: `model` itself becomes an FSDP module: each of the model's shard units (the built-in's Transformer
    blocks; `ModelSpec.shard_units`), then the root (the built-in's input projection, positions, final norm,
    head), is sharded over all workers (torchtitan's layout: one all-gather per block in
    forward and backward, freed after use). With --use-amp, parameters are cast to the autocast dtype for compute
    and gradients reduced in fp32."""
    if cfg.activation_checkpointing:
        for unit in units(cfg, model):
            checkpoint_activations(unit)
    if cfg.strategy == "fsdp":
        return _fully_shard(cfg, model, device, world_size)
    train_model: nn.Module = torch.compile(model) if cfg.compile else model
    if world_size == 1:
        return train_model
    ddp = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True,
                                  # The only buffers are the input statistics, constant and equal on every rank:
                                  # nothing to broadcast before every forward.
                                  forward_sync_buffers=False)
    if cfg.grad_compression == "bf16":
        ddp.register_comm_hook(None, all_reduce_in_bf16)
    return ddp


def all_reduce_in_bf16(group, bucket):  # unannotated: DDP checks the annotations, as objects, not strings
    """DDP communication hook: all-reduce a bucket of gradients in bf16 (half the bytes of fp32), then write the
    mean back into the fp32 bucket. PyTorch's own `bf16_compress_hook` refuses any backend but NCCL (by its
    name); this one is the same arithmetic on any backend, gloo on CPU included."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size())
    reduced = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(future: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(future.value()[0])
        return buffer

    return reduced.then(decompress)


def _fully_shard(cfg: TrainConfig, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process, no group (a test, a benchmark): a group of one
        raise RuntimeError("--strategy fsdp needs torch.distributed initialised (Ray Train does this)")
    # Every worker built its model from its own seed; DDP starts from rank 0's weights by broadcasting them, and
    # so does this (FSDP keeps each worker's shard of whatever it built): both strategies start identical.
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype(cfg) if cfg.use_amp else None, reduce_dtype=torch.float32)
    for unit in units(cfg, model):  # the model's shard units (the built-in's blocks); none: the root only
        if cfg.compile:
            unit.compile()  # per unit: the same code for every block, compiled once; FSDP's hooks stay eager
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    # FSDP's classes are imported only once a model is sharded: importing them costs every process 0.6 s.
    return any(cls.__name__ == "FSDPModule" and cls.__module__.startswith("torch.distributed.fsdp")
               for cls in type(model).__mro__)


def set_gradient_sync(train_model: nn.Module, sync: bool) -> object:
    """A context in which backward synchronises gradients across workers or not (gradient accumulation: only
    the last micro-batch of a step does). DDP: `no_sync()`; FSDP: no reduce-scatter until the last."""
    from contextlib import nullcontext

    if is_sharded(train_model):
        train_model.set_requires_gradient_sync(sync)
        return nullcontext()
    if isinstance(train_model, DistributedDataParallel) and not sync:
        return train_model.no_sync()
    return nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a sharded gradient norm: the reduction across workers), a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor, without importing it (0.6 s)
