"""From what a user passed (a .pt file, a checkpoint folder, a run folder; a path or a URI) to a verified
state file, and what that checkpoint holds, without starting anything.
"""

from __future__ import annotations

import logging
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from raytrain_app.checkpoint.format import (
    CHECKPOINT_PREFIX,
    MANIFEST_FILE,
    META_FILE,
    RUN_SNAPSHOT_FILE,
    STATE_FILE,
    CheckpointError,
    as_location,
    checkpoint_names,
    checkpoint_problem,
    load_state,
    model_shapes_of,
    read_json,
    step_of,
    verify_checkpoint_dir,
)
from raytrain_app.core.config import ALL_SCORES, higher_is_better
from raytrain_app.storage.location import Location, check_bucket, parse_location

log = logging.getLogger(__name__)


def last_good_checkpoint(run_dir: Location | str, before_step: int) -> Location | None:
    """The folder of the run's newest whole checkpoint from before global step `before_step` whose validation
    loss was finite (None: there is none). A diverging run's last checkpoints can hold weights that already
    overflow: only a finite validation loss vouches for them."""
    run_dir = as_location(run_dir)
    names = checkpoint_names(run_dir)
    for name in sorted((n for n in names if step_of(n) < before_step), key=step_of, reverse=True):
        loss = (read_json(run_dir.join(name, META_FILE)) or {}).get("eval_val_loss")
        if loss is not None and math.isfinite(loss) and checkpoint_problem(run_dir.join(name)) is None:
            return run_dir.join(name)
    return None


def best_run_checkpoint(run_dir: Location | str, warn: Any = log.info) -> Location | None:
    """The state file of the run's whole checkpoint that is best by the run's --select-metric (the lowest
    validation loss or the highest accuracy; latest on ties); one that is not whole is named by `warn` and
    passed over."""
    run_dir = as_location(run_dir)
    candidates: list[tuple[float, int, str]] = []
    for entry in run_dir.list():
        name = entry.base_name
        if not (entry.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX)):
            continue
        meta = read_json(run_dir.join(name, META_FILE))
        if meta is None or not run_dir.join(name, STATE_FILE).is_file():
            continue
        candidates.append((_rank(meta), -meta["global_step"], name))
    for _, _, name in sorted(candidates):
        problem = checkpoint_problem(run_dir.join(name))
        if problem is None:
            return run_dir.join(name, STATE_FILE)
        warn(f"⚠️  WARNING: checkpoint {run_dir.join(name)} is not whole: {problem}. Passing over it.")
    return None


def _rank(meta: dict[str, Any]) -> float:
    """A checkpoint's place by its run's --select-metric, lowest first (a score higher is better for is negated);
    one without a finite validation loss is last."""
    metric = (meta.get("config") or {}).get("select_metric") or "val_loss"
    loss = meta.get("eval_val_loss")
    if metric == "val_loss":
        return math.inf if loss is None else loss
    value = meta.get(f"eval_{metric}")
    if loss is None or not math.isfinite(loss) or value is None:
        return math.inf
    return -value if higher_is_better(metric) else value


def is_run_dir(location: Location) -> bool:
    return location.join(RUN_SNAPSHOT_FILE).is_file() or any(
        entry.base_name.startswith(CHECKPOINT_PREFIX) for entry in location.list()
    )


def parent_location(location: Location) -> Location:
    """The folder holding `location`, on the same storage."""
    parent = posixpath.dirname(location.path.rstrip("/"))
    if location.is_local:
        return Location(location.fs, parent, parent)
    base, _, query = location.uri.partition("?")
    return Location(location.fs, parent, posixpath.dirname(base.rstrip("/")) + (f"?{query}" if query else ""))


def verified_name(state_file: Location | None) -> str | None:
    """The folder name of a checkpoint's state file (what workers compare with the checkpoint Ray restores)."""
    return parent_location(state_file).name if state_file is not None else None


def resolve_checkpoint(location: str, flag: str = "--resume-from-checkpoint", verify: bool = True) -> Location | None:
    """Turn what a user passed to --resume-from-checkpoint into the Location of a state file.

    Accepts a .pt file, a checkpoint directory (state.pt inside) or a run directory (its best checkpoint), as a
    local path or a URI. Returns None when nothing exists there, so the caller can warn and start fresh.
    `verify=False` takes a checkpoint folder that is not whole too (to inspect it).
    """
    where = parse_location(location, flag=flag)
    check_bucket(where)
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.File:
        folder = parent_location(where)
        if verify and where.name == STATE_FILE and folder.join(MANIFEST_FILE).is_file():  # a folder's state file
            verify_checkpoint_dir(folder, label=f"{flag} {location}")
        return where
    if where.join(STATE_FILE).is_file() or where.join(MANIFEST_FILE).is_file():
        if verify:
            verify_checkpoint_dir(where, label=f"{flag} {location}")
        return where.join(STATE_FILE)
    if is_run_dir(where):
        best = best_run_checkpoint(where)
        if best:
            return best
        raise CheckpointError(f"{flag} {location}: this run folder has no complete checkpoint yet")
    raise CheckpointError(
        f"{flag} {location} is a folder without a checkpoint: pass a .pt file, a "
        f"'{CHECKPOINT_PREFIX}...' folder or a run folder"
    )


