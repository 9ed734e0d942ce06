"""Optimizer steps per second of the same model, data and training loop run under Ray Train's TorchTrainer with
one worker (`python -m raytrain_app.main`) and in a bare Python process, side by side in one run; the ratio.
Prints one JSON object.

Both run the project's loop (`Trainer.fit`) with the same settings, validations and checkpoints written in the
background; the bare process writes its checkpoints to a local folder with the same writer and reports nothing,
and uses one intra-op thread, as Ray gives a one-CPU worker.
Under Ray the time is the loop's own, as the worker records it in metrics.jsonl (the `finished` event): Ray's
start-up, placement and the worker group's start are not in it, and are printed beside it (`command_s`). Every run's
raw figures (steps, checkpoints, loop seconds) are printed under "runs"; the best of each side is the figure.

    python benchmarks/ray_overhead.py [--rows 16384] [--epochs 2] [--eval-every 200] [--hidden-dim 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from raytrain_app.checkpoint.state import with_training_state


def train_argv(args: argparse.Namespace, data: str, save_dir: str) -> list[str]:
    return ["--data", data, "--save-dir", save_dir, "--num-workers", "1", "--epochs", str(args.epochs),
            "--eval-every", str(args.eval_every), "--hidden-dim", str(args.hidden_dim), "--num-layers",
            str(args.num_layers), "--num-heads", "4", "--batch-size", str(args.batch_size), "--progress-every", "3600"]


def bare(argv: list[str]) -> dict:
    """The loop in this process: what `ray_adapter.worker.train_func` does, without Ray."""
    import torch

    from raytrain_app.checkpoint.format import save_checkpoint_dir
    from raytrain_app.checkpoint.writer import CheckpointWriter
    from raytrain_app.cli.flags import parse_config
    from raytrain_app.core.model_spec import build_model
    from raytrain_app.core.rng import seed_everything
    from raytrain_app.core.trainer import Trainer
    from raytrain_app.datasets.formats import open_dataset

    # Ray gives a worker with one CPU one intra-op thread (OMP_NUM_THREADS=1): the same here.
    torch.set_num_threads(1)
    cfg, _ = parse_config(argv)
    data = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    cfg = cfg.replace(feature_dim=data.feature_dim, seq_len=data.seq_len, num_classes=data.num_classes)
    seed_everything(cfg.seed, 0)
    model = build_model(cfg)
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    folder = tempfile.mkdtemp(prefix="bare-ckpt-")

    def write(snapshot: dict, is_best: bool, dir_name: str) -> None:
        save_checkpoint_dir(os.path.join(folder, dir_name), snapshot)

    writer = CheckpointWriter(write, lambda metrics, checkpoint, dir_name, urgent: None, rank=0)
    trainer.checkpoints = writer
    started = time.perf_counter()
    trainer.fit(data, with_training_state(trainer, lambda metrics, state, is_best: writer.submit(
        metrics, state, is_best, f"checkpoint_step={metrics['global_step']:06d}")))
    writer.flush()
    loop_s = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    return {"steps": trainer.global_step, "checkpoints": writer.checkpoints, "loop_s": loop_s,
            "steps_per_s": trainer.global_step / loop_s}


def under_ray(argv: list[str], save_dir: str) -> dict:
    started = time.perf_counter()
    # A cluster named by RAY_ADDRESS, else a local instance the command starts (and stops) itself.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    result = subprocess.run([sys.executable, "-m", "raytrain_app.main", *argv], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"the Ray run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    from raytrain_app.observability.metrics import read_rows
    from raytrain_app.storage.location import parse_location

    (run_dir,) = [p for p in Path(save_dir).iterdir() if p.name.startswith("run-")]
    rows = read_rows(parse_location(str(run_dir / "metrics.jsonl")))
    loop = [r for r in rows if r.get("event") == "finished"][-1]
    return {"steps": loop["steps"], "checkpoints": sum(r.get("kind") == "checkpoint" for r in rows),
            "loop_s": loop["loop_s"], "steps_per_s": loop["steps"] / loop["loop_s"],
            "command_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each, alternated; the best of each counts.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the bare run, in a process of its own like the Ray worker
        print(json.dumps(bare(json.loads(args.child))))
        return
    from raytrain_app.datasets.formats import make_synthetic, write_pickle_atomic

    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        data = os.path.join(tmp, "data.pkl")
        write_pickle_atomic(make_synthetic(num_train=args.rows, num_val=512, seq_len=32, feature_dim=16,
                                           num_classes=4, per_step=False, seed=0), data)
        bares, rays = [], []
        for i in range(args.repeats):  # alternated, so both see the same machine; the best of each is kept
            bare_argv = train_argv(args, data, os.path.join(tmp, f"bare-{i}"))
            child = subprocess.run([sys.executable, __file__, "--child", json.dumps(bare_argv)], capture_output=True,
                                   text=True, check=True, cwd=REPO_ROOT)
            bares.append(json.loads(child.stdout))
            rays.append(under_ray(train_argv(args, data, os.path.join(tmp, f"ray-{i}")), os.path.join(tmp, f"ray-{i}")))
    plain = max(bares, key=lambda r: r["steps_per_s"])
    ray_run = max(rays, key=lambda r: r["steps_per_s"])
    assert plain["steps"] == ray_run["steps"], (plain, ray_run)
    print(json.dumps({"steps": plain["steps"], "bare": plain, "ray_train_1_worker": ray_run,
                      "steps_per_s_ratio_ray_vs_bare": ray_run["steps_per_s"] / plain["steps_per_s"],
                      "target_ratio": 0.97, "repeats": args.repeats, "runs": {"bare": bares, "ray": rays}}, indent=1))


if __name__ == "__main__":
    main()
