"""The checkpoint format, and the only module that reads or writes it.

A checkpoint is a Ray `Checkpoint` directory named `checkpoint_step=000123` holding
  state.pt       torch.save of the training state (keys below), loadable with weights_only=True
  meta.json      what is needed to choose between checkpoints, to check a run against one and to summarise it
                 (counters, losses, config, lineage, the weights' shapes) without loading state.pt
  manifest.json  size and SHA-256 of the files above, written last: a folder whose files do not match it
                 (a write cut off, a lost or damaged object) is never loaded
and `<save-dir>/best_model.pt` is the same state as one file, replaced atomically whenever validation improves.

A sharded checkpoint (--strategy fsdp, see raytrain_app.checkpoint.sharded) has the same three files, but its
state.pt holds everything except the weights and AdamW moments (`sharded`, `model_shapes` and
`optimizer_param_groups` instead of model_state_dict and optimizer_state_dict); those are in
  shards/                 every worker's part (`__<rank>_0.distcp`) and rank 0's index of them (`.metadata`)
  manifest.rank<r>.json   worker r's files, with size and SHA-256, for every worker but rank 0
and manifest.json lists the rank manifests too: the folder is whole when every worker's files are. best_model.pt
of a sharded run is consolidated: the same keys as a DDP run's (see docs/sharding.md).

A run folder also holds Ray Train's record of its checkpoints (checkpoint_manager_snapshot.json). Before a run
continues, `recover_run` verifies the checkpoint that record names as the latest and, when it is not whole,
falls back to the newest one that is, rewriting the record so Ray restores that one.

state.pt keys (the first eight are the ones users' tools already know):
  epoch                 completed epochs
  global_step           optimizer steps taken
  model_state_dict      weights of the unwrapped model (no DDP `module.` or compile `_orig_mod.` prefix), and
                        its input statistics (`input_mean`, `input_std`: zeros and ones when it does not
                        normalise; absent from checkpoints written before --normalize, which load as none)
  optimizer_state_dict  AdamW moments
  scaler_state_dict     GradScaler (fp16) state, {} when no scaler is used
  val_loss              best validation loss so far
  train_ema_loss        EMA of the training loss
  config                TrainConfig.to_dict() of the run that wrote it, its model among it: `model` (the spec:
                        transformer, or package.module:attribute) and `model_args` (a plug-in's settings; the
                        built-in's are hidden_dim, num_layers, num_heads). A config without `model` (written
                        before models were pluggable) holds the built-in one. meta.json repeats it as `model`.
  scheduler_state_dict  the learning-rate schedule's position
  rng_states            per-rank python / numpy / torch CPU / CUDA generator states
  data_position         where in the epoch the next micro-batch comes from
  eval_val_loss         the validation loss measured at this checkpoint
  eval_val_accuracy     the validation accuracy measured at this checkpoint; val_accuracy: the best so far (both
                        absent before accuracy was measured, None when not validated). A regression run's:
                        eval_val_rmse, val_rmse, eval_val_mae, val_mae instead
  lineage               None for a run trained from scratch; for a run started from another checkpoint
                        (--resume-from-checkpoint, a sweep trial): base_checkpoint (its location),
                        base_global_step, base_epoch, base_sha256 (of the base state file), base_lineage
                        (the base's own lineage), and for sweep trials sweep_name and trial_id
  skipped_steps         optimizer steps skipped for non-finite gradients; skip_streak: of them in a row now
  wandb_run_id          the run's wandb run id (chosen at the run's start, used with --use-wandb)
  format_version        2 (1: written before manifests; such folders are loaded without one)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow.fs as pafs
import torch

from raytrain_app.core.config import REGRESSION, TASK_SCORES
from raytrain_app.core.model_spec import model_identity
from raytrain_app.storage.location import Location, parse_location
from raytrain_app.storage.publish import publish_bytes_from, publish_file

FORMAT_VERSION = 2
REGRESSION_SCORES = TASK_SCORES[REGRESSION]
MANIFEST_VERSION_SINCE = 2  # format versions from this one on are written with a manifest
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
BEST_MODEL_FILE = "best_model.pt"
RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
CHECKPOINT_PREFIX = "checkpoint_step="
SHARDS_DIR = "shards"  # a sharded checkpoint's weights and moments (raytrain_app.checkpoint.sharded)


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
        "eval_val_accuracy": state.get("eval_val_accuracy"),
        "best_val_accuracy": state.get("val_accuracy"),
        **{key: value for name in REGRESSION_SCORES if name in state
           for key, value in ((f"eval_{name}", state.get(f"eval_{name}")), (f"best_{name}", state[name]))},
        "data_position": state.get("data_position"),
        "lineage": state.get("lineage"),
        "config": state.get("config"),
        "model": model_identity(state.get("config")),
        "sharded": state.get("sharded"),
        # What the driver's checks and resume summary need, so that it never loads state.pt itself.
        "train_ema_loss": state.get("train_ema_loss"),
        "has_optimizer": bool(state.get("optimizer_state_dict") or state.get("optimizer_param_groups")),
        "has_scaler": bool(state.get("scaler_state_dict")),
        "model_shapes": {name: list(shape) for name, shape in model_shapes_of(state).items()},
    }


def model_shapes_of(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight's shape by name: listed in a sharded checkpoint's state, read off the tensors otherwise."""
    if "sharded" in state:
        return {name: tuple(shape) for name, shape in (state.get("model_shapes") or {}).items()}
    return {name: tuple(t.shape) for name, t in (state.get("model_state_dict") or {}).items()
            if isinstance(t, torch.Tensor)}  # a model's extra state (get_extra_state) has no shape


