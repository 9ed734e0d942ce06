"""Pass or fail for every CUDA path of the training and scoring code, on a machine with one GPU and nothing
installed: the package is imported from this checkout, and nothing here needs Ray, wandb, matplotlib, yaml or
safetensors (only torch, numpy and pyarrow).

    python benchmarks/gpu_check.py                        # on a GPU: every check, then the large configuration
    python benchmarks/gpu_check.py --device cpu           # the CPU fallback, tiny sizes (`make test` runs it)
    python benchmarks/gpu_check.py --only checkpoint_resume,fsdp_world1 --json gpu-check.json

Every check runs on its own, catches its own failure and prints one line, `PASS name: detail`,
`FAIL name: reason` or `SKIP name: why`; a summary line ends the output, and the exit code is 0 only when no
check failed. `--json PATH` also writes the results there (rewritten after every check, so a run cut off still
leaves what it did). On an H100 the whole run should take 4 to 6 minutes (estimated: no GPU has run it yet), most
of it building, compiling and timing the large configuration (hidden 2048, 24 layers: 1.2 B parameters, 64 TFLOP
per step of 8 x 1024 tokens, about 0.16 s at 40% MFU); every other check's model needs under a TFLOP a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import numpy as np
import torch
import torch.distributed as dist
from gpu_throughput import throughput

from raytrain_app.checkpoint.format import STATE_FILE, checkpoint_problem, load_state
from raytrain_app.checkpoint.inference import load_trained_model, score_table
from raytrain_app.checkpoint.sharded import gather_full_state
from raytrain_app.checkpoint.state import restore_training_state, save_training_state
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.evaluation import tally
from raytrain_app.core.memory import HEADROOM, human, plan_memory
from raytrain_app.core.model_spec import build_model
from raytrain_app.core.parallel import is_sharded, parallelize
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer, to_device
from raytrain_app.datasets.dataset import Dataset, Split
from raytrain_app.datasets.formats import make_synthetic
from raytrain_app.datasets.prediction_input import Shape, decode_array

Batches = list[tuple[torch.Tensor, torch.Tensor]]
SCHEDULE_STEPS = 1000  # the schedule's length for the checks that call train_step directly (no fit)
LOWEST_PLAN_RATIO = 0.75  # see check_memory_plan


@dataclass(frozen=True)
class Sizes:
    """The model of most checks, and the large configuration of the memory plan and throughput checks."""

    hidden_dim: int
    num_layers: int
    num_heads: int
    seq_len: int
    batch_size: int
    steps: int
    large: dict[str, int] = field(default_factory=dict)
    feature_dim: int = 64
    num_classes: int = 16


SIZES = {
    # The CPU fallback: every check in seconds on two cores.
    "tiny": Sizes(hidden_dim=32, num_layers=2, num_heads=2, seq_len=16, batch_size=8, steps=4, feature_dim=8,
                  num_classes=4, large=dict(hidden_dim=32, num_layers=2, num_heads=2, seq_len=16, batch_size=8,
                                            steps=3, warmup=1)),
    # A GPU: a model that runs the real kernels (flash attention, cuBLAS) in milliseconds per step, and the large
    # configuration of docs/performance.md at the batch benchmarks/gpu_throughput.py times.
    "full": Sizes(hidden_dim=512, num_layers=4, num_heads=8, seq_len=256, batch_size=16, steps=6,
                  large=dict(hidden_dim=2048, num_layers=24, num_heads=16, seq_len=1024, batch_size=8, steps=20,
                             warmup=3)),
}


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    tmp_dir: Path
    figures: dict[str, Any] = field(default_factory=dict)  # measurements worth keeping beside the verdicts

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class Skip(Exception):
    """The check does not apply here; the message says why."""


class CheckFailed(Exception):
    """The check ran and found what it checks to be wrong; the message says what."""


def expect(condition: bool, message: str) -> None:
    if not condition:  # not `assert`: python -O would remove the checks
        raise CheckFailed(message)


def cuda_only(ctx: Context, what: str) -> None:
    if not ctx.cuda:
        raise Skip(f"{what} is CUDA-only; this run is on {ctx.device.type}")


def amp_or_skip(ctx: Context, amp_dtype: str) -> None:
    if amp_dtype == "bf16" and ctx.cuda and not torch.cuda.is_bf16_supported():
        raise Skip(f"{torch.cuda.get_device_name(ctx.device)} has no bf16")


def best_amp(ctx: Context) -> str:
    return "fp16" if ctx.cuda and not torch.cuda.is_bf16_supported() else "bf16"


# --- building and training, as a worker does at world size 1 ------------------------------------------------
def config(ctx: Context, **overrides: Any) -> TrainConfig:
    s = ctx.sizes
    values = dict(hidden_dim=s.hidden_dim, num_layers=s.num_layers, num_heads=s.num_heads, seq_len=s.seq_len,
                  feature_dim=s.feature_dim, num_classes=s.num_classes, batch_size=s.batch_size, num_workers=1,
                  dropout=0.1, lr=2e-3, warmup_steps=1, use_gpu=ctx.cuda)
    return TrainConfig(**{**values, **overrides})


def build(cfg: TrainConfig, device: torch.device, seed: int = 0,
          compile_backend: str | None = None) -> Trainer:
    """The model and Trainer as `raytrain_app.ray_adapter.worker` builds them: `parallelize` applies
    --activation-checkpointing, --compile and --strategy. `compile_backend` replaces torch.compile's default
    (inductor) for the CPU fallback."""
    seed_everything(seed, 0)
    with device:  # initialised where it trains: the 1.2 B-parameter model's initialisers take a CPU half a minute
        model = build_model(cfg)
    if compile_backend is None:
        train_model = parallelize(cfg, model, device, world_size=1)
    else:
        train_model = torch.compile(model, backend=compile_backend)
    trainer = Trainer(cfg, model, train_model, device)
    trainer.schedule.total_steps = SCHEDULE_STEPS
    return trainer


def micro_batches(cfg: TrainConfig, step: int, count: int = 2) -> Batches:
    """`count` micro-batches (gradient accumulation) on the host, as the data pipeline hands them to train_step,
    the same for every run at the same step."""
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(cfg.batch_size, cfg.seq_len, cfg.feature_dim, generator=g),
             torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g)) for _ in range(count)]


def train(trainer: Trainer, steps: int, *, fixed: bool = False) -> list[float]:
    """Train `steps` optimizer steps from the trainer's global step; the loss of each. `fixed`: the same batch
    every step (the loss then falls within a few steps)."""
    losses = []
    for _ in range(steps):
        trainer.train_step(micro_batches(trainer.cfg, 0 if fixed else trainer.global_step))
        losses.append(trainer.last_loss.item())
    return losses


def learned(losses: list[float]) -> None:
    expect(all(math.isfinite(x) for x in losses), f"non-finite losses {losses}")
    expect(losses[-1] < losses[0], f"the loss did not fall on a fixed batch: {losses}")


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Copies of every weight and every optimizer tensor (moments, step counts), by a name that does not depend
    on the order the optimizer first saw its parameters in."""
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for g, group in enumerate(trainer.optimizer.param_groups):
        for p, param in enumerate(group["params"]):
            for key, value in trainer.optimizer.state.get(param, {}).items():
                out[f"optimizer.{g}.{p}.{key}"] = value.detach().clone()
    return out


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors are not bit for bit equal (or present on one side only)."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]


