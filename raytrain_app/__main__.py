"""`raytrain COMMAND [flags]` (or `python -m raytrain_app COMMAND`): every command under one name.

`raytrain train ...` is `python -m raytrain_app.main ...`, and so on for the others; flags, outputs and exit
codes are the same.
"""

from __future__ import annotations

import importlib
import sys

from raytrain_app.observability.console import configure_console

# command -> (module, what it does)
COMMANDS = {
    "train": ("raytrain_app.main", "train, resume or fine-tune a model on Ray"),
    "tune": ("raytrain_app.tune", "a learning-rate sweep from one base checkpoint"),
    "jobs": ("raytrain_app.jobs", "submit training to a cluster as a Ray job that resubmits itself"),
    "ckpt": ("raytrain_app.ckpt", "show what a checkpoint holds, or export its weights"),
    "report": ("raytrain_app.report", "a run's summary and loss plot"),
    "data": ("raytrain_app.data", "make a synthetic dataset, or convert a pickle to Parquet"),
    "plan": ("raytrain_app.plan", "the memory plan of a training command: does it fit the GPUs?"),
    "evaluate": ("raytrain_app.evaluate", "score a checkpoint on a test split: loss, accuracy, per-class metrics"),
    "predict": ("raytrain_app.predict", "batch predictions of a checkpoint over Parquet or pickle data (Ray Data)"),
}


def usage() -> str:
    lines = ["usage: raytrain COMMAND [flags]   (raytrain COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<8}{what}  (python -m {module})" for name, (module, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    configure_console()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
