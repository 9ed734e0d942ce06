"""The memory plan of a training command, before launching it: `python -m raytrain_app.plan [training flags]`.

Takes the flags of `python -m raytrain_app.main` (the data gives the feature dimension, sequence length and
classes) and prints, per worker: parameters, gradients, optimizer state, activations (with and without
--activation-checkpointing), communication buffers and the CUDA runtime, their total against --gpu-memory-gb,
the largest micro-batch that fits, the smallest change that makes a configuration fit, and the host memory a
checkpoint's copy needs. `main` refuses a --use-gpu run whose plan does not fit, before any worker starts.
"""

from __future__ import annotations

import sys

from raytrain_app.cli.errors import run_command
from raytrain_app.cli.flags import build_parser, parse_config
from raytrain_app.cli.preflight import prepare_data
from raytrain_app.core.memory import GB, plan_lines
from raytrain_app.observability.console import configure_console


def main(argv: list[str] | None = None) -> int:
    configure_console()
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        build_parser("python -m raytrain_app.plan", __doc__.split("\n\n")[0]).print_help()
        return 0
    return run_command(lambda: plan(argv), debug="--debug" in argv)


def plan(argv: list[str]) -> int:
    cfg, _ = parse_config(argv)
    cfg, _ = prepare_data(cfg)
    gpu_bytes = cfg.gpu_memory_gb * GB if cfg.gpu_memory_gb else None
    for workers in sorted({cfg.min_workers or cfg.num_workers, cfg.num_workers}):
        print("\n".join(plan_lines(cfg, gpu_bytes, workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
