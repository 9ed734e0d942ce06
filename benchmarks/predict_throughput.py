"""Rows per second of `python -m raytrain_app.predict` (Ray Data: read tasks, a pool of model replicas, Parquet
written and moved into place) against a bare PyTorch loop over the same rows in one process, side by side in one
run, both on CPU; the ratio. Prints one JSON object.

The same model (random weights, the default architecture unless told otherwise) and the same batch size both ways.
The bare loop runs the forward pass, softmax and argmax over rows already in memory as one tensor, with as many
torch threads as the machine has cores; reading the Parquet files into that tensor is timed beside it, not in it.
The Ray side is the command's own `pipeline_s` (in the _SUCCESS file it writes): from the moment it is connected
to Ray to the moment every output file is written and counted, so it includes starting the replicas (each imports
torch and builds the model), reading and decoding, scoring and writing. Joining or starting Ray is excluded from
both sides and printed beside it (`command_s`). The cluster is RAY_ADDRESS's, or a local instance the command
starts itself. Every run's raw figures (rows, seconds) are printed under "runs"; the best of each side is the figure.

    python benchmarks/predict_throughput.py [--rows 60000] [--files 4] [--seq-len 32] [--feature-dim 8]
        [--batch-size 256] [--num-replicas N] [--cpus-per-replica 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def write_inputs(root: Path, args: argparse.Namespace) -> tuple[str, str]:
    """A checkpoint of the model with random weights, and `--files` Parquet files of `--rows` rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raytrain_app.core.config import TrainConfig
    from raytrain_app.core.model_spec import build_model

    cfg = TrainConfig(hidden_dim=args.hidden_dim, num_layers=args.num_layers, num_heads=args.num_heads,
                      feature_dim=args.feature_dim, seq_len=args.seq_len, num_classes=args.num_classes, dropout=0.0)
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save({"model_state_dict": build_model(cfg).state_dict(), "config": cfg.to_dict(),
                "global_step": 0, "epoch": 0}, checkpoint)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    size = args.seq_len * args.feature_dim
    for i, rows in enumerate(np.array_split(np.arange(args.rows), args.files)):
        x = rng.standard_normal((len(rows), size), dtype=np.float32)
        table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), size),
                          "id": pa.array(rows.astype(np.int64))})
        metadata = {"seq_len": str(args.seq_len), "feature_dim": str(args.feature_dim)}
        pq.write_table(table.replace_schema_metadata(metadata), data / f"part-{i:03d}.parquet",
                       row_group_size=1024, compression="none")
    return str(checkpoint), str(data)


def bare(checkpoint: str, data: str, batch_size: int) -> dict:
    """In a process of its own: the model over every row in memory, batch by batch, with one torch thread a core."""
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    from raytrain_app.checkpoint.inference import load_trained_model

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    trained = load_trained_model(checkpoint)
    cfg = trained.cfg
    column = pads.dataset(data, format="parquet").to_table(columns=["x"]).column("x").combine_chunks()
    x = torch.from_numpy(np.array(column.flatten(), dtype=np.float32).reshape(-1, cfg.seq_len, cfg.feature_dim))
    model = trained.build()
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            probabilities, predicted = torch.softmax(logits, dim=-1), logits.argmax(dim=-1)
            rows += len(predicted)
    loop_s = time.perf_counter() - started
    assert probabilities.shape[-1] == cfg.num_classes
    return {"rows": rows, "loop_s": loop_s, "rows_per_s": rows / loop_s, "read_s": read_s,
            "threads": torch.get_num_threads()}


def under_ray(checkpoint: str, data: str, out: str, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    command = [sys.executable, "-m", "raytrain_app.predict", "--checkpoint", checkpoint, "--data", data, "--out", out,
               "--batch-size", str(args.batch_size), "--cpus-per-replica", str(args.cpus_per_replica),
               *(["--num-replicas", args.num_replicas] if args.num_replicas else [])]
    # A cluster named by RAY_ADDRESS, else a local instance the command starts (and stops) itself.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"predict failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = json.loads(Path(out, "_SUCCESS").read_text())
    replicas = next(line for line in result.stdout.splitlines() if line.strip().startswith("Replicas:"))
    return {"rows": summary["rows"], "pipeline_s": summary["pipeline_s"],
            "rows_per_s": summary["rows"] / summary["pipeline_s"], "command_s": time.perf_counter() - started,
            "replicas": replicas.strip().removeprefix("Replicas: ").split(";")[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-replicas", help="predict's --num-replicas (default: its own default).")
    parser.add_argument("--cpus-per-replica", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each, alternated; the best of each counts.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the bare loop, in a process of its own like the replicas
        checkpoint, data, batch_size = args.child
        print(json.dumps(bare(checkpoint, data, int(batch_size))))
        return
    with tempfile.TemporaryDirectory(prefix="predict-throughput-") as tmp:
        checkpoint, data = write_inputs(Path(tmp), args)
        bares, rays = [], []
        for i in range(args.repeats):  # alternated, so both see the same machine; the best of each is kept
            child = subprocess.run([sys.executable, __file__, "--child", checkpoint, data, str(args.batch_size)],
                                   capture_output=True, text=True, check=True, cwd=REPO_ROOT)
            bares.append(json.loads(child.stdout))
            rays.append(under_ray(checkpoint, data, os.path.join(tmp, f"out-{i}"), args))
    plain = max(bares, key=lambda r: r["rows_per_s"])
    ray_run = max(rays, key=lambda r: r["rows_per_s"])
    assert plain["rows"] == ray_run["rows"] == args.rows, (plain, ray_run)
    print(json.dumps({"rows": args.rows, "batch_size": args.batch_size,
                      "model": f"hidden {args.hidden_dim}, {args.num_layers} layers, seq_len {args.seq_len}, "
                               f"feature_dim {args.feature_dim}",
                      "bare": plain, "ray_data": ray_run,
                      "rows_per_s_ratio_ray_vs_bare": ray_run["rows_per_s"] / plain["rows_per_s"],
                      "target_ratio": 0.8, "repeats": args.repeats, "runs": {"bare": bares, "ray": rays}}, indent=1))


if __name__ == "__main__":
    main()
