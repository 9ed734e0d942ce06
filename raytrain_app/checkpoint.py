"""The checkpoint format, and the only module that reads or writes it.

A checkpoint is a Ray `Checkpoint` directory named `checkpoint_step=000123` holding
  state.pt   torch.save of the training state (keys below), loadable with weights_only=True
  meta.json  the few numbers needed to choose between checkpoints without loading state.pt
and `<save-dir>/best_model.pt` is the same state as one file, replaced atomically whenever validation improves.

state.pt keys (the first eight are the ones users' tools already know):
  epoch                 completed epochs
  global_step           optimizer steps taken
  model_state_dict      weights of the unwrapped model (no DDP `module.` or compile `_orig_mod.` prefix)
  optimizer_state_dict  AdamW moments
  scaler_state_dict     GradScaler (fp16) state, {} when no scaler is used
  val_loss              best validation loss so far
  train_ema_loss        EMA of the training loss
  config                TrainConfig.to_dict() of the run that wrote it
  scheduler_state_dict  the learning-rate schedule's position
  rng_states            per-rank python / numpy / torch CPU / CUDA generator states
  data_position         where in the epoch the next micro-batch comes from
  eval_val_loss         the validation loss measured at this checkpoint
  lineage               None for a run trained from scratch; for a run started from another checkpoint
                        (--resume-from-checkpoint, a sweep trial): base_checkpoint (its location),
                        base_global_step, base_epoch, base_sha256 (of the base state file), base_lineage
                        (the base's own lineage), and for sweep trials sweep_name and trial_id
  format_version        1
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from raytrain_app.storage import Location, check_bucket, parse_location

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
BEST_MODEL_FILE = "best_model.pt"
RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
CHECKPOINT_PREFIX = "checkpoint_step="


def _read_umask() -> int:
    """The process's umask, read without changing it (os.umask can only read it by setting it, which races
    with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


_UMASK = _read_umask()


class CheckpointError(ValueError):
    """A checkpoint location that cannot be used; the message names it and says what to do."""