class _HashingWriter:
    """A file wrapper that hashes what passes through it: torch.save's bytes are hashed as they are written,
    not read back."""

    def __init__(self, out: Any) -> None:
        self.out, self.digest, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _write_local(path: str, write: Any) -> dict[str, Any]:
    """Write a local file through `write(file)`; its manifest entry (size, SHA-256)."""
    with open(path, "wb") as f:
        out = _HashingWriter(f)
        write(out)
        f.flush()
    return {"size": out.size, "sha256": out.digest.hexdigest()}


def save_checkpoint_dir(checkpoint_dir: str, state: dict[str, Any]) -> None:
    """Write state.pt, meta.json and, last, manifest.json into a (local, temporary) directory that Ray then
    persists. Ray may upload the files in any order: the manifest's sizes and hashes, not its presence, make the
    folder whole."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    files = {
        STATE_FILE: _write_local(os.path.join(checkpoint_dir, STATE_FILE), lambda f: torch.save(state, f)),
        META_FILE: _write_local(os.path.join(checkpoint_dir, META_FILE),
                                lambda f: f.write(json.dumps(_meta(state), indent=1).encode())),
    }
    with open(os.path.join(checkpoint_dir, MANIFEST_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "files": files}, f, indent=1)


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def _hash_local(path: str) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def finish_sharded_dir(checkpoint_dir: str, index: dict[str, Any] | None, *, rank: int, world_size: int) -> None:
    """After this worker's shards are written into `checkpoint_dir/shards`: its manifest (rank r > 0), or rank 0's
    state.pt (`index`), meta.json and, last, manifest.json naming every rank's manifest. Ray uploads every
    worker's folder into the same checkpoint folder."""
    # This worker's own files only (DCP names them `__<rank>_<n>.distcp`; rank 0 also writes `.metadata`), so
    # that workers sharing one folder (one machine, a shared filesystem) never hash each other's.
    shards_dir = os.path.join(checkpoint_dir, SHARDS_DIR)
    mine = [n for n in os.listdir(shards_dir) if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata")]
    files = {f"{SHARDS_DIR}/{name}": _hash_local(os.path.join(shards_dir, name)) for name in sorted(mine)}
    if rank != 0:
        with open(os.path.join(checkpoint_dir, rank_manifest_name(rank)), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "rank": rank, "files": files}, f, indent=1)
        return
    assert index is not None
    files[STATE_FILE] = _write_local(os.path.join(checkpoint_dir, STATE_FILE), lambda f: torch.save(index, f))
    files[META_FILE] = _write_local(os.path.join(checkpoint_dir, META_FILE),
                                    lambda f: f.write(json.dumps(_meta(index), indent=1).encode()))
    with open(os.path.join(checkpoint_dir, MANIFEST_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "files": files,
                   "rank_manifests": [rank_manifest_name(r) for r in range(1, world_size)]}, f, indent=1)


