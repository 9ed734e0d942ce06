"""Score a checkpoint on a labelled split: `python -m raytrain_app.evaluate --checkpoint X --data D`.

    python -m raytrain_app.evaluate --checkpoint checkpoints/best_model.pt --data data/demo.pkl
    python -m raytrain_app.evaluate --checkpoint s3://bucket/runs/run-1 --data s3://bucket/data --split val \
        --out s3://bucket/eval/run-1

X is anything --resume-from-checkpoint accepts (a .pt file, a checkpoint folder, a run folder meaning its best
checkpoint; a local path or a URI). D is a dataset pickle or Parquet data with the split asked for (default
test: a pickle's 'test' key, or test.parquet / test/ beside train). For a classifier it prints the loss, the
accuracy and per-class precision, recall, F1 and support, and writes OUT/metrics.json and OUT/confusion.png; for a
regression model the loss (MSE), RMSE, MAE and R2, and writes OUT/metrics.json and OUT/regression.png (predicted
against true). The model runs as it was trained, inputs standardised with the statistics in its weights; in fp32,
one batch at a time.
"""

from __future__ import annotations

import argparse
import sys

import torch

from raytrain_app.checkpoint.inference import TrainedModel, load_trained_model
from raytrain_app.cli.errors import run_command
from raytrain_app.core.config import REGRESSION, TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.evaluation import RegressionTally, Tally, class_report, tally, tally_regression
from raytrain_app.core.model_spec import data_shape
from raytrain_app.datasets.dataset import SPLITS, Dataset
from raytrain_app.datasets.formats import open_dataset
from raytrain_app.datasets.order import RowSource
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.evaluation_report import (
    CONFUSION_FILE,
    METRICS_FILE,
    REGRESSION_FILE,
    confusion_png,
    metrics_json,
    plotted_points,
    regression_png,
    table,
)
from raytrain_app.storage.location import Location, check_bucket, parse_location
from raytrain_app.storage.publish import publish_bytes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raytrain_app.evaluate", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="What to score: anything --resume-from-checkpoint accepts.")
    p.add_argument("--data", required=True, help="A dataset pickle or Parquet data (local path or URI).")
    p.add_argument("--split", choices=SPLITS, default="test", help="The split to score (default: test).")
    p.add_argument("--out", default=None, help="Where metrics.json and confusion.png (regression.png for a "
                                               "regression model) go, a folder or URI (default: "
                                               "./evaluation-<split>).")
    p.add_argument("--batch-size", type=int, default=256, help="Sequences per forward pass.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument("--debug", action="store_true", help="Show the full traceback with an error message.")
    return p


def main(argv: list[str] | None = None) -> int:
    configure_console()
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: evaluate(args), debug=args.debug)


def check_fits(cfg: TrainConfig, data: Dataset, args: argparse.Namespace) -> None:
    """The data has the task and shapes the checkpoint's model was built for, or one UserError line saying which
    not."""
    expected = data_shape(cfg).input_shape
    if len(data.input_shape) == len(expected) <= 2:  # a row or a sequence: name the axis that differs
        axes = [("feature dimension", data.input_shape[-1], expected[-1])]
        if len(expected) == 2:
            axes.append(("sequence length", data.input_shape[0], expected[0]))
    else:
        axes = [("input shape", list(data.input_shape), list(expected))]
    noun, whole = ("targets", "sample") if cfg.task == REGRESSION else ("labels", "sequence")
    kinds = {True: f"per-step {noun} [N, T]", False: f"per-{whole} {noun} [N]"}
    mismatches = [f"{what} {found} (checkpoint has {expected})" for what, found, expected in (
        *axes, ("task", data.task, cfg.task), (noun, kinds[data.per_step], kinds[cfg.per_step]))
        if found != expected]
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
    label = f"--data {args.data} ({args.split} split)"
    if cfg.task == REGRESSION:
        return report_regression(tally_regression(model, batches, device, label=label), trained, data, source,
                                 args.split, out)
    return report_classification(tally(model, batches, cfg.num_classes, device, label=label), trained, data, source,
                                 args.split, out)


def report_classification(result: Tally, trained: TrainedModel, data: Dataset, source: RowSource, split: str,
                          out: Location) -> int:
    """Write and print a classifier's scores: metrics.json, the per-class table and the confusion matrix."""
    cfg = trained.cfg
    classes = class_report(result.confusion)
    report = {
        "checkpoint": trained.source.uri, "global_step": trained.global_step, "data": data.uri, "split": split,
        "rows": source.num_rows, "count": result.count, "per_step": cfg.per_step,
        "loss": result.loss, "accuracy": result.accuracy,
        "macro": {k: sum(r[k] for r in classes) / len(classes) for k in ("precision", "recall", "f1")},
        "classes": classes, "confusion": result.confusion.tolist(),
    }
    publish_bytes(metrics_json(report), out.join(METRICS_FILE))
    publish_bytes(confusion_png(report["confusion"], f"{split}: {trained.source.uri}"), out.join(CONFUSION_FILE))
    print(f"Scored {trained.source.uri} (global step {trained.global_step}) on the {split} split of {data.uri}: "
          f"{source.num_rows} rows" + (f", {result.count} labelled steps" if cfg.per_step else ""))
    print(f"  loss {result.loss:.6f}  accuracy {result.accuracy:.4f}")
    print("\n".join(table(report)))
    print(f"  Metrics: {out.join(METRICS_FILE)}")
    print(f"  Confusion matrix: {out.join(CONFUSION_FILE)}")
    return 0


def report_regression(result: RegressionTally, trained: TrainedModel, data: Dataset, source: RowSource, split: str,
                      out: Location) -> int:
    """Write and print a regression model's scores: metrics.json and the predicted-against-true plot."""
    cfg = trained.cfg
    report = {
        "task": REGRESSION, "checkpoint": trained.source.uri, "global_step": trained.global_step, "data": data.uri,
        "split": split, "rows": source.num_rows, "count": result.count, "per_step": cfg.per_step,
        "loss": result.loss, "rmse": result.rmse, "mae": result.mae, "r2": result.r2,
    }
    shown = torch.tensor(plotted_points(result.count), dtype=torch.int64)
    title = (f"{split}: {trained.source.uri}\nRMSE {result.rmse:.4g}  MAE {result.mae:.4g}  R2 {result.r2:.4f}"
             + (f" ({len(shown):,} of {result.count:,} points)" if len(shown) < result.count else ""))
    publish_bytes(metrics_json(report), out.join(METRICS_FILE))
    publish_bytes(regression_png(result.truth[shown].tolist(), result.predicted[shown].tolist(), title),
                  out.join(REGRESSION_FILE))
    print(f"Scored {trained.source.uri} (global step {trained.global_step}) on the {split} split of {data.uri}: "
          f"{source.num_rows} rows" + (f", {result.count} targets (one per step)" if cfg.per_step else ""))
    print(f"  loss {result.loss:.6f}  RMSE {result.rmse:.6f}  MAE {result.mae:.6f}  R2 {result.r2:.4f}")
    print(f"  Metrics: {out.join(METRICS_FILE)}")
    print(f"  Predicted against true: {out.join(REGRESSION_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
