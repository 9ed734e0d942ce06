"""Tokens per second and MFU of the training step in bf16 and fp16 AMP, with and without torch.compile, for the
large configuration on one GPU; and the checkpoint's save and load rates in GB/s. Prints one JSON object.

It runs the project's own training step (`Trainer.train_step`: autocast, GradScaler for fp16, fused AdamW,
gradient clipping) in this process, with no Ray: it needs torch and this repository, not a cluster. MFU counts
6 FLOPs per parameter and token plus attention's (raytrain_app.observability.metrics.flops_per_token) against
the GPU's dense bf16 peak (raytrain_app.observability.metrics.PEAK_FLOPS, or --peak-tflops); it is left out on
devices whose peak is not known (CPUs). Beside each rate are the raw counts and seconds it is computed from.

    python benchmarks/gpu_throughput.py                     # the large configuration: hidden 2048, 24 layers
    python benchmarks/gpu_throughput.py --hidden-dim 64 --num-layers 2 --seq-len 32 --batch-size 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch

from raytrain_app.checkpoint.format import load_state, save_checkpoint_dir
from raytrain_app.checkpoint.state import training_state
from raytrain_app.checkpoint.writer import CheckpointWriter
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import build_model
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.observability.metrics import flops_per_token, peak_flops


def config(args: argparse.Namespace, amp_dtype: str, compile_model: bool) -> TrainConfig:
    return TrainConfig(hidden_dim=args.hidden_dim, num_layers=args.num_layers, num_heads=args.num_heads,
                       feature_dim=args.feature_dim, seq_len=args.seq_len, num_classes=16, num_workers=1,
                       batch_size=args.batch_size, dropout=0.0, use_amp=True, amp_dtype=amp_dtype,
                       compile=compile_model, use_gpu=args.device == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_of(args: argparse.Namespace) -> float | None:
    """The device's dense bf16 peak in FLOP/s: --peak-tflops, else the table's; None where it is not known."""
    return args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch.device(args.device))


def throughput(args: argparse.Namespace, amp_dtype: str, compile_model: bool) -> tuple[dict, Trainer]:
    cfg = config(args, amp_dtype, compile_model)
    device = torch.device(args.device)
    seed_everything(0, 0)
    model = build_model(cfg).to(device)
    trainer = Trainer(cfg, model, torch.compile(model) if compile_model else model, device)
    batch = [(torch.randn(cfg.batch_size, cfg.seq_len, cfg.feature_dim, device=device),
              torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device))]
    for _ in range(args.warmup):  # compilation and allocator warm-up
        trainer.train_step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step, tokens = trainer.global_step, 0
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batch)
        tokens += batch[0][0].shape[0] * batch[0][0].shape[1]
    sync(device)
    loop_s = time.perf_counter() - started
    steps = trainer.global_step - first_step
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = tokens / loop_s
    peak = peak_of(args)
    # What ran, read back from the trainer: a variant measures the precision and compilation its name says.
    out = {"amp_dtype": str(trainer.amp_dtype).removeprefix("torch."), "grad_scaler": trainer.scaler.is_enabled(),
           "compiled": trainer.train_model is not model, "params": params, "steps": steps, "tokens": tokens,
           "loop_s": loop_s, "step_s": loop_s / steps, "tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * flops_per_token(cfg, params) / peak if peak else None}
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out, trainer


def checkpoint_rates(trainer: Trainer) -> dict:
    """The full training state: copied to host memory (what the training loop waits for), written as a
    checkpoint folder (serialised and hashed into its manifest), and read back."""
    state = training_state(trainer)
    writer = CheckpointWriter(lambda *a: None, lambda *a: None, rank=0)
    writer.snapshot(state)  # the first copy allocates the (pinned) host buffers; later ones reuse them
    started = time.perf_counter()
    snapshot = writer.snapshot(state)
    snapshot_s = time.perf_counter() - started
    folder = tempfile.mkdtemp(prefix="gpu-throughput-")
    try:
        started = time.perf_counter()
        save_checkpoint_dir(folder, snapshot)
        save_s = time.perf_counter() - started
        size = (Path(folder) / "state.pt").stat().st_size
        started = time.perf_counter()  # read back at once: from the page cache (a cold read is the disk's rate)
        load_state(str(Path(folder) / "state.pt"))
        load_s = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gb = size / 1e9
    return {"state_bytes": size, "copy_to_host_s": snapshot_s, "save_s": save_s, "load_s": load_s,
            "state_gb": gb, "copy_to_host_gb_per_s": gb / snapshot_s, "save_gb_per_s": gb / save_s,
            "load_gb_per_s": gb / load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dim", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="bf16,fp16,bf16+compile,fp16+compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float,
                        help="The device's dense bf16 peak, for MFU on a device the table does not know.")
    args = parser.parse_args()
    device, peak = torch.device(args.device), peak_of(args)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "ray_installed": _has_ray(), "target_mfu_bf16": 0.45,
                     "peak_tflops": peak / 1e12 if peak else None}
    for variant in args.variants.split(","):
        amp_dtype, _, compiled = variant.partition("+")
        results[variant], trainer = throughput(args, amp_dtype, compiled == "compile")
        trainer = None  # one model and its optimizer in memory at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _, trainer = throughput(argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0}), "bf16", False)
    results["checkpoint"] = checkpoint_rates(trainer)
    print(json.dumps(results, indent=1))


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


if __name__ == "__main__":
    main()
