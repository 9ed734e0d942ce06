"""How the model is spread over the workers (--strategy): DDP replicas or FSDP2 shards. Plain torch.distributed.

`strategy_for(cfg)` chooses, once, the `Strategy` that owns what differs between the two: wrapping the model
(`parallelize`), skipping gradient synchronisation while accumulating, the gradient norm (a sharded one is a
DTensor), and evaluation (FSDP all-gathers each block's weights in forward, so every rank must run the same number
of forwards). The Trainer asks it instead of asking which strategy runs; how each one's state is taken into a
checkpoint and restored is `raytrain_app.checkpoint.state`'s (keyed by `Strategy.name`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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
    """Apply --activation-checkpointing, --compile and --strategy to `model` (already on `device`): the module
    training runs forward through (see `Strategy.parallelize`)."""
    return strategy_for(cfg).parallelize(model, device, world_size)


def strategy_for(cfg: TrainConfig) -> Strategy:
    """The strategy --strategy names."""
    return STRATEGIES[cfg.strategy](cfg)


class Strategy:
    """What differs between DDP and FSDP. `sharded`: every worker holds (and checkpoints) only its shard of the
    parameters, gradients and optimizer state, as DTensors."""

    name = ""
    sharded = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def parallelize(self, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
        """Apply --activation-checkpointing, --compile and this strategy to `model` (already on `device`)."""
        if self.cfg.activation_checkpointing:
            for unit in units(self.cfg, model):
                checkpoint_activations(unit)
        return self._wrap(model, device, world_size)

    def _wrap(self, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
        raise NotImplementedError

    def gradient_sync(self, train_model: nn.Module, sync: bool) -> AbstractContextManager:
        """A context in which backward synchronises gradients across workers or not (gradient accumulation: only
        the last micro-batch of a step does)."""
        raise NotImplementedError

    def global_value(self, t: torch.Tensor) -> torch.Tensor:
        """The value across every worker of a reduction over the parameters (the gradient norm)."""
        return t

    def eval_padding(self, forwards: int, most: int) -> int:
        """How many forwards whose output is not used a rank runs after its `forwards` of an evaluation, when the
        rank with the largest share runs `most`."""
        return 0


class DDPStrategy(Strategy):
    """Every worker holds the whole model and optimizer; backward all-reduces the gradients."""

    name = "ddp"

    def _wrap(self, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
        """The model (compiled as a whole), wrapped in DDP when there is more than one worker, its gradients
        views into DDP's communication buckets (no copy between them), all-reduced in fp32 or, with
        --grad-compression bf16, in bf16."""
        train_model: nn.Module = torch.compile(model) if self.cfg.compile else model
        if world_size == 1:
            return train_model
        ddp = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True,
                                      # The only buffers are the input statistics, constant and equal on every
                                      # rank: nothing to broadcast before every forward.
                                      forward_sync_buffers=False)
        if self.cfg.grad_compression == "bf16":
            ddp.register_comm_hook(None, all_reduce_in_bf16)
        return ddp

    def gradient_sync(self, train_model: nn.Module, sync: bool) -> AbstractContextManager:
        """DDP's `no_sync()` (one worker, no DDP: nothing to synchronise)."""
        if isinstance(train_model, DistributedDataParallel) and not sync:
            return train_model.no_sync()
        return nullcontext()


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


class FSDPStrategy(Strategy):
    """Parameters, gradients and optimizer state sharded over all workers (FSDP2)."""

    name = "fsdp"
    sharded = True

    def _wrap(self, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
        """`model` itself becomes an FSDP module: each of its shard units (`ModelSpec.shard_units`: the built-in's
        Transformer blocks; none: the root only), then the root (the built-in's input projection, positions, final
        norm, head), is sharded over all workers (torchtitan's layout: one
        all-gather per unit in forward and backward, freed after use). With --use-amp, parameters are cast to the
        autocast dtype for compute and gradients reduced in fp32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():  # one process, no group (a test, a benchmark): a group of one
            raise RuntimeError("--strategy fsdp needs torch.distributed initialised (Ray Train does this)")
        # Every worker built its model from its own seed; DDP starts from rank 0's weights by broadcasting them,
        # and so does this (FSDP keeps each worker's shard of whatever it built): both strategies start identical.
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        mesh = init_device_mesh(device.type, (world_size,))
        cfg = self.cfg
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype(cfg) if cfg.use_amp else None,
                                      reduce_dtype=torch.float32)
        for unit in units(cfg, model):
            if cfg.compile:
                unit.compile()  # per unit: the same code for every block, compiled once; FSDP's hooks stay eager
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def gradient_sync(self, train_model: nn.Module, sync: bool) -> AbstractContextManager:
        """No reduce-scatter until the last micro-batch."""
        train_model.set_requires_gradient_sync(sync)
        return nullcontext()

    def global_value(self, t: torch.Tensor) -> torch.Tensor:
        """A DTensor's global value: the reduction across every worker's shard."""
        return t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor, without importing it (0.6 s)

    def eval_padding(self, forwards: int, most: int) -> int:
        """Each forward all-gathers the blocks' weights: a rank with a smaller share of the split runs forwards
        whose output is not used, until every rank has run as many."""
        return most - forwards


STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}


def is_sharded(model: nn.Module) -> bool:
    # FSDP's classes are imported only once a model is sharded: importing them costs every process 0.6 s.
    return any(cls.__name__ == "FSDPModule" and cls.__module__.startswith("torch.distributed.fsdp")
               for cls in type(model).__mro__)
