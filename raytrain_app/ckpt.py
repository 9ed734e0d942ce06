"""Inspect and export checkpoints: anything `--resume-from-checkpoint` accepts (a .pt file, a checkpoint folder,
a run folder meaning its best checkpoint; local paths or URIs).

    python -m raytrain_app.ckpt show X
    python -m raytrain_app.ckpt export X --format safetensors|pt OUT

`show` prints the epoch, global step, validation losses, settings, size, lineage and whether the folder matches
its manifest. `export` writes the model's weights alone, for inference: a safetensors file (with the settings
that build the model in its metadata) or a .pt holding `model_state_dict` and `config`; a sharded checkpoint's
shards are gathered into one file (this process then holds the whole weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from typing import Any

from raytrain_app.checkpoint.format import MANIFEST_FILE, STATE_FILE, checkpoint_problem, load_state
from raytrain_app.checkpoint.inference import read_weights, resolve_state_file
from raytrain_app.checkpoint.resolve import parent_location, summarize
from raytrain_app.cli.errors import run_command
from raytrain_app.core.config import CLASSIFICATION, SCORE_LABELS, TASK_SCORES, as_flags
from raytrain_app.core.model import NORMALIZATION_KEYS, has_input_stats
from raytrain_app.core.model_spec import model_text
from raytrain_app.observability.console import configure_console
from raytrain_app.storage.location import Location, parse_location
from raytrain_app.storage.publish import publish_file


def _folder_of(state_file: Location) -> Location | None:
    """The checkpoint folder a state file belongs to (None for a single .pt file)."""
    return parent_location(state_file) if state_file.name == STATE_FILE else None


def manifest_status(state_file: Location) -> str:
    folder = _folder_of(state_file)
    if folder is None or not folder.join(MANIFEST_FILE).is_file():
        return "no manifest (a single .pt file, or a folder written before manifests)"
    problem = checkpoint_problem(folder)
    return f"NOT WHOLE: {problem}" if problem else "whole (every file matches manifest.json)"


def _size(num_bytes: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            break
        num_bytes /= 1000
    return f"{num_bytes:.0f} B" if unit == "B" else f"{num_bytes:.1f} {unit}"


def _loss(value: Any) -> str:
    return "none" if value is None else f"{float(value):.6f}"


def _score(value: Any) -> str:
    return "none" if value is None else f"{float(value):.4f}"


def _scores_line(state: dict[str, Any], scores: tuple[str, ...]) -> str:
    """The task's scores at the checkpoint and the run's best of each, e.g. "Validation RMSE at this checkpoint:
    0.4120; best so far: 0.3990; MAE at this checkpoint: ..." (a state written before a score was measured has
    none)."""
    return "Validation " + "; ".join(
        f"{SCORE_LABELS[name]} at this checkpoint: {_score(state.get(f'eval_{name}'))}; best so far: "
        f"{_score(state.get(name))}" for name in scores)


def _normalization(state: dict[str, Any], shapes: dict[str, Any]) -> str:
    if not has_input_stats(shapes):
        return "none (written before --normalize)"
    return str((state.get("config") or {}).get("normalize", "standard")) + " (statistics in the weights)"


def show(where: str) -> list[str]:
    state_file = _resolve(where, verify=False)  # a damaged folder is shown with what is wrong with it
    state = load_state(state_file, mmap=True)
    summary = summarize(state_file)
    params = sum(math.prod(shape) for name, shape in summary.model_shapes.items() if name not in NORMALIZATION_KEYS)
    sharded = state.get("sharded")
    config = state.get("config") or {}
    batches = (state.get("data_position") or {}).get("batch_index", 0)  # a mid-epoch checkpoint's place
    lines = [f"Checkpoint: {where}" + (f" ({state_file.uri})" if state_file.uri != where else ""),
             f"Epoch: {state.get('epoch')} complete"
             + (f", {batches} batches into epoch {state.get('epoch') + 1}" if batches else "")
             + f"; global step {state.get('global_step')}",
             f"Validation loss at this checkpoint: {_loss(state.get('eval_val_loss'))}; best so far: "
             f"{_loss(state.get('val_loss'))}; train EMA loss: {_loss(state.get('train_ema_loss'))}",
             _scores_line(state, TASK_SCORES[config.get("task") or CLASSIFICATION]),
             f"Input normalisation: {_normalization(state, summary.model_shapes)}",
             f"Model spec: {model_text(config)}",
             f"Model: {params:,} parameters; state file {_size(state_file.info().size)}"
             + (f"; weights and optimizer state sharded by {sharded['world_size']} worker(s) in {sharded['dir']}/"
                if sharded else "; optimizer state" if summary.has_optimizer else "; no optimizer state"),
             f"Settings: {as_flags(config)}",
             f"Manifest: {manifest_status(state_file)}"]
    lineage = state.get("lineage")
    if not lineage:
        lines.append("Lineage: trained from scratch")
    while lineage:
        lines.append(f"Lineage: from {lineage.get('base_checkpoint')} at global step {lineage.get('base_global_step')}"
                     f" (SHA-256 {str(lineage.get('base_sha256'))[:12]}...)"
                     + (f", sweep {lineage['sweep_name']} trial {lineage.get('trial_id')}"
                        if lineage.get("sweep_name") else ""))
        lineage = lineage.get("base_lineage")
    if state.get("wandb_run_id"):
        lines.append(f"wandb run id: {state['wandb_run_id']}")
    return lines


def export(where: str, fmt: str, out: str) -> str:
    """Write the weights of the checkpoint at `where` to `out` (local or URI); returns what was written."""
    import torch

    state_file = _resolve(where)
    state = load_state(state_file)
    weights = read_weights(state_file, state)
    config = state.get("config") or {}
    target = parse_location(out, flag="OUT")
    with tempfile.TemporaryDirectory(prefix="raytrain-export-") as tmp:
        path = f"{tmp}/weights"
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(weights, path, metadata={"config": json.dumps(config),
                                               "global_step": str(state.get("global_step"))})
        else:
            torch.save({"model_state_dict": weights, "config": config}, path)
        publish_file(path, target)
    return target.uri


def _resolve(where: str, verify: bool = True) -> Location:
    return resolve_state_file(where, "X", verify)


def main(argv: list[str] | None = None) -> int:
    configure_console()
    parser = argparse.ArgumentParser(prog="python -m raytrain_app.ckpt", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    show_parser = commands.add_parser("show", help="what a checkpoint holds")
    show_parser.add_argument("x", metavar="X")
    export_parser = commands.add_parser("export", help="the weights alone, for inference")
    export_parser.add_argument("x", metavar="X")
    export_parser.add_argument("--format", choices=("safetensors", "pt"), default="safetensors")
    export_parser.add_argument("out", metavar="OUT")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.command == "show":
        print("\n".join(show(args.x)))
    else:
        print(f"Wrote the weights of {args.x} to {export(args.x, args.format, args.out)} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
