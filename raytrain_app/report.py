"""A run's report: `python -m raytrain_app.report RUN [--out loss.png]`.

RUN is a run folder (`<save-dir>/<run-name>`), a local path or a URI. Prints the run's settings, steps, best
validation loss and every resume with its step and cause (from its metrics.jsonl), and writes loss.png: the
training EMA loss and the validation loss against the global step, resume points marked. The plot goes into the
run folder unless --out names another file.
"""

from __future__ import annotations

import argparse
import sys

from raytrain_app.cli.errors import run_command
from raytrain_app.core.errors import UserError
from raytrain_app.observability.console import configure_console
from raytrain_app.observability.metrics import METRICS_FILE, read_rows
from raytrain_app.observability.run_report import PLOT_FILE, plot, summary
from raytrain_app.storage.location import check_bucket, parse_location
from raytrain_app.storage.publish import publish_bytes


def main(argv: list[str] | None = None) -> int:
    configure_console()
    parser = argparse.ArgumentParser(prog="python -m raytrain_app.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder: <save-dir>/<run-name>, a local path or a URI")
    parser.add_argument("--out", help=f"where to write the plot (default: {PLOT_FILE} in the run folder)")
    args = parser.parse_args(argv)
    return run_command(lambda: report(args.run, args.out))


def report(run_uri: str, out_uri: str | None) -> int:
    run = parse_location(run_uri, flag="RUN")
    check_bucket(run)
    rows = read_rows(run.join(METRICS_FILE))
    if not rows:
        raise UserError(f"{run_uri} has no {METRICS_FILE}: pass a run folder (<save-dir>/<run-name>) of a run that "
                        "has saved a checkpoint")
    out = parse_location(out_uri, flag="--out") if out_uri else run.join(PLOT_FILE)
    for line in summary(run, rows):
        print(line)
    publish_bytes(plot(rows, run.name), out)
    print(f"Plot: {out.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
