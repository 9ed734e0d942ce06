"""Datasets from the command line: `python -m raytrain_app.data synth|convert`.

    python -m raytrain_app.data synth --out data/demo.pkl                 # a synthetic, learnable dataset
    python -m raytrain_app.data synth --format parquet --out data/demo    # the same as Parquet files
    python -m raytrain_app.data synth --task regression --input-shape 6 --out data/rows.pkl   # rows [N, 6], float y
    python -m raytrain_app.data convert data/demo.pkl data/demo-parquet   # a pickle's splits as Parquet

The format itself, its safe loading, order and sharding: raytrain_app.datasets (docs/data.md).
"""

from __future__ import annotations

import argparse
import sys

from raytrain_app.cli.errors import run_command
from raytrain_app.datasets.dataset import Split
from raytrain_app.datasets.formats import load_dataset, make_synthetic, write_pickle_atomic
from raytrain_app.observability.console import configure_console


def _add_size_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--num-test", type=int, default=256, help="A test split for evaluate (0: none).")
    parser.add_argument("--seq-len", type=int, default=None, help="Steps a sequence (default 16).")
    parser.add_argument("--feature-dim", type=int, default=None, help="Features a step (default 8).")
    parser.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="DIM",
                        help="One sample's shape instead of --seq-len/--feature-dim: 6 for rows [N, 6], 16 8 for "
                             "sequences [N, 16, 8], 4 5 8 for [N, 4, 5, 8].")
    parser.add_argument("--task", choices=("classification", "regression"), default="classification",
                        help="Integer classes, or float targets (a noisy linear map of the features).")
    parser.add_argument("--num-classes", type=int, default=None, help="Classes (default 4; classification only).")
    parser.add_argument("--per-step", action="store_true", help="One target per step ([N, T] labels).")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    configure_console()
    parser = argparse.ArgumentParser(prog="python -m raytrain_app.data")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="Write a synthetic, learnable dataset.")
    synth.add_argument("--out", required=True, help="Output: a .pkl file, or a folder / URI for Parquet.")
    synth.add_argument("--format", choices=("pickle", "parquet"), default="pickle")
    _add_size_flags(synth)
    convert = sub.add_parser(
        "convert", help="Convert a dataset pickle to Parquet (OUT/train.parquet, val.parquet, test.parquet).")
    convert.add_argument("source", help="The dataset .pkl (local path or URI).")
    convert.add_argument("out", help="Output folder or URI.")
    convert.add_argument("--val-fraction", type=float, default=0.1,
                         help="Held out when the pickle has no 'val' (the same rows training would hold out).")
    convert.add_argument("--seed", type=int, default=0, help="The seed training will use (for the held-out rows).")
    args = parser.parse_args(argv)
    return run_command(lambda: _synth(parser, args) if args.command == "synth" else _convert(args))


def _synth_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, ...]:
    """One sample's input shape from --input-shape, or --seq-len and --feature-dim (defaults 16 and 8)."""
    if args.input_shape is not None:
        if args.seq_len is not None or args.feature_dim is not None:
            parser.error("--input-shape replaces --seq-len and --feature-dim: give one or the other")
        if any(d <= 0 for d in args.input_shape):
            parser.error("--input-shape must be positive sizes, e.g. --input-shape 6 or --input-shape 16 8")
        shape = tuple(args.input_shape)
    else:
        shape = (16 if args.seq_len is None else args.seq_len, 8 if args.feature_dim is None else args.feature_dim)
        for name, value in zip(("seq_len", "feature_dim"), shape, strict=True):
            if value <= 0:
                parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.per_step and len(shape) < 2:
        parser.error(f"--per-step needs sequences: --input-shape {' '.join(map(str, shape))} is rows without steps")
    return shape


def _synth(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for name in ("num_train", "num_val"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    shape = _synth_shape(parser, args)
    if args.num_test < 0:
        parser.error("--num-test must not be negative")
    regression = args.task == "regression"
    if regression and args.num_classes is not None:
        parser.error("--num-classes is for --task classification; regression targets are floats")
    num_classes = 0 if regression else 4 if args.num_classes is None else args.num_classes
    if not regression and num_classes < 2:
        parser.error("--num-classes must be at least 2")
    data = make_synthetic(
        num_train=args.num_train, num_val=args.num_val, input_shape=shape, num_classes=num_classes,
        per_step=args.per_step, seed=args.seed, num_test=args.num_test, task=args.task,
    )
    if args.format == "parquet":
        from raytrain_app.datasets.parquet import write_parquet_dataset

        test = data.get("test")
        write_parquet_dataset(args.out, (data["train"]["x"], data["train"]["y"]),
                              (data["val"]["x"], data["val"]["y"]), data.get("num_classes"),
                              (test["x"], test["y"]) if test else None)
    else:
        write_pickle_atomic(data, args.out)
    per = "per-step" if args.per_step else "per-sequence" if len(shape) >= 2 else "per-row"
    print(f"Wrote {args.out}: train {args.num_train} x [{', '.join(map(str, shape))}], "
          f"val {args.num_val}, test {args.num_test}, "
          + (f"{per} regression targets" if regression else f"{num_classes} classes, {per} labels"))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from raytrain_app.datasets.parquet import write_parquet_dataset

    ds = load_dataset(args.source, val_fraction=args.val_fraction, seed=args.seed)
    train, val, test = ds.train, ds.val, ds.test
    assert isinstance(train, Split) and isinstance(val, Split)
    out = write_parquet_dataset(args.out, (train.x.numpy(), train.y.numpy()), (val.x.numpy(), val.y.numpy()),
                                ds.num_classes if ds.num_classes_given else None,
                                (test.x.numpy(), test.y.numpy()) if isinstance(test, Split) else None)
    print(f"Wrote {out}: train {train.num_rows} rows, val {val.num_rows} rows"
          + (f", test {test.num_rows} rows" if test is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