def deterministic_attention(device: torch.device) -> Any:
    """For checks that compare two CUDA runs bit for bit: the math attention kernel. The flash and
    memory-efficient kernels accumulate the backward pass with atomics, so two identical runs may differ in the
    last bits and such a comparison could not tell a checkpoint's fault from the kernel's. CPU kernels are
    deterministic."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def recorded_output_dtypes(module: torch.nn.Module) -> Iterator[list[torch.dtype]]:
    dtypes: list[torch.dtype] = []
    handle = module.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        yield dtypes
    finally:
        handle.remove()


def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


# --- the checks ------------------------------------------------------------------------------------------------
CHECKS: dict[str, Callable[[Context], str]] = {}


def check(name: str) -> Callable[[Callable[[Context], str]], Callable[[Context], str]]:
    def register(fn: Callable[[Context], str]) -> Callable[[Context], str]:
        CHECKS[name] = fn
        return fn
    return register


def amp_step(ctx: Context, amp_dtype: str) -> str:
    amp_or_skip(ctx, amp_dtype)
    trainer = build(config(ctx, use_amp=True, amp_dtype=amp_dtype), ctx.device)
    with recorded_output_dtypes(trainer.model.head) as dtypes:
        losses = train(trainer, ctx.sizes.steps, fixed=True)
    wanted = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    expect(set(dtypes) == {wanted}, f"the head ran in {set(dtypes)}, not {wanted}: autocast is not on")
    expect(all(p.dtype == torch.float32 and p.device.type == ctx.device.type for p in trainer.model.parameters()),
           "the weights are not fp32 on the device")
    learned(losses)
    skipped = int(trainer.skipped_steps)
    detail = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps, autocast {amp_dtype}, fp32 weights"
    if amp_dtype == "bf16":
        expect(skipped == 0, f"{skipped} of {len(losses)} bf16 steps were skipped as non-finite")
        return detail
    scale = trainer.scaler.get_scale()
    # The scaler may halve its scale on an early overflow (those steps are skipped by design); it must be enabled,
    # finite, and have let the loss fall.
    expect(trainer.scaler.is_enabled() and math.isfinite(scale) and scale > 0, f"GradScaler scale {scale}")
    return f"{detail}, GradScaler scale {scale:g}, {skipped} overflow step(s) skipped"


for _amp in ("bf16", "fp16"):
    check(f"train_step_{_amp}")(partial(amp_step, amp_dtype=_amp))


def non_finite_skip(ctx: Context, amp_dtype: str) -> str:
    """As tests/unit/test_loop.py on CPU: a NaN in one input makes the loss and gradients non-finite; the step
    must leave weights, moments and EMA untouched, move the global step on and count the skip."""
    amp_or_skip(ctx, amp_dtype)
    trainer = build(config(ctx, use_amp=True, amp_dtype=amp_dtype, dropout=0.0), ctx.device)
    train(trainer, 1)
    before, ema = snapshot(trainer), trainer.ema.clone()
    poisoned = micro_batches(trainer.cfg, 1)
    poisoned[1][0][0, 0, 0] = float("nan")
    trainer.train_step(poisoned)
    changed = differing(before, snapshot(trainer))
    expect(not math.isfinite(trainer.last_loss.item()), "the poisoned step's loss was finite: nothing was tested")
    expect(not changed, f"the skipped step changed {len(changed)} tensors, e.g. {changed[:3]}")
    expect(torch.equal(ema, trainer.ema), "the skipped step moved the loss EMA")
    counters = (trainer.global_step, int(trainer.skipped_steps), int(trainer.skip_streak))
    expect(counters == (2, 1, 1), f"(global step, skipped, streak) = {counters}, expected (2, 1, 1)")
    train(trainer, 1)
    expect(bool(differing(before, snapshot(trainer))), "the next finite step did not train")
    counters = (int(trainer.skipped_steps), int(trainer.skip_streak))
    expect(counters == (1, 0), f"after a finite step (skipped, streak) = {counters}, expected (1, 0)")
    how = "fused AdamW's found_inf" if amp_dtype == "bf16" else "GradScaler"
    return f"NaN step skipped by {how}: weights, moments and EMA bit-identical, counted (1 skipped), next step trains"


for _amp in ("bf16", "fp16"):
    check(f"non_finite_skip_{_amp}")(partial(non_finite_skip, amp_dtype=_amp))


@check("fused_adamw")
def check_fused_adamw(ctx: Context) -> str:
    """The optimizer asks for the fused kernel, and a step really calls it (counted by wrapping torch's fused
    AdamW op, which torch.optim looks up at every step)."""
    trainer = build(config(ctx, use_amp=True, amp_dtype=best_amp(ctx)), ctx.device)
    expect(all(group["fused"] for group in trainer.optimizer.param_groups), "a parameter group is not fused")
    calls = []
    originals = {name: getattr(torch, name) for name in ("_fused_adamw_", "_fused_adam_") if hasattr(torch, name)}

    def counted(op: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[0][0].device.type)  # the first parameter's device
            return op(*args, **kwargs)
        return call

    try:
        for name, op in originals.items():
            setattr(torch, name, counted(op))
        train(trainer, 2)
    finally:
        for name, op in originals.items():
            setattr(torch, name, op)
    expect(len(calls) >= 2, f"the fused AdamW kernel ran {len(calls)} times in 2 steps")
    expect(set(calls) == {ctx.device.type}, f"the fused kernel ran on {set(calls)}")
    steps = {s["step"].device.type for s in trainer.optimizer.state.values()}
    expect(steps == {ctx.device.type}, f"the step counters are on {steps}: the fused kernel keeps them on the device")
    return f"fused=True in every group; the fused kernel ran {len(calls)} times on {ctx.device.type} in 2 steps"


@check("pinned_batches")
def check_pinned_batches(ctx: Context) -> str:
    """A batch goes to the GPU from pinned memory without blocking the host: queued behind a busy kernel, the
    copy returns at once and the wait comes at the next synchronisation."""
    cuda_only(ctx, "pinned memory and non-blocking copies")
    x = torch.randn(32, 1024, 256)  # 32 MB
    pinned = x.pin_memory()
    expect(pinned.is_pinned(), "pin_memory() gave an unpinned tensor")
    expect(torch.equal(to_device(x, ctx.device).cpu(), x), "an unpinned batch arrived changed")
    if not hasattr(torch.cuda, "_sleep"):  # a private helper of torch's own tests; without it, values only
        return "values arrive intact (no torch.cuda._sleep here to time the copy against)"
    sync(ctx)
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU clock cycles, queued before the copy
    started = time.perf_counter()
    on_device = to_device(pinned, ctx.device)
    host_s = time.perf_counter() - started
    started = time.perf_counter()
    sync(ctx)
    wait_s = time.perf_counter() - started
    expect(host_s < wait_s, f"the copy held the host {host_s * 1e3:.1f} ms, then the sync {wait_s * 1e3:.1f} ms: "
                            "it waited for the queued kernel, so it was not asynchronous")
    expect(torch.equal(on_device.cpu(), x), "a pinned batch arrived changed")
    return f"copy returned after {host_s * 1e3:.2f} ms behind a {wait_s * 1e3:.0f} ms kernel; values intact"


@check("activation_checkpointing")
def check_activation_checkpointing(ctx: Context) -> str:
    """--activation-checkpointing reruns every block in backward (twice the block forwards) and trains bit for
    bit as without it: dropout's masks are replayed from the saved RNG state. On CUDA it must also use less
    memory."""
    cfg = config(ctx)  # fp32, dropout 0.1
    runs = {}
    for recompute in (False, True):
        trainer = build(cfg.replace(activation_checkpointing=recompute), ctx.device)
        calls: list[int] = []
        # A pre-hook on each block's first layer: the recompute stops as soon as it has rebuilt what backward
        # needs, before a block's end, and it runs the block's forward itself, not the block's hooks.
        hooks = [b.ln1.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
                 for b in trainer.model.blocks]
        base = 0
        if ctx.cuda:  # the peak above what is held before training (the other run's snapshot included)
            sync(ctx)
            base = torch.cuda.memory_allocated(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
        with deterministic_attention(ctx.device):
            losses = train(trainer, 2)
        peak = torch.cuda.max_memory_allocated(ctx.device) - base if ctx.cuda else 0
        for hook in hooks:
            hook.remove()
        runs[recompute] = (len(calls), losses, snapshot(trainer), peak)
    (plain_calls, plain_losses, plain, plain_peak), (ac_calls, ac_losses, ac, ac_peak) = runs[False], runs[True]
    expect(ac_calls == 2 * plain_calls, f"{ac_calls} block forwards with recompute against {plain_calls} without")
    changed = differing(plain, ac)
    expect(ac_losses == plain_losses and not changed, f"recompute changed the losses ({plain_losses} -> "
                                                      f"{ac_losses}) or {len(changed)} tensors, e.g. {changed[:3]}")
    detail = f"{ac_calls} block forwards against {plain_calls}, weights and moments bit-identical after 2 steps"
    if ctx.cuda:
        expect(ac_peak < plain_peak, f"peak memory {human(ac_peak)} with recompute, {human(plain_peak)} without")
        detail += f", peak memory {human(ac_peak)} against {human(plain_peak)}"
    return detail


@check("torch_compile")
def check_torch_compile(ctx: Context) -> str:
    """--compile: the compiled model trains as the eager one within the autocast precision. On CUDA through
    `parallelize` with torch.compile's default backend (inductor); the CPU fallback uses aot_eager, which traces
    forward and backward as inductor does without its C++ build (minutes on two cores)."""
    amp_dtype = best_amp(ctx)
    cfg = config(ctx, use_amp=True, amp_dtype=amp_dtype, dropout=0.0)  # compiled dropout draws other numbers
    eager_losses = train(build(cfg, ctx.device), 3, fixed=True)
    backend = None if ctx.cuda else "aot_eager"
    started = time.perf_counter()
    compiled = build(cfg.replace(compile=True), ctx.device, compile_backend=backend)
    expect(hasattr(compiled.train_model, "_orig_mod"), "the model that trains is not a compiled module")
    losses = train(compiled, 1, fixed=True)
    first_s = time.perf_counter() - started
    losses += train(compiled, 2, fixed=True)
    tolerance = 2e-2  # bf16/fp16 rounding: eager and compiled kernels round in different places
    far = [(a, b) for a, b in zip(eager_losses, losses, strict=True) if abs(a - b) > tolerance * max(1.0, abs(a))]
    expect(not far, f"compiled losses {losses} against eager {eager_losses}")
    learned(losses)
    return (f"{backend or 'inductor'}, {amp_dtype}: losses {', '.join(f'{x:.4f}' for x in losses)} "
            f"(eager {', '.join(f'{x:.4f}' for x in eager_losses)}); first step {first_s:.1f} s with compilation")


@check("checkpoint_resume")
def check_checkpoint_resume(ctx: Context) -> str:
    """Train N steps uninterrupted; then k steps, save the whole training state with the package's own functions,
    build a fresh model from another seed, restore, continue to N: every weight, moment and counter must be bit
    for bit the uninterrupted run's. fp16 with dropout, so the GradScaler's state and the device's RNG state must
    come back too."""
    amp_dtype = "fp16"
    cfg = config(ctx, use_amp=True, amp_dtype=amp_dtype)
    total, cut = 6, 3
    with deterministic_attention(ctx.device):
        straight = build(cfg, ctx.device)
        train(straight, total)
        first = build(cfg, ctx.device)
        train(first, cut)
        folder = ctx.tmp_dir / "resume" / f"checkpoint_step={cut:06d}"
        save_training_state(first, str(folder))
        problem = checkpoint_problem(str(folder))
        expect(problem is None, f"the checkpoint folder is not whole: {problem}")
        resumed = build(cfg, ctx.device, seed=99)  # other weights, other RNG streams: all must come from the file
        report = restore_training_state(resumed, load_state(str(folder / STATE_FILE)))
        expect(report.optimizer and report.scaler, f"restored {report}: the optimizer or scaler state is missing")
        on_device = {t.device.type for s in resumed.optimizer.state.values() for t in s.values()}
        expect(on_device == {ctx.device.type}, f"restored optimizer state is on {on_device}")
        train(resumed, total - cut)
    changed = differing(snapshot(straight), snapshot(resumed))
    if changed:  # whose fault: the checkpoint's, or the kernels' (then two straight runs differ as well)
        with deterministic_attention(ctx.device):
            again = build(cfg, ctx.device)
            train(again, total)
        noise = differing(snapshot(straight), snapshot(again))
        raise CheckFailed(f"{len(changed)} tensors differ from the uninterrupted run, e.g. {changed[:3]}"
                          + (f"; two uninterrupted runs differ too ({len(noise)} tensors): the kernels are not "
                             "deterministic here, so this comparison cannot judge the checkpoint" if noise else ""))
    for name in ("global_step", "skipped_steps", "ema"):
        a, b = getattr(straight, name), getattr(resumed, name)
        expect(torch.equal(a, b) if torch.is_tensor(a) else a == b, f"{name}: {b} against {a}")
    expect(straight.scaler.state_dict() == resumed.scaler.state_dict(), "the GradScaler state differs")
    count = len(snapshot(resumed))
    return f"{cut} + {total - cut} steps ({amp_dtype}, dropout) equal {total} straight: {count} tensors bit-identical"


def synthetic_data(ctx: Context, train_rows: int, val_rows: int) -> tuple[Dataset, dict[str, Any]]:
    s = ctx.sizes
    raw = make_synthetic(num_train=train_rows, num_val=val_rows, num_test=val_rows, seq_len=s.seq_len,
                         feature_dim=s.feature_dim, num_classes=s.num_classes, per_step=False, seed=0)
    split = {name: Split(torch.from_numpy(raw[name]["x"]), torch.from_numpy(raw[name]["y"]).long())
             for name in ("train", "val", "test")}
    return Dataset(train=split["train"], val=split["val"], test=split["test"], num_classes=s.num_classes,
                   seq_len=s.seq_len, feature_dim=s.feature_dim, per_step=False), raw


@check("fit_loop")
def check_fit_loop(ctx: Context) -> str:
    """The whole loop on the device (data order, augmentation, the skip streak read without a sync, validation
    under autocast, checkpoints written at every validation) for one epoch."""
    cfg = config(ctx, use_amp=True, amp_dtype=best_amp(ctx), epochs=1, eval_every=3, aug_noise_std=0.05)
    data, _ = synthetic_data(ctx, train_rows=8 * cfg.batch_size, val_rows=2 * cfg.batch_size)
    trainer = build(cfg, ctx.device)
    saved: list[dict[str, Any]] = []

    def on_checkpoint(metrics: dict[str, Any], scores: Any, is_best: bool) -> None:
        save_training_state(trainer, str(ctx.tmp_dir / "fit" / f"step{metrics['global_step']}"), scores)
        saved.append(metrics)

    finished = trainer.fit(data, on_checkpoint)
    steps = [m["global_step"] for m in saved]
    expect(finished and steps == [3, 6, 8], f"fit returned {finished}, checkpoints at steps {steps}, not [3, 6, 8]")
    expect(all(m["validated"] and math.isfinite(m["val_loss"]) for m in saved), f"validations: {saved}")
    problem = checkpoint_problem(str(ctx.tmp_dir / "fit" / "step8"))
    expect(problem is None, f"the last checkpoint is not whole: {problem}")
    losses = ", ".join(f"{m['val_loss']:.3f}" for m in saved)
    return f"1 epoch of 8 steps, validated and checkpointed at steps 3, 6, 8 (val loss {losses})"


@check("fsdp_world1")
def check_fsdp_world1(ctx: Context) -> str:
    """--strategy fsdp in a process group of one (nccl on CUDA, gloo on CPU): the blocks run forward in the
    mixed-precision policy's dtype over fp32 shards, training matches plain autocast within that precision, and
    a sharded checkpoint (torch.distributed.checkpoint) restores bit for bit into a fresh sharded model."""
    amp_dtype = best_amp(ctx)
    backend = "nccl" if ctx.cuda else "gloo"
    init_file = ctx.tmp_dir / "fsdp-init"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    try:
        cfg = config(ctx, use_amp=True, amp_dtype=amp_dtype, dropout=0.0, strategy="fsdp")
        reference = train(build(cfg.replace(strategy="ddp"), ctx.device), 3, fixed=True)
        trainer = build(cfg, ctx.device)
        expect(is_sharded(trainer.model) and trainer.sharded, "the model is not an FSDP module")
        expect(all(hasattr(p, "to_local") and p.dtype == torch.float32 for p in trainer.model.parameters()),
               "the parameters are not fp32 DTensor shards")
        qkv = trainer.model.blocks[0].attn.qkv
        seen: list[torch.dtype] = []
        handle = qkv.register_forward_pre_hook(lambda m, _i: seen.append(m.weight.dtype))
        try:
            losses = train(trainer, 3, fixed=True)
        finally:
            handle.remove()
        wanted = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
        expect(set(seen) == {wanted}, f"a block's weights ran forward in {set(seen)}, not the policy's {wanted}")
        far = [(a, b) for a, b in zip(reference, losses, strict=True) if abs(a - b) > 2e-2 * max(1.0, abs(a))]
        expect(not far, f"FSDP losses {losses} against plain autocast {reference}")
        learned(losses)
        sharded_round_trip(ctx, trainer)
    finally:
        dist.destroy_process_group()
    return (f"{backend}, {amp_dtype} policy: losses {', '.join(f'{x:.4f}' for x in losses)} (autocast "
            f"{', '.join(f'{x:.4f}' for x in reference)}); sharded checkpoint restored bit-identically")


def sharded_round_trip(ctx: Context, trainer: Trainer) -> None:
    """Write `trainer`'s sharded checkpoint, restore it into a fresh sharded model built from another seed, and
    compare the gathered weights and moments bit for bit."""
    folder = ctx.tmp_dir / "fsdp" / f"checkpoint_step={trainer.global_step:06d}"
    save_training_state(trainer, str(folder))  # the default group, as the Ray worker's writer at world size 1
    problem = checkpoint_problem(str(folder))
    expect(problem is None, f"the sharded checkpoint is not whole: {problem}")
    fresh = build(trainer.cfg, ctx.device, seed=99)
    restore_training_state(fresh, load_state(str(folder / STATE_FILE)), checkpoint_dir=str(folder))
    (weights, moments), (fresh_weights, fresh_moments) = (gather_full_state(t.model, t.optimizer)
                                                          for t in (trainer, fresh))
    changed = differing(weights, fresh_weights) + differing(flatten(moments), flatten(fresh_moments))
    expect(not changed, f"{len(changed)} tensors differ after restoring the sharded checkpoint: {changed[:3]}")
    expect(fresh.global_step == trainer.global_step, f"restored global step {fresh.global_step}")


def flatten(optimizer_state: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """An optimizer state dict's tensors by a flat name."""
    state = (optimizer_state or {}).get("state", {})
    return {f"{p}.{k}": v for p, values in state.items() for k, v in values.items() if torch.is_tensor(v)}


