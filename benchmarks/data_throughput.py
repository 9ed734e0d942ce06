"""Samples per second delivered to the training step, and peak memory, Parquet streaming vs in-memory pickle.

"Delivered to the training step" is measured with the project's real train step (default model, on CPU);
the reader alone (no step) is measured beside it.

Both readers serve the same rows in the same order (raytrain_app.datasets.order). Each measurement runs in its own
process so that its peak resident memory (VmHWM) is its own. The reader alone is measured at 1x only, the one size
a figure compares it at. Prints one JSON object: the figures, and under "runs" each measurement's raw counts and
seconds they are computed from.

    python benchmarks/data_throughput.py [--rows 8192] [--seq-len 64] [--feature-dim 32] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def measure(data: str, batch_size: int, epochs: int, step: str) -> dict:
    """In a child process: open the dataset and feed `epochs` epochs of rank 0's batches to a step: the
    project's real training step (default model, CPU), or none (the reader alone)."""
    import torch

    from raytrain_app.core.config import TrainConfig
    from raytrain_app.core.model_spec import build_model
    from raytrain_app.core.trainer import Trainer
    from raytrain_app.datasets.formats import open_dataset
    from raytrain_app.datasets.order import shard_batches

    started = time.perf_counter()
    ds = open_dataset(data)
    open_s = time.perf_counter() - started
    cfg = TrainConfig(feature_dim=ds.feature_dim, seq_len=ds.seq_len, num_classes=ds.num_classes, num_workers=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    samples, started = 0, time.perf_counter()
    for epoch in range(epochs):
        for _, x, y in shard_batches(ds.train, seed=0, epoch=epoch, rank=0, world_size=1, batch_size=batch_size):
            if step == "train":
                trainer.train_step([(x, y)])
            samples += x.shape[0]
    loop_s = time.perf_counter() - started
    return {"train_rows": ds.train.num_rows, "samples": samples, "steps": trainer.global_step, "loop_s": loop_s,
            "samples_per_s": samples / loop_s, "open_s": open_s, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child
    would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(data: str, batch_size: int, epochs: int, step: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", data, "--batch-size", str(batch_size),
                          "--epochs", str(epochs), "--step", step], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write_datasets(root: Path, rows: int, seq_len: int, feature_dim: int) -> tuple[dict[str, str], int]:
    """The same synthetic rows as a pickle and as Parquet; their paths, and the bytes of the training features."""
    from raytrain_app.datasets.formats import make_synthetic, write_pickle_atomic
    from raytrain_app.datasets.parquet import write_parquet_dataset

    raw = make_synthetic(num_train=rows, num_val=64, seq_len=seq_len, feature_dim=feature_dim, num_classes=4,
                         per_step=False, seed=0)
    write_pickle_atomic(raw, str(root / "data.pkl"))
    write_parquet_dataset(str(root / "parquet"), (raw["train"]["x"], raw["train"]["y"]),
                          (raw["val"]["x"], raw["val"]["y"]), 4)
    return {"pickle": str(root / "data.pkl"), "parquet": str(root / "parquet")}, raw["train"]["x"].nbytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192, help="Training rows at 1x (4x is measured too).")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--child")
    parser.add_argument("--step", default="train", choices=("train", "none"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch_size, args.epochs, args.step)))
        return
    results: dict[str, dict] = {}
    features_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 4):
            root = Path(tmp) / f"x{scale}"
            root.mkdir()
            paths, features_bytes[f"{scale}x"] = write_datasets(root, args.rows * scale, args.seq_len,
                                                                args.feature_dim)
            for reader, path in paths.items():
                results[f"{reader}_{scale}x"] = run_child(path, args.batch_size, args.epochs, "train")
                if scale == 1:
                    results[f"{reader}_1x_reader_only"] = run_child(path, args.batch_size, args.epochs, "none")
    summary = {
        "dataset_1x_mb": round(features_bytes["1x"] / 2**20, 1),
        "train_features_bytes": features_bytes,
        "throughput_ratio_parquet_vs_pickle_1x": results["parquet_1x"]["samples_per_s"]
        / results["pickle_1x"]["samples_per_s"],
        "throughput_ratio_parquet_vs_pickle_4x": results["parquet_4x"]["samples_per_s"]
        / results["pickle_4x"]["samples_per_s"],
        "reader_only_ratio_parquet_vs_pickle_1x": results["parquet_1x_reader_only"]["samples_per_s"]
        / results["pickle_1x_reader_only"]["samples_per_s"],
        "peak_memory_growth_1x_to_4x_parquet": results["parquet_4x"]["peak_rss_mb"]
        / results["parquet_1x"]["peak_rss_mb"] - 1,
        "peak_memory_growth_1x_to_4x_pickle": results["pickle_4x"]["peak_rss_mb"]
        / results["pickle_1x"]["peak_rss_mb"] - 1,
        "runs": results,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
