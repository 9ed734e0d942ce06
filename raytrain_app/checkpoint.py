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
  format_version        1
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
BEST_MODEL_FILE = "best_model.pt"
RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
CHECKPOINT_PREFIX = "checkpoint_step="


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
    }


def save_checkpoint_dir(checkpoint_dir: str, state: dict[str, Any]) -> None:
    """Write state.pt and meta.json into a (local, temporary) directory that Ray then persists."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(state, os.path.join(checkpoint_dir, STATE_FILE))
    with open(os.path.join(checkpoint_dir, META_FILE), "w") as f:
        json.dump(_meta(state), f, indent=1)


def write_best_model(save_dir: str, state: dict[str, Any]) -> str:
    """Replace <save_dir>/best_model.pt atomically: a reader sees the old file or the new one, never a part."""
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, BEST_MODEL_FILE)
    fd, tmp = tempfile.mkstemp(dir=save_dir, prefix=f".{BEST_MODEL_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_state(path: str, *, mmap: bool = False) -> dict[str, Any]:
    """Load a state file. weights_only=True: no code in a checkpoint ever runs.

    mmap=True maps tensors lazily, so reading the config of a 14 GB checkpoint costs almost nothing.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # files in torch's legacy (non-zip) format cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - truncated, foreign or unsafe files all end here
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line})") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint: it has no 'model_state_dict'")
    return state


def _read_snapshot(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, RUN_SNAPSHOT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _state_path(run_dir: str, dir_name: str) -> str | None:
    path = os.path.join(run_dir, dir_name, STATE_FILE)
    return path if os.path.isfile(path) else None


def latest_run_checkpoint(run_dir: str) -> str | None:
    """The state file of the run's latest checkpoint, as Ray Train recorded it (the one a restart loads)."""
    snapshot = _read_snapshot(run_dir)
    latest = (snapshot or {}).get("latest_checkpoint_result")
    return _state_path(run_dir, latest["checkpoint_dir_name"]) if latest else None


def best_run_checkpoint(run_dir: str) -> str | None:
    """The state file of the run's checkpoint with the lowest validation loss (latest on ties)."""
    candidates: list[tuple[float, int, str]] = []
    for name in sorted(os.listdir(run_dir)):
        meta_path = os.path.join(run_dir, name, META_FILE)
        state_path = _state_path(run_dir, name)
        if not (name.startswith(CHECKPOINT_PREFIX) and state_path and os.path.isfile(meta_path)):
            continue
        with open(meta_path) as f:
            meta = json.load(f)
        loss = meta.get("eval_val_loss")
        candidates.append((math.inf if loss is None else loss, -meta["global_step"], state_path))
    return min(candidates)[2] if candidates else None


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_SNAPSHOT_FILE)) or any(
        n.startswith(CHECKPOINT_PREFIX) for n in os.listdir(path)
    )


def resolve_checkpoint(location: str) -> str | None:
    """Turn what a user passed to --resume-from-checkpoint into a state file path.

    Accepts a .pt file, a checkpoint directory (state.pt inside) or a run directory (its best checkpoint).
    Returns None when the location does not exist, so the caller can warn and start fresh.
    """
    path = os.path.abspath(os.path.expanduser(location))
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.join(path, STATE_FILE)
    if is_run_dir(path):
        best = best_run_checkpoint(path)
        if best:
            return best
        raise CheckpointError(f"--resume-from-checkpoint {location}: this run folder has no complete checkpoint yet")
    raise CheckpointError(
        f"--resume-from-checkpoint {location} is a folder without a checkpoint: pass a .pt file, a "
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
    has_scheduler: bool
    data_position: dict[str, Any] | None
    model_state_dict: dict[str, torch.Tensor]


def summarize(path: str) -> StateSummary:
    state = load_state(path, mmap=True)
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
        has_scheduler=bool(state.get("scheduler_state_dict")),
        data_position=position if isinstance(position, dict) else None,
        model_state_dict=state["model_state_dict"],
    )


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)
