"""What one worker's GPU will hold, from the config alone: the memory plan `python -m raytrain_app.plan` prints
and `main` checks before any worker starts. Pure arithmetic, no torch allocations.

Per worker, in bytes (P parameters, N workers, B micro-batch, T sequence length, H width, L blocks):
  parameters        4P (fp32); FSDP about 4P/N (each tensor split by rows, the first shards a row longer)
  gradients         4P (fp32; DDP's are views into its communication buckets, no second copy); FSDP about 4P/N
  optimizer state   8P (AdamW's two fp32 moments); FSDP about 8P/N
  activations       what autograd keeps for backward, per block 16 BTH values (the inputs of both norms, q, k, v,
                    the attention output, the MLP's 4H input and GELU output, ...) plus
                    norm statistics and dropout masks; with activation checkpointing only each block's input
                    (BTH) is kept, and one block's activations are rebuilt at a time in backward
  communication     FSDP: two blocks' parameters all-gathered (one in use, one prefetched) in compute dtype and
                    one block's gradients before their reduce-scatter (fp32); DDP with --grad-compression bf16:
                    one 25 MB bucket in bf16
  runtime           the CUDA context and kernels, and a tenth of the GPU left for temporaries and the
                    allocator's fragmentation
The checkpoint's host memory (CPU RAM, not GPU): a DDP checkpoint is copied whole by rank 0 (12P: weights and
moments); an FSDP one by every worker, its shard (12P/N), and best_model.pt gathered on rank 0 (12P, or 4P with
--best-model weights).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.model_spec import BUILTIN, build_model, data_shape, on_meta_device, units

GB = 1e9
CUDA_RUNTIME_BYTES = 1.0 * GB  # context, cuBLAS/cuDNN workspaces, kernels: about this on current GPUs
HEADROOM = 0.10  # of the GPU, for temporaries and fragmentation
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel's default bucket_cap_mb

# GPU memory by the accelerator type Ray reports (ray.util.accelerators), in GB.
GPU_MEMORY_GB = {"H200": 141.0, "H100": 80.0, "A100-80G": 80.0, "A100-40G": 40.0, "A100": 40.0, "L40S": 48.0,
                 "L40": 48.0, "L4": 24.0, "A10G": 24.0, "A10": 24.0, "T4": 16.0, "V100": 16.0, "B200": 192.0}


def parameter_shapes(cfg: TrainConfig) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(the shapes of `core.model.SequenceTransformer`'s parameters outside the blocks, those of one block),
    without building it: building even on the meta device runs every initialiser (a second for 6 B parameters),
    and the plan is computed for many candidate configurations."""
    h, f, c, t = cfg.hidden_dim, cfg.feature_dim, cfg.num_classes, cfg.seq_len
    block = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
    outside = [(h, f), (h,), (1, t, h), (h,), (h,), (c, h), (c,)]
    return outside, block


def model_shapes(cfg: TrainConfig) -> tuple[list[tuple[int, ...]], list[list[tuple[int, ...]]]]:
    """(the shapes of the parameters outside the model's shard units, those of each unit). The built-in model's
    are computed; a plug-in's are read off the model built on the meta device (once per model and data shape:
    the plan is computed for many candidate configurations that share them)."""
    if cfg.model == BUILTIN:
        outside, block = parameter_shapes(cfg)
        return outside, [block] * cfg.num_layers
    shape = data_shape(cfg)
    key = json.dumps([cfg.model, cfg.model_args, shape.input_shape, shape.per_step, shape.num_classes, shape.task],
                     sort_keys=True, default=str)
    if key not in _PLUGIN_SHAPES:
        with on_meta_device():
            model = build_model(cfg)
        unit_list = units(cfg, model)
        in_units = {id(p) for unit in unit_list for p in unit.parameters()}
        _PLUGIN_SHAPES[key] = ([tuple(p.shape) for p in model.parameters() if id(p) not in in_units],
                               [[tuple(p.shape) for p in unit.parameters()] for unit in unit_list])
    return _PLUGIN_SHAPES[key]


_PLUGIN_SHAPES: dict[str, tuple[list[tuple[int, ...]], list[list[tuple[int, ...]]]]] = {}


def count_parameters(cfg: TrainConfig) -> tuple[int, int]:
    """(all parameters, the largest shard unit's: one block of the built-in model)."""
    outside, unit_shapes = model_shapes(cfg)
    per_unit = [sum(math.prod(s) for s in unit) for unit in unit_shapes]
    return sum(math.prod(s) for s in outside) + sum(per_unit), max(per_unit, default=0)


