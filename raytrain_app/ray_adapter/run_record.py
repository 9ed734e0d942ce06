"""Ray Train's record of a run's checkpoints (checkpoint_manager_snapshot.json): before a run continues, the
checkpoint it names as the latest is verified and, when it is not whole, the run falls back to its newest whole
checkpoint and the record is rewritten so that Ray restores that same one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from raytrain_app.checkpoint.format import (
    META_FILE,
    RUN_SNAPSHOT_FILE,
    STATE_FILE,
    CheckpointError,
    as_location,
    checkpoint_names,
    checkpoint_problem,
    read_json,
    step_of,
)
from raytrain_app.core.config import CLASSIFICATION, TASK_SCORES, higher_is_better
from raytrain_app.core.trainer import UNVALIDATED_LOSS, unvalidated
from raytrain_app.ray_adapter import ray_compat
from raytrain_app.storage.location import Location
from raytrain_app.storage.publish import publish_bytes

log = logging.getLogger(__name__)


def _latest_result(run_dir: Location) -> dict[str, Any] | None:
    snapshot = read_json(run_dir.join(RUN_SNAPSHOT_FILE)) or {}
    return ray_compat.latest_recorded_checkpoint(snapshot)


@dataclass
class Recovery:
    """What `plan_recovery` decided for a run: the state file it continues from (None: Ray recorded nothing, the
    run starts anew), and the rewrite of Ray's record of the run that makes Ray restore that same checkpoint."""

    state: Location | None
    snapshot_file: Location | None = None
    new_snapshot: dict[str, Any] | None = None  # None: Ray's record is right as it is

    def apply(self) -> None:
        """Write the new record (atomically). Called once everything else about the command has been checked,
        so a command that is refused writes nothing."""
        if self.new_snapshot is not None:
            publish_bytes(json.dumps(self.new_snapshot).encode(), self.snapshot_file)


def plan_recovery(run_dir: Location | str, warn: Any = log.info) -> Recovery:
    """Find the checkpoint a run continues from, verified, without writing anything.

    When the checkpoint Ray's record names as the latest is not whole (cut off, damaged, deleted), `warn` names
    it and the run falls back to its newest whole checkpoint; the returned Recovery rewrites Ray's record without
    the broken ones, so that Ray restores the same one and never refuses to start over a folder that is gone.
    A record that is cut off or missing while checkpoint folders exist is rebuilt from the whole ones. Raises
    CheckpointError when no checkpoint is whole."""
    run_dir = as_location(run_dir)
    snapshot_file = run_dir.join(RUN_SNAPSHOT_FILE)
    snapshot = read_json(snapshot_file)
    if snapshot is None and checkpoint_names(run_dir):
        return _rebuild_snapshot(run_dir, snapshot_file, warn)
    latest_entry = ray_compat.latest_recorded_checkpoint(snapshot) if snapshot else None
    if latest_entry is None:
        return Recovery(state=None)
    latest = latest_entry["checkpoint_dir_name"]
    recorded = ray_compat.recorded_checkpoint_names(snapshot)
    candidates = [latest, *sorted((n for n in recorded if step_of(n) < step_of(latest)), key=step_of,
                                  reverse=True)]
    broken, chosen = set(), None
    for name in candidates:
        problem = checkpoint_problem(run_dir.join(name))
        if problem is None:
            chosen = name
            break
        warn(f"⚠️  WARNING: checkpoint {run_dir.join(name)} is not whole: {problem}. Falling back to the run's "
             "newest whole checkpoint.")
        broken.add(name)
    if chosen is None:
        raise CheckpointError(
            f"run {run_dir} has no whole checkpoint left ({', '.join(sorted(broken))} checked); nothing was "
            "changed. Start it anew under another --run-name, or restore the folder from a backup.")
    # Ray refuses to start when any recorded folder is gone; the older ones are only checked to exist.
    broken |= {n for n in recorded - broken - {chosen} if not run_dir.join(n, STATE_FILE).is_file()}
    if not broken:
        return Recovery(state=run_dir.join(chosen, STATE_FILE))
    warn(f"  Continuing from {run_dir.join(chosen)} (global step {step_of(chosen)}).")
    return Recovery(state=run_dir.join(chosen, STATE_FILE), snapshot_file=snapshot_file,
                    new_snapshot=ray_compat.run_record_without(snapshot, broken, chosen))


def recover_run(run_dir: Location | str, warn: Any = log.info) -> Location | None:
    """`plan_recovery`, applied at once: the verified state file a run continues from, or None."""
    recovery = plan_recovery(run_dir, warn)
    recovery.apply()
    return recovery.state


def _rebuild_snapshot(run_dir: Location, snapshot_file: Location, warn: Any) -> Recovery:
    """Ray Train writes its run record in place, so a process killed during that write leaves it cut off (or,
    killed between the first checkpoint's copy and the first record, missing), and Ray then refuses to start the
    run, or starts it anew. Rebuild the record from the run's whole checkpoint folders: their meta.json holds
    what Ray orders them by."""
    results, score = [], "val_loss"
    for index, name in enumerate(sorted(checkpoint_names(run_dir), key=step_of)):
        meta = read_json(run_dir.join(name, META_FILE))
        if meta is None or checkpoint_problem(run_dir.join(name)) is not None:
            continue
        loss, config = meta.get("eval_val_loss"), meta.get("config") or {}
        score = config.get("select_metric") or "val_loss"
        scores = TASK_SCORES[config.get("task") or CLASSIFICATION]  # written before tasks: classification
        metrics = {"epoch": meta["epoch"], "global_step": meta["global_step"],
                   "batch_index": (meta.get("data_position") or {}).get("batch_index", 0),
                   "val_loss": UNVALIDATED_LOSS if loss is None else loss,
                   **{name: unvalidated(name) if loss is None or meta.get(f"eval_{name}") is None
                      else meta[f"eval_{name}"] for name in scores},
                   "validated": loss is not None, "best_val_loss": meta.get("best_val_loss"),
                   **{f"best_{name}": meta.get(f"best_{name}") for name in scores}}
        results.append((index, name, metrics))
    what = "cut off or damaged" if snapshot_file.is_file() else "missing"
    if not results:
        raise CheckpointError(f"run {run_dir}: Ray's record of the run ({RUN_SNAPSHOT_FILE}) is {what} and no "
                              "checkpoint folder is whole; nothing was changed. Start it anew under another "
                              "--run-name.")
    warn(f"⚠️  WARNING: Ray's record of run {run_dir} ({RUN_SNAPSHOT_FILE}) is {what}: rebuilding it from the "
         f"run's {len(results)} whole checkpoint(s).")
    snapshot = ray_compat.new_run_record(results, score, higher_is_better=higher_is_better(score))
    return Recovery(state=run_dir.join(results[-1][1], STATE_FILE), snapshot_file=snapshot_file,
                    new_snapshot=snapshot)


def latest_run_metrics(run_dir: Location | str) -> dict[str, Any] | None:
    """The metrics reported with the run's latest checkpoint (epoch, global_step, val_loss, ...), or None."""
    latest = _latest_result(as_location(run_dir))
    return dict(latest.get("metrics") or {}) if latest else None

