"""How long the training loop is blocked per checkpoint, against a plain synchronous torch.save of the same state
to the same storage (a local folder, and an S3 server when --s3-uri is given). Prints one JSON object.

The loop is the project's own (`Trainer.train_step` on synthetic batches) with the project's background writer
(`CheckpointWriter`) and its real write path: the checkpoint folder with its manifest (serialised and hashed),
then the copy to the storage the way Ray copies it (`pyarrow.fs.copy_files`). "Blocked" is the time the training
thread spends in the writer: the copy of the state to host memory, plus any wait for a write still in flight.
Ray's report is left out here (benchmarks/ray_overhead.py measures Ray's share). The same steps are also timed
with no checkpoint at all, so the slowdown of the steps that run beside a background write is shown too. Beside
each figure are the raw counts and seconds it is computed from.

    python benchmarks/checkpoint_stall.py [--hidden-dim 1024] [--num-layers 8] [--checkpoints 4]
        [--steps-between 30] [--s3-uri s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000] [--device cuda]
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

from raytrain_app.checkpoint.format import save_checkpoint_dir
from raytrain_app.checkpoint.state import training_state
from raytrain_app.checkpoint.writer import CheckpointWriter
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import build_model
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.storage.location import Location, parse_location


def build(args: argparse.Namespace) -> tuple[Trainer, list]:
    cfg = TrainConfig(hidden_dim=args.hidden_dim, num_layers=args.num_layers, num_heads=args.num_heads,
                      feature_dim=args.feature_dim, seq_len=args.seq_len, num_classes=8, num_workers=1,
                      batch_size=args.batch_size, dropout=0.0, use_gpu=args.device == "cuda")
    seed_everything(0, 0)
    device = torch.device(args.device)
    model = build_model(cfg).to(device)
    trainer = Trainer(cfg, model, model, device)
    batch = [(torch.randn(args.batch_size, args.seq_len, args.feature_dim, device=device),
              torch.randint(0, 8, (args.batch_size,), device=device))]
    trainer.train_step(batch)  # AdamW's moments exist: the state is the full training state
    return trainer, batch


def sync_save_s(state: dict, target: Location) -> float:
    """A plain synchronous torch.save of the state, written straight to the storage."""
    started = time.perf_counter()
    with target.fs.open_output_stream(target.path) as f:
        torch.save(state, f)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, storage: Location) -> dict:
    import pyarrow.fs as pafs

    trainer, batch = build(args)
    state = training_state(trainer)
    size = sum(t.numel() * t.element_size() for t in _tensors(state))
    baseline = [sync_save_s(state, storage.join(f"plain-{i}.pt")) for i in range(args.checkpoints)]

    def write(snapshot: dict, is_best: bool, dir_name: str) -> None:
        local = tempfile.mkdtemp(prefix="stall-")
        try:
            save_checkpoint_dir(local, snapshot)
            target = storage.join(dir_name)
            target.fs.create_dir(target.path)
            pafs.copy_files(local, target.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=target.fs)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def steps(n: int, writer: CheckpointWriter | None) -> tuple[int, float]:
        """`n` optimizer steps; the steps taken and their seconds."""
        first, started = trainer.global_step, time.perf_counter()
        for _ in range(n):
            trainer.train_step(batch)
            if writer is not None and writer.ready():
                writer.flush()  # written: reported at this step boundary, as the loop does
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return trainer.global_step - first, time.perf_counter() - started

    plain_steps, plain_steps_s = steps(args.steps_between * args.checkpoints, None)
    reported: list[str] = []
    writer = CheckpointWriter(write, lambda metrics, checkpoint, dir_name, urgent: reported.append(dir_name), rank=0)
    steps_beside, steps_beside_s = 0, 0.0
    for i in range(args.checkpoints):
        writer.submit({"global_step": i}, training_state(trainer), False, f"checkpoint-{i}")
        taken, taken_s = steps(args.steps_between, writer)
        steps_beside, steps_beside_s = steps_beside + taken, steps_beside_s + taken_s
    writer.flush()
    blocked = writer.blocked_s / writer.checkpoints
    sync = sum(baseline) / len(baseline)
    step_s_beside, plain_step_s = steps_beside_s / steps_beside, plain_steps_s / plain_steps
    return {"state_mb": round(size / 1e6, 1), "sync_torch_save_s": sync, "blocked_per_checkpoint_s": blocked,
            "background_write_per_checkpoint_s": writer.write_s / writer.checkpoints,
            "blocked_vs_sync_save_ratio": blocked / sync, "target_ratio": 0.1,
            "step_slowdown_beside_background_writes": step_s_beside / plain_step_s - 1,
            "raw": {"sync_torch_save_s_each": baseline, "checkpoints": writer.checkpoints, "reported": reported,
                    "blocked_s": writer.blocked_s, "background_write_s": writer.write_s, "plain_steps": plain_steps,
                    "plain_steps_s": plain_steps_s, "steps_beside_writes": steps_beside,
                    "steps_beside_writes_s": steps_beside_s}}


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--steps-between", type=int, default=30, help="Optimizer steps between checkpoints.")
    parser.add_argument("--s3-uri", help="Also measure on this S3 prefix (s3://bucket/prefix?endpoint_override=...).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    results = {"device": args.device, "model": f"hidden {args.hidden_dim}, {args.num_layers} layers"}
    with tempfile.TemporaryDirectory(prefix="stall-local-") as local:
        results["local"] = measure(args, parse_location(local))
    if args.s3_uri:
        results["s3"] = measure(args, parse_location(args.s3_uri))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