def trained_checkpoint(ctx: Context) -> tuple[Any, dict[str, Any]]:
    """A model trained a few steps and written as a checkpoint folder, loaded back as evaluate and predict load
    it (`load_trained_model`: verified, its config from the file); and the synthetic data's raw splits."""
    data, raw = synthetic_data(ctx, train_rows=16 * ctx.sizes.batch_size, val_rows=4 * ctx.sizes.batch_size)
    cfg = config(ctx, epochs=1, eval_every=1000)
    trainer = build(cfg, ctx.device)
    folder = ctx.tmp_dir / "scored"
    trainer.fit(data, lambda metrics, scores, _best: save_training_state(trainer, str(folder), scores))
    return load_trained_model(str(folder)), raw


def agreeing(a: np.ndarray, b: np.ndarray) -> str | None:
    """Why two predictions of the same rows on two devices differ more than a rare near-tie can explain."""
    mismatched = int((a != b).sum())
    return None if mismatched <= max(1, len(a) // 200) else f"{mismatched} of {len(a)} predictions differ"


@check("evaluate_scoring")
def check_evaluate_scoring(ctx: Context) -> str:
    """`python -m raytrain_app.evaluate`'s scoring (`core.evaluation.tally`, fp32, batch by batch) of a checkpoint
    on the device gives the CPU's loss, count and confusion matrix."""
    trained, raw = trained_checkpoint(ctx)
    x, y = torch.from_numpy(raw["test"]["x"]), torch.from_numpy(raw["test"]["y"]).long()
    batch = ctx.sizes.batch_size

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((x[lo:lo + batch], y[lo:lo + batch]) for lo in range(0, len(x), batch))

    cfg = trained.cfg
    here = tally(trained.build(ctx.device), batches(), cfg.num_classes, ctx.device)
    cpu = tally(trained.build("cpu"), batches(), cfg.num_classes, torch.device("cpu"))
    expect(here.count == cpu.count == len(x), f"scored {here.count} and {cpu.count} of {len(x)} rows")
    expect(abs(here.loss - cpu.loss) <= 1e-3 * max(1.0, cpu.loss), f"loss {here.loss} on the device, {cpu.loss} on CPU")
    difference = int((here.confusion - cpu.confusion).abs().sum()) // 2
    expect(difference <= max(1, len(x) // 200), f"{difference} of {len(x)} predictions differ from the CPU's")
    return (f"{here.count} rows of a step-{trained.global_step} checkpoint: loss {here.loss:.5f} (CPU {cpu.loss:.5f}), "
            f"accuracy {here.accuracy:.3f}, {difference} prediction(s) differ")


@check("predict_scoring")
def check_predict_scoring(ctx: Context) -> str:
    """`python -m raytrain_app.predict`'s batch scoring (`score_table`, what every model replica runs) on the
    device: the CPU's classes and probabilities, and a row with a NaN passed through as rejected."""
    trained, raw = trained_checkpoint(ctx)
    cfg = trained.cfg
    x = raw["test"]["x"].reshape(len(raw["test"]["x"]), -1).copy()
    x[3, 0] = np.nan
    table = decode_array(x, 0, Shape(cfg.seq_len, cfg.feature_dim))
    here = score_table(trained.build(ctx.device), table, cfg, ctx.device)
    cpu = score_table(trained.build("cpu"), table, cfg, "cpu")
    expect(here.column("error").to_pylist() == cpu.column("error").to_pylist(), "the rejected rows differ")
    expect(here.column("predicted")[3].as_py() is None and here.column("error")[3].as_py() is not None,
           "the NaN row was scored instead of rejected")
    kept = [i for i in range(len(x)) if i != 3]
    predicted = np.array(here.column("predicted").to_pylist(), dtype=object)[kept].astype(np.int64)
    reason = agreeing(predicted, np.array(cpu.column("predicted").to_pylist(), dtype=object)[kept].astype(np.int64))
    expect(reason is None, f"{reason} from the CPU's")
    p_here = np.array(here.column("probabilities").drop_null().to_pylist(), dtype=np.float32)
    p_cpu = np.array(cpu.column("probabilities").drop_null().to_pylist(), dtype=np.float32)
    gap = float(np.abs(p_here - p_cpu).max())
    expect(gap < 1e-4, f"probabilities differ from the CPU's by up to {gap:.2e}")
    return f"{len(kept)} rows scored and 1 rejected (NaN), as on CPU; probabilities within {gap:.1e}"


def large_config(ctx: Context) -> TrainConfig:
    large = {k: v for k, v in ctx.sizes.large.items() if k not in ("steps", "warmup")}
    # The large configuration of docs/performance.md (bf16 autocast, the default dropout) on one GPU.
    return config(ctx, use_amp=True, amp_dtype="bf16").replace(**large)


@check("memory_plan")
def check_memory_plan(ctx: Context) -> str:
    """The memory plan (raytrain_app.core.memory, what `python -m raytrain_app.plan` prints) against the CUDA
    allocator's peak over 3 steps of the large configuration (the plan's CUDA runtime is left out: the allocator
    does not count the context). The plan calls a configuration fitting when its total is at most 90% of the GPU
    (HEADROOM for what it does not count), so the peak may exceed the estimate by at most 1 / 0.9 before a plan
    that says "fits" can run out of memory; and an estimate more than 1 / 0.75 of the peak would turn away
    configurations that fit with a quarter of the GPU to spare."""
    cuda_only(ctx, "torch.cuda.max_memory_allocated")
    amp_or_skip(ctx, "bf16")
    cfg = large_config(ctx)
    plan = plan_memory(cfg, 1)
    estimate = plan.total - plan.runtime
    sync(ctx)
    base = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    trainer = build(cfg, ctx.device)
    for step in range(3):  # the first step allocates AdamW's moments; the later ones hold everything at once
        trainer.train_step(micro_batches(cfg, step, count=1))
    sync(ctx)
    peak = torch.cuda.max_memory_allocated(ctx.device) - base
    ratio = peak / estimate
    ctx.figures["memory_plan"] = {"peak_bytes": peak, "estimate_bytes": estimate, "ratio": ratio,
                                  "plan": {k: v for k, v in asdict(plan).items() if isinstance(v, (int, float))}}
    what = (f"peak {human(peak)} against the plan's {human(estimate)} (params {human(plan.parameters)}, grads "
            f"{human(plan.gradients)}, AdamW {human(plan.optimizer)}, activations {human(plan.activations)}): "
            f"ratio {ratio:.3f}")
    expect(ratio <= 1 / (1 - HEADROOM), f"{what}, above {1 / (1 - HEADROOM):.3f}: the plan can call an OOM a fit")
    expect(ratio >= LOWEST_PLAN_RATIO, f"{what}, below {LOWEST_PLAN_RATIO}: the plan overestimates")
    return f"{what}, within [{LOWEST_PLAN_RATIO}, {1 / (1 - HEADROOM):.3f}]"


@check("throughput_bf16")
def check_throughput_bf16(ctx: Context) -> str:
    """Tokens/s and MFU of the large configuration in bf16, eager and (on CUDA) compiled, through
    benchmarks/gpu_throughput.py's own measurement. A figure, not a verdict on the code: it fails only when the
    steps did not train (non-finite or skipped); the 45% MFU target is reported as met or not."""
    amp_or_skip(ctx, "bf16")
    s = ctx.sizes.large
    args = argparse.Namespace(**s, feature_dim=ctx.sizes.feature_dim, device=ctx.device.type, peak_tflops=None)
    variants = {"eager": False, "compiled": True} if ctx.cuda else {"eager": False}  # see check_torch_compile
    parts = []
    for name, compiled in variants.items():
        figures, trainer = throughput(args, "bf16", compiled)
        expect(figures.get("compiled", compiled) == compiled, f"{name}: the variant timed was compiled={not compiled}")
        expect(int(trainer.skipped_steps) == 0 and math.isfinite(trainer.last_loss.item()),
               f"{name}: {int(trainer.skipped_steps)} skipped steps, last loss {trainer.last_loss.item()}")
        trainer = None  # one model and its optimizer in memory at a time
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
        ctx.figures[f"throughput_bf16_{name}"] = figures
        mfu = figures["mfu"]
        parts.append(f"{name} {figures['tokens_per_s']:,.0f} tokens/s, MFU "
                     + (f"{mfu:.1%}" if mfu is not None else "n/a (no known peak for this device)"))
    best = max((f["mfu"] or 0.0) for k, f in ctx.figures.items() if k.startswith("throughput_bf16_"))
    params = ctx.figures["throughput_bf16_eager"]["params"]
    target = "" if not ctx.cuda else f"; the 45% MFU target is {'met' if best >= 0.45 else 'NOT met'}"
    return f"{params:,} parameters, batch {s['batch_size']} x {s['seq_len']}: {'; '.join(parts)}{target}"


# --- running them --------------------------------------------------------------------------------------------
def run_check(name: str, ctx: Context) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {"name": name}
    try:
        record.update(status="PASS", detail=CHECKS[name](ctx))
    except Skip as e:
        record.update(status="SKIP", detail=str(e))
    except Exception as e:  # noqa: BLE001 - whatever breaks a check is its FAIL line, and the next check runs
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        record.update(status="FAIL", detail=reason if isinstance(e, CheckFailed) else f"{type(e).__name__}: {reason}",
                      traceback=traceback.format_exc())
        if not isinstance(e, CheckFailed):
            print(traceback.format_exc(limit=-4), file=sys.stderr, flush=True)
    finally:
        if dist.is_initialized():  # a check cut off before its own cleanup
            dist.destroy_process_group()
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - started, 2)
    print(f"{record['status']} {name}: {record['detail']} ({record['seconds']:.1f} s)", flush=True)
    return record


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default=None,
                        help="tiny (the CPU fallback's default) or full (a GPU's default)")
    parser.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only: no check called {', '.join(unknown)} (the checks: {', '.join(CHECKS)})")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here (run with --device cpu)")
        torch.cuda.set_device(0)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    size = args.size or ("full" if device.type == "cuda" else "tiny")
    started = time.perf_counter()
    report: dict[str, Any] = {**environment(device), "size": size, "checks": []}
    build_kind = f"CUDA {report['cuda']}" if report["cuda"] else "a CPU build"
    print(f"gpu_check: {report['device']}, torch {report['torch']} ({build_kind}), Python {report['python']}, "
          f"sizes {size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(device=device, sizes=SIZES[size], tmp_dir=Path(tmp))
        for name in names:
            report["checks"].append(run_check(name, ctx))
            report["figures"] = ctx.figures
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    counts = {status: sum(c["status"] == status for c in report["checks"]) for status in ("PASS", "FAIL", "SKIP")}
    report.update(counts=counts, seconds=round(time.perf_counter() - started, 1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"SUMMARY: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {report['seconds']:.1f} s on {report['device']}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