def checkpoint_dir_name(global_step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{global_step:06d}"


def _meta(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "epoch": state["epoch"],
        "global_step": state["global_step"],
        "eval_val_loss": state.get("eval_val_loss"),
        "best_val_loss": state["val_loss"],
        "data_position": state.get("data_position"),
        "lineage": state.get("lineage"),
    }


def save_checkpoint_dir(checkpoint_dir: str, state: dict[str, Any]) -> None:
    """Write state.pt and meta.json into a (local, temporary) directory that Ray then persists."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(state, os.path.join(checkpoint_dir, STATE_FILE))
    with open(os.path.join(checkpoint_dir, META_FILE), "w") as f:
        json.dump(_meta(state), f, indent=1)


def _as_location(location: Location | str) -> Location:
    return parse_location(location) if isinstance(location, str) else location


def _publish(tmp: str, target: Location) -> None:
    """Move a finished local temporary file to `target` so readers see all of it or nothing: a rename on a
    local filesystem (same directory), a single upload on object stores (objects appear only when complete)."""
    if target.is_local:
        os.replace(tmp, target.path)
    else:
        pafs.copy_files(tmp, target.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)


def _stream_to(source: Location, out: Any) -> str:
    """Copy `source`'s bytes into the open file `out`, returning their SHA-256 (one read for both)."""
    digest = hashlib.sha256()
    for chunk in source.chunks():
        digest.update(chunk)
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def fetch_file(source: Location, into_dir: str) -> tuple[str, str]:
    """Copy a file from any storage into a new local file in `into_dir`: (its path, SHA-256 of its bytes).
    Reading it once pins the bytes: what is checked, hashed and published later is the same file even if the
    source is replaced meanwhile."""
    fd, path = tempfile.mkstemp(dir=into_dir, prefix=f"{source.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            return path, _stream_to(source, out)
    except BaseException:
        os.unlink(path)
        raise


def _copy_local(path: str, out: Any) -> None:
    with open(path, "rb") as source:
        shutil.copyfileobj(source, out, 8 << 20)


def publish_file(local_file: str, target: Location) -> None:
    """Copy a local file to `target` (any storage) so that readers see all of it or nothing."""
    if target.is_local:
        publish_bytes_from(lambda out: _copy_local(local_file, out), target)
    else:  # one upload is already all-or-nothing: no second local copy
        _publish(local_file, target)


def publish_bytes(data: bytes, target: Location) -> None:
    """Write `data` to `target` (any storage) so that readers see all of it or nothing."""
    publish_bytes_from(lambda out: out.write(data), target)


def publish_bytes_from(write: Any, target: Location) -> None:
    """Call `write(file)` on a local temporary file, then publish it to `target` atomically: locally a rename
    within the target's folder; on object stores one upload, and an object becomes visible only when its upload
    completes (multipart uploads included)."""
    local_dir = posixpath.dirname(target.path) if target.is_local else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{target.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would survive the rename: others on shared storage read it
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        _publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_best_model(save_dir: Location | str, state: dict[str, Any] | str) -> Location:
    """Replace <save_dir>/best_model.pt so that a reader sees the old file or the new one, never a part.

    `state` is a state dict, or the path of a state file already written (copied, not serialised again)."""
    target = _as_location(save_dir).join(BEST_MODEL_FILE)
    if isinstance(state, str):
        publish_file(state, target)
    else:
        publish_bytes_from(lambda f: torch.save(state, f), target)
    return target


def load_state(location: Location | str, *, mmap: bool = False) -> dict[str, Any]:
    """Load a state file (local path, or any Location). weights_only=True: no code in a checkpoint ever runs.

    mmap=True maps a local file's tensors lazily, so reading the config of a 14 GB checkpoint costs almost
    nothing. Remote files are downloaded to a temporary file first.
    """
    location = _as_location(location)
    if not location.is_local:
        if not location.is_file():
            raise CheckpointError(f"checkpoint file not found: {location}")
        with location.local_copy() as path:
            return _load_local(path, str(location), mmap=False)
    return _load_local(location.path, str(location), mmap=mmap)


def _load_local(path: str, label: str, *, mmap: bool) -> dict[str, Any]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # files in torch's legacy (non-zip) format cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {label}") from None
    except Exception as e:  # noqa: BLE001 - truncated, foreign or unsafe files all end here
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{label} is not a readable checkpoint ({first_line})") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{label} is not a training checkpoint: it has no 'model_state_dict'")
    return state


def _read_json(location: Location) -> dict[str, Any] | None:
    if not location.is_file():
        return None
    try:
        return json.loads(location.read_bytes())
    except json.JSONDecodeError:
        return None


def _latest_result(run_dir: Location) -> dict[str, Any] | None:
    snapshot = _read_json(run_dir.join(RUN_SNAPSHOT_FILE)) or {}
    return snapshot.get("latest_checkpoint_result") or None


def latest_run_checkpoint(run_dir: Location | str) -> Location | None:
    """The state file of the run's latest checkpoint, as Ray Train recorded it (the one a restart loads)."""
    run_dir = _as_location(run_dir)
    latest = _latest_result(run_dir)
    if not latest:
        return None
    state = run_dir.join(latest["checkpoint_dir_name"], STATE_FILE)
    return state if state.is_file() else None


def latest_run_metrics(run_dir: Location | str) -> dict[str, Any] | None:
    """The metrics reported with the run's latest checkpoint (epoch, global_step, val_loss, ...), or None."""
    latest = _latest_result(_as_location(run_dir))
    return dict(latest.get("metrics") or {}) if latest else None


def best_run_checkpoint(run_dir: Location | str) -> Location | None:
    """The state file of the run's checkpoint with the lowest validation loss (latest on ties)."""
    run_dir = _as_location(run_dir)
    candidates: list[tuple[float, int, str]] = []
    for entry in run_dir.list():
        name = entry.base_name
        if not (entry.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX)):
            continue
        meta = _read_json(run_dir.join(name, META_FILE))
        if meta is None or not run_dir.join(name, STATE_FILE).is_file():
            continue
        loss = meta.get("eval_val_loss")
        candidates.append((math.inf if loss is None else loss, -meta["global_step"], name))
    return run_dir.join(min(candidates)[2], STATE_FILE) if candidates else None


def is_run_dir(location: Location) -> bool:
    return location.join(RUN_SNAPSHOT_FILE).is_file() or any(
        entry.base_name.startswith(CHECKPOINT_PREFIX) for entry in location.list()
    )


def resolve_checkpoint(location: str, flag: str = "--resume-from-checkpoint") -> Location | None:
    """Turn what a user passed to --resume-from-checkpoint into the Location of a state file.

    Accepts a .pt file, a checkpoint directory (state.pt inside) or a run directory (its best checkpoint), as a
    local path or a URI. Returns None when nothing exists there, so the caller can warn and start fresh.
    """
    where = parse_location(location, flag=flag)
    check_bucket(where)
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.File:
        return where
    if where.join(STATE_FILE).is_file():
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
    model_state_dict: dict[str, torch.Tensor]
    lineage: dict[str, Any] | None = None
    eval_val_loss: float | None = None  # measured at this checkpoint (best_val_loss is the run's best so far)


def summarize(location: Location, label: str | None = None) -> StateSummary:
    """`label`: how to name the checkpoint to users, when `location` is a local copy of it."""
    state = load_state(location, mmap=True)
    path = label or str(location)
    position = state.get("data_position")
    return StateSummary(
        path=path,
        epoch=int(state.get("epoch", 0) or 0),
        global_step=int(state.get("global_step", 0) or 0),
        best_val_loss=_float_or_none(state.get("val_loss")),
        train_ema_loss=_float_or_none(state.get("train_ema_loss")),
        config=dict(state.get("config") or {}),
        has_optimizer=bool(state.get("optimizer_state_dict")),
        has_scaler=bool(state.get("scaler_state_dict")),
        data_position=position if isinstance(position, dict) else None,
        model_state_dict=state["model_state_dict"],
        lineage=state.get("lineage") if isinstance(state.get("lineage"), dict) else None,
        eval_val_loss=_float_or_none(state.get("eval_val_loss")),
    )


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