@dataclass
class StateSummary:
    """What a checkpoint holds, for the resume summary and for checks before any worker starts."""

    path: str
    epoch: int
    global_step: int
    best_val_loss: float | None
    train_ema_loss: float | None
    config: dict[str, Any]
    has_optimizer: bool
    has_scaler: bool
    data_position: dict[str, Any] | None
    model_shapes: dict[str, tuple[int, ...]]  # every weight's (full) shape, by name
    lineage: dict[str, Any] | None = None
    eval_val_loss: float | None = None  # measured at this checkpoint (best_val_loss is the run's best so far)
    best_val_accuracy: float | None = None
    eval_val_accuracy: float | None = None
    best_scores: dict[str, float] = field(default_factory=dict)  # the best of each of the task's scores so far
    sharded: bool = False  # weights and moments in the folder's shards (--strategy fsdp), not in the state file
    from_meta: bool = False  # read from the folder's meta.json: the state file itself was not loaded


def summarize(location: Location, label: str | None = None) -> StateSummary:
    """What the checkpoint at `location` holds. A checkpoint folder's state.pt is summarised from the meta.json
    beside it (a few KB, whatever the model's size); a single file (best_model.pt, an older folder) is read,
    memory-mapped when local. `label`: how to name the checkpoint to users, when `location` is a local copy."""
    path = label or str(location)
    meta = read_json(parent_location(location).join(META_FILE)) if location.name == STATE_FILE else None
    if meta is not None and "model_shapes" in meta:
        return _summary_from_meta(meta, path)
    state = load_state(location, mmap=True)
    position = state.get("data_position")
    return StateSummary(
        path=path,
        epoch=int(state.get("epoch", 0) or 0),
        global_step=int(state.get("global_step", 0) or 0),
        best_val_loss=_float_or_none(state.get("val_loss")),
        train_ema_loss=_float_or_none(state.get("train_ema_loss")),
        config=dict(state.get("config") or {}),
        has_optimizer=bool(state.get("optimizer_state_dict") or state.get("optimizer_param_groups")),
        has_scaler=bool(state.get("scaler_state_dict")),
        data_position=position if isinstance(position, dict) else None,
        model_shapes=model_shapes_of(state), sharded="sharded" in state,
        lineage=state.get("lineage") if isinstance(state.get("lineage"), dict) else None,
        eval_val_loss=_float_or_none(state.get("eval_val_loss")),
        best_val_accuracy=_float_or_none(state.get("val_accuracy")),
        eval_val_accuracy=_float_or_none(state.get("eval_val_accuracy")),
        best_scores=_scores({name: state.get(name) for name in ALL_SCORES}),
    )


def _summary_from_meta(meta: dict[str, Any], path: str) -> StateSummary:
    position, lineage = meta.get("data_position"), meta.get("lineage")
    return StateSummary(
        path=path, epoch=int(meta.get("epoch") or 0), global_step=int(meta.get("global_step") or 0),
        best_val_loss=_float_or_none(meta.get("best_val_loss")),
        train_ema_loss=_float_or_none(meta.get("train_ema_loss")), config=dict(meta.get("config") or {}),
        has_optimizer=bool(meta.get("has_optimizer")), has_scaler=bool(meta.get("has_scaler")),
        data_position=position if isinstance(position, dict) else None,
        model_shapes={name: tuple(shape) for name, shape in meta["model_shapes"].items()},
        lineage=lineage if isinstance(lineage, dict) else None,
        eval_val_loss=_float_or_none(meta.get("eval_val_loss")), sharded=bool(meta.get("sharded")),
        best_val_accuracy=_float_or_none(meta.get("best_val_accuracy")),
        eval_val_accuracy=_float_or_none(meta.get("eval_val_accuracy")), from_meta=True,
        best_scores=_scores({name: meta.get(f"best_{name}") for name in ALL_SCORES}))


def _scores(values: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in values.items() if value is not None}


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def fork_lineage(base: Location, summary: StateSummary, *, sha256: str | None = None) -> dict[str, Any]:
    """The lineage a run started from `base` records in every checkpoint it writes (`sha256`: of base's bytes,
    when the caller already has it)."""
    return {
        "base_checkpoint": base.uri,
        "base_global_step": summary.global_step,
        "base_epoch": summary.epoch,
        "base_sha256": sha256 or base.sha256(),
        "base_lineage": summary.lineage,
    }

