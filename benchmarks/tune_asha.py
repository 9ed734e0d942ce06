"""Wall time of a learning-rate sweep with ASHA early stopping against the same sweep with none; the ratio.
Prints one JSON object.

Both sweeps start every trial from the same base checkpoint (trained here first, in this process) and try the
same learning rates: a few sensible ones and a few that diverge, which is what ASHA is for. Each sweep is one
`python -m raytrain_app.tune` command; its wall time includes the start of a local Ray instance unless
RAY_ADDRESS names a running cluster (the figures in docs/performance.md were taken on one). Beside the ratio, each
sweep's trials are printed as its results.csv has them: learning rate, status and optimizer steps trained.
`--only asha` (or `none`) runs one of the two sweeps, and prints no ratio.

    python benchmarks/tune_asha.py [--rows 1024] [--epochs 4] [--lrs 1e-3,3e-3,1,3,10] [--only asha|none]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from raytrain_app.checkpoint.state import with_training_state


def sweep_trials(save_dir: str) -> list[dict]:
    """The trials of the one sweep under `save_dir`, as its results.csv lists them."""
    (sweep,) = [p for p in Path(save_dir).iterdir() if p.name.startswith("sweep-")]
    with open(sweep / "results.csv", newline="") as f:
        return [{"lr": float(row["lr"]), "status": row["status"], "steps_trained": int(row["steps_trained"])}
                for row in csv.DictReader(f)]


def run(module: str, argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def train_base(data: str, model_flags: list[str], folder: str) -> str:
    """The sweep's base checkpoint: one epoch of the project's loop, here in this process (no Ray needed)."""
    import torch

    from raytrain_app.checkpoint.format import write_best_model
    from raytrain_app.cli.flags import parse_config
    from raytrain_app.core.model_spec import build_model
    from raytrain_app.core.rng import seed_everything
    from raytrain_app.core.trainer import Trainer
    from raytrain_app.datasets.formats import open_dataset

    cfg, _ = parse_config(["--data", data, "--epochs", "1", "--num-workers", "1", *model_flags])
    dataset = open_dataset(data)
    cfg = cfg.replace(feature_dim=dataset.feature_dim, seq_len=dataset.seq_len, num_classes=dataset.num_classes)
    seed_everything(cfg.seed, 0)
    model = build_model(cfg)
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    states: list[dict] = []
    trainer.fit(dataset, with_training_state(trainer, lambda metrics, state, is_best: states.append(state)))
    write_best_model(folder, states[-1])  # best_model.pt, the way a run publishes its best
    return os.path.join(folder, "best_model.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4, help="Each trial's total epochs (the base has 1).")
    parser.add_argument("--lrs", default="1e-3,3e-3,1,3,10")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--max-concurrent-trials", type=int, default=2)
    parser.add_argument("--only", choices=("asha", "none"), help="Run only this sweep (no ratio).")
    args = parser.parse_args()
    from raytrain_app.datasets.formats import make_synthetic, write_pickle_atomic

    with tempfile.TemporaryDirectory(prefix="tune-asha-") as tmp:
        data = os.path.join(tmp, "data.pkl")
        write_pickle_atomic(make_synthetic(num_train=args.rows, num_val=256, seq_len=16, feature_dim=8,
                                           num_classes=4, per_step=False, seed=0), data)
        model = ["--hidden-dim", "32", "--num-layers", "2", "--num-heads", "2", "--batch-size", "32"]
        base = train_base(data, model, os.path.join(tmp, "base"))
        figures: dict = {"trials": len(args.lrs.split(","))}
        for scheduler in [args.only] if args.only else ["asha", "none"]:
            save_dir = os.path.join(tmp, scheduler)
            wall_s = run("raytrain_app.tune", [
                "--base-checkpoint", base, "--data", data, "--save-dir", save_dir,
                "--lr-grid", args.lrs, "--scheduler", scheduler, "--epochs", str(args.epochs),
                "--eval-every", str(args.eval_every), "--max-concurrent-trials", str(args.max_concurrent_trials),
                "--num-workers", "1", *model])
            trials = sweep_trials(save_dir)
            stopped = sum(t["status"] == "stopped early" for t in trials)
            figures[scheduler] = {"wall_s": wall_s, "stopped_early": stopped, "trials": trials}
    if not args.only:
        figures["wall_ratio_asha_vs_none"] = figures["asha"]["wall_s"] / figures["none"]["wall_s"]
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