def largest_shard(cfg: TrainConfig, num_workers: int) -> int:
    """Parameters on the worker holding most under FSDP: each tensor is split along its first dimension into
    `num_workers` pieces of ceil(rows / num_workers) rows (the last ones shorter, or empty)."""
    outside, unit_shapes = model_shapes(cfg)

    def share(shapes: list[tuple[int, ...]]) -> int:
        return sum(math.ceil(s[0] / num_workers) * math.prod(s[1:]) if s else 1 for s in shapes)

    return share(outside) + sum(share(unit) for unit in unit_shapes)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per worker (see the module docstring for what each counts)."""

    num_params: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float  # what activations would be with --activation-checkpointing
    activations_full: float  # and without it
    communication: float
    runtime: float
    checkpoint_host: float  # host memory (not GPU) of one checkpoint's copy, on the worker that needs most
    activation_per_sample: float  # of `activations`, what one sequence of the micro-batch adds
    micro_batch: int  # the --batch-size planned for

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.communication
                + self.runtime)

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes * (1 - HEADROOM)

    def largest_micro_batch(self, gpu_bytes: float) -> int:
        """The largest --batch-size whose plan fits `gpu_bytes` (0: not even one sequence)."""
        free = gpu_bytes * (1 - HEADROOM) - (self.total - self.activations)
        fixed = self.activations - self.activation_per_sample * self.micro_batch
        return max(0, math.floor((free - fixed) / self.activation_per_sample)) if self.activation_per_sample else 0


def activation_bytes(cfg: TrainConfig, batch: int, checkpointed: bool, *, rebuilt_block: bool = True) -> float:
    """Bytes autograd keeps between forward and backward for one micro-batch of `batch` sequences. Checkpointed:
    the blocks' inputs, plus (`rebuilt_block`) the one block whose activations backward rebuilds at a time. The
    built-in model's; a model of a user's own has no estimate (0: the plan counts its parameters, gradients and
    optimizer state, and says so)."""
    if cfg.model != BUILTIN:
        return 0.0
    b, t, h, f, c = batch, cfg.seq_len, cfg.hidden_dim, cfg.feature_dim, cfg.num_classes
    value = 2 if cfg.use_amp else 4  # matmul inputs and outputs in the autocast dtype
    btd = b * t * h
    mask = btd if cfg.dropout > 0 else 0  # one byte per element, per dropout
    stats = 2 * b * t * 4  # a LayerNorm's mean and reciprocal std, fp32
    block = 16 * btd * value + 2 * stats + b * cfg.num_heads * t * 4 + 2 * mask  # + attention's logsumexp
    head_in = btd if cfg.per_step else b * h
    outer = (b * t * f * value + mask  # the input projection's input, the dropout after it
             + btd * 4 + stats  # the final norm's input (its output is the head's input, below)
             + head_in * value + (b * t if cfg.per_step else b) * c * 4)  # the head's input, the fp32 logits
    if checkpointed:
        return outer + cfg.num_layers * btd * 4 + (block if rebuilt_block else 0)
    return outer + cfg.num_layers * block


def plan_memory(cfg: TrainConfig, num_workers: int | None = None) -> MemoryPlan:
    """The plan for `cfg` on `num_workers` workers (default: cfg.num_workers)."""
    n = num_workers or cfg.num_workers
    p, block = count_parameters(cfg)
    held = largest_shard(cfg, n) if cfg.strategy == "fsdp" else p  # parameters on the worker holding most
    value = 2 if cfg.use_amp else 4
    if cfg.strategy == "fsdp":
        communication = 2 * block * value + block * 4
        checkpoint_host = 12 * p / n + (12 * p if cfg.best_model == "full" else 4 * p)
    else:
        communication = DDP_BUCKET_BYTES / 2 if cfg.grad_compression == "bf16" and n > 1 else 0
        checkpoint_host = 12 * p
    full = activation_bytes(cfg, cfg.batch_size, checkpointed=False)
    checkpointed = activation_bytes(cfg, cfg.batch_size, checkpointed=True)
    activations = checkpointed if cfg.activation_checkpointing else full
    per_sample = activations - activation_bytes(cfg, cfg.batch_size - 1, cfg.activation_checkpointing) \
        if cfg.batch_size > 1 else activations
    return MemoryPlan(num_params=p, parameters=4 * held, gradients=4 * held, optimizer=8 * held,
                      activations=activations, activations_checkpointed=checkpointed, activations_full=full,
                      communication=communication, runtime=CUDA_RUNTIME_BYTES, checkpoint_host=checkpoint_host,
                      activation_per_sample=per_sample, micro_batch=cfg.batch_size)


def smallest_fitting_change(cfg: TrainConfig, gpu_bytes: float, max_workers: int = 64) -> str | None:
    """The first of these that makes `cfg` fit, as flags: --activation-checkpointing (results unchanged); a
    smaller micro-batch with more accumulation (the same effective batch); --strategy fsdp; FSDP on more
    workers. None when none does."""
    if not cfg.activation_checkpointing and plan_memory(cfg.replace(activation_checkpointing=True)).fits(gpu_bytes):
        return "--activation-checkpointing"
    batch = plan_memory(cfg).largest_micro_batch(gpu_bytes)
    if 0 < batch < cfg.batch_size:
        accum = math.ceil(cfg.batch_size * cfg.grad_accum_steps / batch)
        return f"--batch-size {batch} --grad-accum-steps {accum}"
    fsdp = cfg.replace(strategy="fsdp")
    if cfg.strategy != "fsdp" and plan_memory(fsdp).fits(gpu_bytes):
        return "--strategy fsdp"
    for workers in range(cfg.num_workers + 1, max_workers + 1):
        if plan_memory(fsdp, workers).fits(gpu_bytes):
            return f"--strategy fsdp --num-workers {workers}"
    return None


def plan_lines(cfg: TrainConfig, gpu_bytes: float | None, num_workers: int | None = None) -> list[str]:
    """The plan as `python -m raytrain_app.plan` prints it."""
    n = num_workers or cfg.num_workers
    plan = plan_memory(cfg, n)
    precision = f"{cfg.amp_dtype} autocast" if cfg.use_amp else "fp32"
    rows = [("parameters", plan.parameters, ""), ("gradients", plan.gradients, ""),
            ("optimizer state", plan.optimizer, "AdamW moments"),
            ("activations", plan.activations,
             f"not estimated for --model {cfg.model}: leave room for them" if cfg.model != BUILTIN
             else "with --activation-checkpointing" if cfg.activation_checkpointing
             else f"{human(plan.activations_checkpointed)} with --activation-checkpointing"),
            ("communication", plan.communication, "FSDP all-gather and reduce-scatter buffers"
             if cfg.strategy == "fsdp" else "DDP buckets are the gradients" if cfg.grad_compression == "none"
             else "a bf16 bucket"),
            ("CUDA runtime", plan.runtime, "context, kernels, workspaces")]
    lines = [f"Memory plan per worker: {plan.num_params:,} parameters, --strategy {cfg.strategy} on {n} worker(s), "
             f"micro-batch {cfg.batch_size} x {cfg.seq_len} steps, {precision}"]
    lines += [f"  {name:<16}{human(value):>12}" + (f"   ({note})" if note else "") for name, value, note in rows]
    if gpu_bytes is None:
        lines.append(f"  {'total':<16}{human(plan.total):>12}   (pass --gpu-memory-gb to check it against a GPU)")
    else:
        verdict = "fits" if plan.fits(gpu_bytes) else "does NOT fit"
        lines.append(f"  {'total':<16}{human(plan.total):>12}   of {human(gpu_bytes)} per GPU, "
                     f"{100 * (1 - HEADROOM):.0f}% usable: {verdict}")
        if cfg.model == BUILTIN:
            lines.append(f"  largest micro-batch that fits: {plan.largest_micro_batch(gpu_bytes)}")
        if not plan.fits(gpu_bytes):
            change = smallest_fitting_change(cfg, gpu_bytes)
            lines.append(f"  smallest change that fits: {change}" if change else
                         f"  nothing here fits: a smaller model ({_smaller(cfg)}) or larger GPUs")
    who = "each worker (its shard), plus best_model.pt gathered on rank 0" if cfg.strategy == "fsdp" else "rank 0"
    lines.append(f"Checkpoint host memory (CPU RAM, not GPU): {human(plan.checkpoint_host)} on the worker that needs "
                 f"most; copies are taken by {who}")
    return lines


def check_fits(cfg: TrainConfig, gpu_bytes: float, source: str) -> None:
    """Refuse (UserError: one line, exit 2) a configuration whose plan does not fit GPUs of `gpu_bytes`, at its
    fewest workers (an FSDP worker's share is largest then), naming the smallest change that would fit."""
    workers = cfg.min_workers or cfg.num_workers
    plan = plan_memory(cfg, workers)
    if plan.fits(gpu_bytes):
        return
    change = smallest_fitting_change(cfg.replace(num_workers=workers, min_workers=None), gpu_bytes)
    advice = (f"{change} would fit" if change else
              f"nothing but a smaller model ({_smaller(cfg)}) or larger GPUs would fit")
    raise UserError(f"--strategy {cfg.strategy} --batch-size {cfg.batch_size} on {workers} worker(s) needs "
                    f"{human(plan.total)} per GPU by the memory plan, more than {100 * (1 - HEADROOM):.0f}% of the "
                    f"{human(gpu_bytes)} of each GPU ({source}): {advice}. See python -m raytrain_app.plan with the "
                    "same flags.")


def _smaller(cfg: TrainConfig) -> str:
    return "--hidden-dim, --num-layers" if cfg.model == BUILTIN else "--model-args"


def human(num_bytes: float) -> str:
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= 0.01 * GB else f"{num_bytes / 1e6:.2f} MB"