def _valid_files(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values())


def _files_problem(where: Location, files: dict[str, Any]) -> str | None:
    for name, expected in sorted(files.items()):
        item = where.join(name)
        info = item.info()
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != expected["size"]:
            return f"{name} is {info.size} bytes, its manifest says {expected['size']} (cut off or damaged)"
        if item.sha256() != expected["sha256"]:
            return f"{name} does not match the SHA-256 in its manifest (damaged)"
    return None


def checkpoint_problem(checkpoint_dir: Location | str) -> str | None:
    """Why the checkpoint folder is not whole (missing, cut off, damaged), or None when it is: every file its
    manifest lists is there with the listed size and SHA-256. A folder written before manifests (format 1) is
    whole when its state file is there; loading it still refuses a truncated file."""
    where = as_location(checkpoint_dir)
    manifest = read_json(where.join(MANIFEST_FILE))
    if manifest is None:
        meta = read_json(where.join(META_FILE)) or {}
        if meta.get("format_version", MANIFEST_VERSION_SINCE) < MANIFEST_VERSION_SINCE:
            return None if where.join(STATE_FILE).is_file() else f"it has no {STATE_FILE}"
        if not where.exists():
            return "it does not exist"
        return f"it has no {MANIFEST_FILE} (its write never finished)"
    files = manifest.get("files")
    rank_manifests = manifest.get("rank_manifests", [])
    if not (_valid_files(files) and STATE_FILE in files and isinstance(rank_manifests, list)):
        return f"its {MANIFEST_FILE} is damaged"
    problem = _files_problem(where, files)
    for name in rank_manifests:  # a sharded checkpoint: every other worker's files
        if problem:
            return problem
        shard_manifest = read_json(where.join(str(name)))
        if shard_manifest is None:
            return f"{name} is missing or damaged (a worker's shard of the checkpoint)"
        if not _valid_files(shard_manifest.get("files")):
            return f"{name} is damaged"
        problem = _files_problem(where, shard_manifest["files"])
    return problem


def verify_checkpoint_dir(checkpoint_dir: Location | str, label: str | None = None) -> None:
    """Raise CheckpointError naming the folder (or `label`) unless it is whole (see `checkpoint_problem`)."""
    problem = checkpoint_problem(checkpoint_dir)
    if problem:
        raise CheckpointError(f"checkpoint {label or checkpoint_dir} is not whole: {problem}")


def as_location(location: Location | str) -> Location:
    return parse_location(location) if isinstance(location, str) else location


def write_best_model(save_dir: Location | str, state: dict[str, Any] | str) -> Location:
    """Replace <save_dir>/best_model.pt so that a reader sees the old file or the new one, never a part.

    `state` is a state dict, or the path of a state file already written (copied, not serialised again)."""
    target = as_location(save_dir).join(BEST_MODEL_FILE)
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
    location = as_location(location)
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
    if not isinstance(state, dict) or not ("model_state_dict" in state or "sharded" in state):
        raise CheckpointError(f"{label} is not a training checkpoint: it has no 'model_state_dict'")
    return state


def read_json(location: Location) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or is not one (cut off, damaged: any byte may be wrong)."""
    if not location.is_file():
        return None
    try:
        value = json.loads(location.read_bytes())
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        return None
    return value if isinstance(value, dict) else None


def step_of(dir_name: str) -> int:
    return int(dir_name[len(CHECKPOINT_PREFIX):])


def checkpoint_names(run_dir: Location) -> list[str]:
    return [e.base_name for e in run_dir.list()
            if e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX)]

