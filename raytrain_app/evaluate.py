"""Score a checkpoint on a labelled split: `python -m raytrain_app.evaluate --checkpoint X --data D`.

    python -m raytrain_app.evaluate --checkpoint checkpoints/best_model.pt --data data/demo.pkl
    python -m raytrain_app.evaluate --checkpoint s3://bucket/runs/run-1 --data s3://bucket/data --split val \
        --out s3://bucket/eval/run-1

X is anything --resume-from-checkpoint accepts (a .pt file, a checkpoint folder, a run folder meaning its best
checkpoint; a local path or a URI). D is a dataset pickle or Parquet data with the split asked for (default
test: a pickle's 'test' key, or test.parquet / test/ beside train). It prints the loss, the accuracy and
per-class precision, recall, F1 and support, and writes OUT/metrics.json and OUT/confusion.png. The model runs
as it was trained, inputs standardised with the statistics in its weights; in fp32, one batch at a time.
"""

from __future__ import annotations

import argparse
import sys

import torch

from raytrain_app.checkpoint.inference import load_trained_model
from raytrain_app.cli.errors import run_command
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.evaluation import class_report, tally
from raytrain_app.datasets.dataset import SPLITS, Dataset
from raytrain_app.datasets.formats import open_dataset
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.evaluation_report import (
    CONFUSION_FILE,
    METRICS_FILE,
    confusion_png,
    metrics_json,
    table,
)
from raytrain_app.storage.location import check_bucket, parse_location
from raytrain_app.storage.publish import publish_bytes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raytrain_app.evaluate", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="What to score: anything --resume-from-checkpoint accepts.")
    p.add_argument("--data", required=True, help="A dataset pickle or Parquet data (local path or URI).")
    p.add_argument("--split", choices=SPLITS, default="test", help="The split to score (default: test).")
    p.add_argument("--out", default=None, help="Where metrics.json and confusion.png go, a folder or URI "
                                               "(default: ./evaluation-<split>).")
    p.add_argument("--batch-size", type=int, default=256, help="Sequences per forward pass.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument("--debug", action="store_true", help="Show the full traceback with an error message.")
    return p


def main(argv: list[str] | None = None) -> int:
    configure_console()
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: evaluate(args), debug=args.debug)


def check_fits(cfg: TrainConfig, data: Dataset, args: argparse.Namespace) -> None:
    """The data has the shapes the checkpoint's model was built for, or one UserError line saying which not."""
    kinds = {True: "per-step labels [N, T]", False: "per-sequence labels [N]"}
    mismatches = [f"{what} {found} (checkpoint has {expected})" for what, found, expected in (
        ("feature dimension", data.feature_dim, cfg.feature_dim), ("sequence length", data.seq_len, cfg.seq_len),
        ("labels", kinds[data.per_step], kinds[cfg.per_step])) if found != expected]
    if mismatches:
        raise UserError(f"--data {args.data} does not fit --checkpoint {args.checkpoint}: {'; '.join(mismatches)}. "
                        "Score it on data shaped like the data it was trained on.")


def evaluate(args: argparse.Namespace) -> int:
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    out = parse_location(args.out or f"evaluation-{args.split}", flag="--out")
    check_bucket(out)
    trained = load_trained_model(args.checkpoint)
    cfg = trained.cfg
    # The held-out validation rows of a dataset without a 'val' split are the ones training held out.
    data = open_dataset(args.data, val_fraction=cfg.val_fraction, seed=cfg.seed, check_labels=False)
    check_fits(cfg, data, args)
    source = data.split(args.split)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = trained.build(device)
    batches = (source.read_rows(lo, min(lo + args.batch_size, source.num_rows))
               for lo in range(0, source.num_rows, args.batch_size))
    result = tally(model, batches, cfg.num_classes, device, label=f"--data {args.data} ({args.split} split)")
    classes = class_report(result.confusion)
    report = {
        "checkpoint": trained.source.uri, "global_step": trained.global_step, "data": data.uri, "split": args.split,
        "rows": source.num_rows, "count": result.count, "per_step": cfg.per_step,
        "loss": result.loss, "accuracy": result.accuracy,
        "macro": {k: sum(r[k] for r in classes) / len(classes) for k in ("precision", "recall", "f1")},
        "classes": classes, "confusion": result.confusion.tolist(),
    }
    publish_bytes(metrics_json(report), out.join(METRICS_FILE))
    publish_bytes(confusion_png(report["confusion"], f"{args.split}: {trained.source.uri}"), out.join(CONFUSION_FILE))
    print(f"Scored {trained.source.uri} (global step {trained.global_step}) on the {args.split} split of {data.uri}: "
          f"{source.num_rows} rows" + (f", {result.count} labelled steps" if cfg.per_step else ""))
    print(f"  loss {result.loss:.6f}  accuracy {result.accuracy:.4f}")
    print("\n".join(table(report)))
    print(f"  Metrics: {out.join(METRICS_FILE)}")
    print(f"  Confusion matrix: {out.join(CONFUSION_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
