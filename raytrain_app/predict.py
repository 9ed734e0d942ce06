"""Batch predictions of a trained checkpoint over Parquet or pickle data, on Ray Data (docs/inference.md).

    python -m raytrain_app.predict --checkpoint X --data D --out OUT [--split test] [--num-replicas MIN-MAX]
        [--use-gpu] [--batch-size N] [--overwrite]

X is anything --resume-from-checkpoint accepts; D is Parquet (a file, a folder of files, or a dataset folder with
train/val/test splits, of which --split picks one) or a dataset pickle; OUT is a folder or URI that receives
Parquet files with one row per input row (row, id, predicted, probabilities, error; a regression model's
predicted is its float32 output and it has no probabilities) and a _SUCCESS marker.

The output is whole or absent: everything is written into OUT.partial beside it and moved into place only once
every row is there (a rename on a local disk; on object storage a copy, with _SUCCESS written last).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain_app.checkpoint.inference import TrainedModel, load_trained_model
from raytrain_app.cli.errors import EXIT_TRAINING_FAILED, USER_ERRORS, run_command
from raytrain_app.core.config import REGRESSION, TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.model_spec import data_shape
from raytrain_app.datasets.prediction_input import PredictionInput, Shape, open_prediction_input
from raytrain_app.observability.console import configure_console
from raytrain_app.ray_adapter.driver import connect_ray
from raytrain_app.ray_adapter.inference import IO_CPUS, cluster_replicas, predict_to
from raytrain_app.storage.location import Location, StorageError, check_bucket, parse_location

DEFAULT_BATCH_SIZE = 256
SUCCESS_FILE = "_SUCCESS"  # written last: an output folder without it is not a finished output
STAGING_SUFFIX = ".partial"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raytrain_app.predict", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, metavar="X",
                        help="A .pt file, a checkpoint folder or a run folder (its best checkpoint); path or URI.")
    parser.add_argument("--data", required=True, metavar="D",
                        help="Parquet file(s) or folder, a dataset folder with splits, or a dataset .pkl.")
    parser.add_argument("--out", required=True, metavar="OUT", help="The output folder or URI (Parquet files).")
    parser.add_argument("--split", help="Which split of a dataset with splits to score (default: test).")
    parser.add_argument("--num-replicas", metavar="MIN-MAX",
                        help="Model replicas: N, or MIN-MAX for a pool Ray Data resizes (it starts with as many "
                             "as the input has blocks for, up to MAX). Default: 1 to as many as the cluster has "
                             "room for, beside one CPU for reading and writing.")
    parser.add_argument("--cpus-per-replica", type=int, default=1,
                        help="CPUs (and torch threads) each replica reserves (default 1).")
    parser.add_argument("--use-gpu", action="store_true", help="One GPU per replica.")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"Rows per forward pass (default {DEFAULT_BATCH_SIZE}).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output at --out.")
    parser.add_argument("--debug", action="store_true", help="Tracebacks on errors.")
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_console()
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: predict(build_parser().parse_args(argv)), debug="--debug" in argv,
                       interrupted="\nInterrupted: nothing was written to --out.")


def parse_replicas(text: str | None) -> tuple[int, int] | None:
    """`N` -> (N, N), `MIN-MAX` -> (MIN, MAX); None -> None (the cluster decides)."""
    if text is None:
        return None
    low, _, high = text.partition("-")
    try:
        sizes = (int(low), int(high or low))
    except ValueError:
        sizes = (0, 0)
    if not 1 <= sizes[0] <= sizes[1]:
        raise UserError(f"--num-replicas {text}: give N or MIN-MAX with 1 <= MIN <= MAX (e.g. 2 or 1-4)")
    return sizes


def check_args(args: argparse.Namespace) -> tuple[int, int] | None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give a positive number of rows")
    if args.cpus_per_replica < 1:
        raise UserError(f"--cpus-per-replica {args.cpus_per_replica}: give 1 or more")
    return parse_replicas(args.num_replicas)


def predict(args: argparse.Namespace) -> int:
    requested = check_args(args)
    model = load_trained_model(args.checkpoint, flag="--checkpoint")
    cfg = model.cfg
    source = open_prediction_input(args.data, args.split, Shape(*data_shape(cfg).input_shape))
    out = parse_location(args.out, flag="--out")
    check_bucket(out)
    staging = prepare_output(out, overwrite=args.overwrite)  # refuses an existing output before Ray starts
    # A local instance (no cluster to join) gets a logical CPU per core for replicas plus one for reading and
    # writing (see IO_CPUS): those tasks are light beside the model's forward passes.
    connect_ray(num_cpus=(os.cpu_count() or 1) + IO_CPUS)
    replicas = cluster_replicas(requested, cpus=args.cpus_per_replica, use_gpu=args.use_gpu)
    print(f"Scoring {source.describe()}", flush=True)
    print(f"  Model: {model.source} (global step {model.global_step}; {outputs_text(cfg)})")
    print(f"  Replicas: {replicas.min_size}" + (f"-{replicas.max_size}" if replicas.max_size > replicas.min_size
                                               else "")
          + f" x {'1 GPU' if replicas.use_gpu else f'{replicas.cpus} CPU'}, batch {args.batch_size}; "
          f"writing to {staging} until done", flush=True)
    started = time.perf_counter()
    try:
        predict_to(model, source, staging, replicas=replicas, batch_size=args.batch_size)
        summary = finish(model, source, staging, started)
        move_into_place(staging, out)
    except USER_ERRORS as e:  # storage failing once scoring has started is no mistake in the command: exit 1
        remove_tree(sibling(out, STAGING_SUFFIX), quiet=True)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except BaseException:
        remove_tree(sibling(out, STAGING_SUFFIX), quiet=True)  # best effort: a later run removes it anyway
        raise
    elapsed_s = time.perf_counter() - started
    rejected = summary["rows_rejected"]
    print(f"✅ Predicted {source.num_rows:,} rows in {elapsed_s:.1f} s ({source.num_rows / elapsed_s:,.0f} rows/s): "
          f"{summary['rows_scored']:,} scored, {rejected:,} rejected"
          + (" (the reason is in their error column)" if rejected else "") + f". Output: {out}")
    return 0


def outputs_text(cfg: TrainConfig) -> str:
    """What the model predicts, as the console says it."""
    if cfg.task == REGRESSION:
        return f"a value {'per step' if cfg.per_step else 'per sample'} (regression)"
    return f"a class {'per step' if cfg.per_step else 'per sequence'}, {cfg.num_classes} classes"


def finish(model: TrainedModel, source: PredictionInput, staging: Location, started: float) -> dict:
    """Check that every input row is in the staged output, and write its _SUCCESS marker (a summary)."""
    rows, rejected = count_rows(staging)
    if rows != source.num_rows:
        raise RuntimeError(f"the output has {rows} rows but the input {source.num_rows}: nothing was moved to --out")
    summary = {"rows": rows, "rows_scored": rows - rejected, "rows_rejected": rejected,
               "pipeline_s": round(time.perf_counter() - started, 3), "checkpoint": model.source.uri,
               "global_step": model.global_step, "data": source.label, "split": source.split, "files": source.files}
    staging.join(SUCCESS_FILE).write_bytes(json.dumps(summary, indent=1).encode())
    return summary


# --- the output: staged beside --out, moved into place whole -----------------------------------------------------

def sibling(location: Location, suffix: str) -> Location:
    """`location` with `suffix` added to its name, on the same storage (OUT -> OUT.partial)."""
    base, _, query = location.uri.partition("?")
    return parse_location(base.rstrip("/") + suffix + (f"?{query}" if query else ""))


def _names(folder: Location) -> list[str]:
    return [e.base_name for e in folder.list()] if folder.is_dir() else []


def prepare_output(out: Location, *, overwrite: bool) -> Location:
    """A new, empty staging folder for `out`: OUT.partial/<attempt>/ (what a killed earlier run left in OUT.partial
    is removed first; its own folder name keeps a write of that run still landing from this run's files).
    Refuses (UserError) an `out` that is a file, or a non-empty folder unless `overwrite` or unless it is what a
    run cut off while copying its output into place on object storage left (no _SUCCESS in it, and a whole
    staged output, _SUCCESS included, still in OUT.partial)."""
    staging_root = sibling(out, STAGING_SUFFIX)
    if out.is_file():
        raise UserError(f"--out {out} is a file: --out names a folder (it receives several Parquet files)")
    names = _names(out)
    if names and not overwrite:
        cut_off = SUCCESS_FILE not in names and any(
            staging_root.join(name, SUCCESS_FILE).is_file() for name in _names(staging_root))
        if not cut_off:
            raise UserError(f"--out {out} exists and is not empty: pass --overwrite to replace it, or choose "
                            "another --out")
        print(f"{out} holds part of an output whose copy into place was cut off: it is replaced.")
    remove_tree(staging_root)
    return staging_root.join(secrets.token_hex(4))


def remove_tree(location: Location, quiet: bool = False) -> None:
    """Delete a folder (or file) and everything under it, if it exists."""
    try:
        info = location.info()
        if info.type == pafs.FileType.Directory:
            location.fs.delete_dir(location.path)
        elif info.type == pafs.FileType.File:
            location.fs.delete_file(location.path)
    except (OSError, StorageError):
        if not quiet:
            raise


def count_rows(folder: Location) -> tuple[int, int]:
    """(rows, rows with an error) of the Parquet files in `folder`, from their footers: the row counts and the
    error column's null counts (read from the column itself where a writer left no statistics)."""
    rows = rejected = 0
    for name in _names(folder):
        if not name.endswith(".parquet"):
            continue
        with folder.fs.open_input_file(folder.join(name).path) as f:
            parquet = pq.ParquetFile(f)
            metadata = parquet.metadata
            error_index = parquet.schema_arrow.get_field_index("error")
            for g in range(metadata.num_row_groups):
                group = metadata.row_group(g)
                stats = group.column(error_index).statistics
                if stats is not None and stats.has_null_count:
                    rejected += group.num_rows - stats.null_count
                else:
                    column = parquet.read_row_group(g, columns=["error"]).column("error")
                    rejected += len(column) - column.null_count
                rows += group.num_rows
    return rows, rejected


def move_into_place(staging: Location, out: Location) -> None:
    """Make the whole staged output the output at `out`. Whatever `out` held goes first, its _SUCCESS before
    anything else (a reader never sees the marker over a part). Locally one rename of the folder. On object
    storage, which has no rename, each file is copied (server side) and _SUCCESS last: while the copies run,
    `out` holds files but no _SUCCESS. Then the staging folder (OUT.partial) is deleted."""
    if out.exists():
        out.join(SUCCESS_FILE).remove()
        remove_tree(out)
    if out.is_local:
        os.rename(staging.path, out.path)
    else:
        for name in sorted(_names(staging), key=lambda name: name == SUCCESS_FILE):  # the marker last
            out.fs.copy_file(staging.join(name).path, out.join(name).path)
    remove_tree(sibling(out, STAGING_SUFFIX))


if __name__ == "__main__":
    sys.exit(main())
