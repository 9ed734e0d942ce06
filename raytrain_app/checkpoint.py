"""The checkpoint format, and the only module that reads or writes it.

A checkpoint is a Ray `Checkpoint` directory named `checkpoint_step=000123` holding
  state.pt       torch.save of the training state (keys below), loadable with weights_only=True
  meta.json      the few numbers needed to choose between checkpoints without loading state.pt
  manifest.json  size and SHA-256 of the two files above, written last: a folder whose files do not match it
                 (a write cut off, a lost or damaged object) is never loaded
and `<save-dir>/best_model.pt` is the same state as one file, replaced atomically whenever validation improves.

A run folder also holds Ray Train's record of its checkpoints (checkpoint_manager_snapshot.json). Before a run
continues, `recover_run` verifies the checkpoint that record names as the latest and, when it is not whole,
falls back to the newest one that is, rewriting the record so Ray restores that one.

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
  skipped_steps         optimizer steps skipped for non-finite gradients; skip_streak: of them in a row now
  wandb_run_id          the run's wandb run id (chosen at the run's start, used with --use-wandb)
  format_version        2 (1: written before manifests; such folders are loaded without one)
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

FORMAT_VERSION = 2
MANIFEST_VERSION_SINCE = 2  # format versions from this one on are written with a manifest
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
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


def checkpoint_problem(checkpoint_dir: Location | str) -> str | None:
    """Why the checkpoint folder is not whole (missing, cut off, damaged), or None when it is: every file its
    manifest lists is there with the listed size and SHA-256. A folder written before manifests (format 1) is
    whole when its state file is there; loading it still refuses a truncated file."""
    where = _as_location(checkpoint_dir)
    manifest = _read_json(where.join(MANIFEST_FILE))
    if manifest is None:
        meta = _read_json(where.join(META_FILE)) or {}
        if meta.get("format_version", MANIFEST_VERSION_SINCE) < MANIFEST_VERSION_SINCE:
            return None if where.join(STATE_FILE).is_file() else f"it has no {STATE_FILE}"
        if not where.exists():
            return "it does not exist"
        return f"it has no {MANIFEST_FILE} (its write never finished)"
    files = manifest.get("files")
    if not (isinstance(files, dict) and STATE_FILE in files and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values())):
        return f"its {MANIFEST_FILE} is damaged"
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


def verify_checkpoint_dir(checkpoint_dir: Location | str, label: str | None = None) -> None:
    """Raise CheckpointError naming the folder (or `label`) unless it is whole (see `checkpoint_problem`)."""
    problem = checkpoint_problem(checkpoint_dir)
    if problem:
        raise CheckpointError(f"checkpoint {label or checkpoint_dir} is not whole: {problem}")


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
    """A JSON object file, or None when it is missing or is not one (cut off, damaged: any byte may be wrong)."""
    if not location.is_file():
        return None
    try:
        value = json.loads(location.read_bytes())
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        return None
    return value if isinstance(value, dict) else None


def _latest_result(run_dir: Location) -> dict[str, Any] | None:
    snapshot = _read_json(run_dir.join(RUN_SNAPSHOT_FILE)) or {}
    return snapshot.get("latest_checkpoint_result") or None


def _step_of(dir_name: str) -> int:
    return int(dir_name[len(CHECKPOINT_PREFIX):])


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


def plan_recovery(run_dir: Location | str, warn: Any = print) -> Recovery:
    """Find the checkpoint a run continues from, verified, without writing anything.

    When the checkpoint Ray's record names as the latest is not whole (cut off, damaged, deleted), `warn` names
    it and the run falls back to its newest whole checkpoint; the returned Recovery rewrites Ray's record without
    the broken ones, so that Ray restores the same one and never refuses to start over a folder that is gone.
    A record that is cut off or missing while checkpoint folders exist is rebuilt from the whole ones. Raises
    CheckpointError when no checkpoint is whole."""
    run_dir = _as_location(run_dir)
    snapshot_file = run_dir.join(RUN_SNAPSHOT_FILE)
    snapshot = _read_json(snapshot_file)
    if snapshot is None and _checkpoint_names(run_dir):
        return _rebuild_snapshot(run_dir, snapshot_file, warn)
    if not snapshot or not snapshot.get("latest_checkpoint_result"):
        return Recovery(state=None)
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    recorded = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    candidates = [latest, *sorted((n for n in recorded if _step_of(n) < _step_of(latest)), key=_step_of,
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
    warn(f"  Continuing from {run_dir.join(chosen)} (global step {_step_of(chosen)}).")
    return Recovery(state=run_dir.join(chosen, STATE_FILE), snapshot_file=snapshot_file,
                    new_snapshot=_without_checkpoints(snapshot, broken, chosen))


def recover_run(run_dir: Location | str, warn: Any = print) -> Location | None:
    """`plan_recovery`, applied at once: the verified state file a run continues from, or None."""
    recovery = plan_recovery(run_dir, warn)
    recovery.apply()
    return recovery.state


def _checkpoint_names(run_dir: Location) -> list[str]:
    return [e.base_name for e in run_dir.list()
            if e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX)]


def last_good_checkpoint(run_dir: Location | str, before_step: int) -> Location | None:
    """The folder of the run's newest whole checkpoint from before global step `before_step` whose validation
    loss was finite (None: there is none). A diverging run's last checkpoints can hold weights that already
    overflow: only a finite validation loss vouches for them."""
    run_dir = _as_location(run_dir)
    names = _checkpoint_names(run_dir)
    for name in sorted((n for n in names if _step_of(n) < before_step), key=_step_of, reverse=True):
        loss = (_read_json(run_dir.join(name, META_FILE)) or {}).get("eval_val_loss")
        if loss is not None and math.isfinite(loss) and checkpoint_problem(run_dir.join(name)) is None:
            return run_dir.join(name)
    return None


def _rebuild_snapshot(run_dir: Location, snapshot_file: Location, warn: Any) -> Recovery:
    """Ray Train writes its run record in place, so a process killed during that write leaves it cut off (or,
    killed between the first checkpoint's copy and the first record, missing), and Ray then refuses to start the
    run, or starts it anew. Rebuild the record from the run's whole checkpoint folders: their meta.json holds
    what Ray orders them by."""
    from importlib.metadata import version

    from raytrain_app.loop import UNVALIDATED_LOSS

    results = []
    for index, name in enumerate(sorted(_checkpoint_names(run_dir), key=_step_of)):
        meta = _read_json(run_dir.join(name, META_FILE))
        if meta is None or checkpoint_problem(run_dir.join(name)) is not None:
            continue
        loss = meta.get("eval_val_loss")
        metrics = {"epoch": meta["epoch"], "global_step": meta["global_step"],
                   "batch_index": (meta.get("data_position") or {}).get("batch_index", 0),
                   "val_loss": UNVALIDATED_LOSS if loss is None else loss, "validated": loss is not None,
                   "best_val_loss": meta.get("best_val_loss")}
        results.append((index, {"version": 0, "checkpoint_dir_name": name, "metrics": metrics}))
    what = "cut off or damaged" if snapshot_file.is_file() else "missing"
    if not results:
        raise CheckpointError(f"run {run_dir}: Ray's record of the run ({RUN_SNAPSHOT_FILE}) is {what} and no "
                              "checkpoint folder is whole; nothing was changed. Start it anew under another "
                              "--run-name.")
    warn(f"⚠️  WARNING: Ray's record of run {run_dir} ({RUN_SNAPSHOT_FILE}) is {what}: rebuilding it from the "
         f"run's {len(results)} whole checkpoint(s).")
    latest = results[-1][1]
    # Ray keeps the list in its own order, worst score first (the highest loss), ties in report order; it
    # inserts into and deletes from that order, so any other would make it delete the wrong checkpoints.
    results.sort(key=lambda r: (-r[1]["metrics"]["val_loss"], r[0]))
    snapshot = {"ray_version": version("ray"), "checkpoint_results": [r for _, r in results],
                "checkpoint_report_indices": [i for i, _ in results], "latest_checkpoint_result": latest,
                "pending_training_results": [], "pending_validation_specs": [],
                "current_report_index": max(i for i, _ in results) + 1, "validated_checkpoint_dir_names": [],
                "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    return Recovery(state=run_dir.join(latest["checkpoint_dir_name"], STATE_FILE), snapshot_file=snapshot_file,
                    new_snapshot=snapshot)


def _without_checkpoints(snapshot: dict[str, Any], broken: set[str], latest: str) -> dict[str, Any]:
    """Ray Train's run record without the `broken` checkpoints, with `latest` as the latest."""
    snapshot = dict(snapshot)
    keep = [(r, i) for r, i in zip(snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"],
                                               strict=True)
            if r["checkpoint_dir_name"] not in broken]
    snapshot["checkpoint_results"] = [r for r, _ in keep]
    snapshot["checkpoint_report_indices"] = [i for _, i in keep]
    snapshot["latest_checkpoint_result"] = next(r for r, _ in keep if r["checkpoint_dir_name"] == latest)
    pending = [(r, v) for r, v in zip(snapshot.get("pending_training_results", []),
                                      snapshot.get("pending_validation_specs", []), strict=True)
               if r["checkpoint_dir_name"] not in broken]
    snapshot["pending_training_results"] = [r for r, _ in pending]
    snapshot["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snapshot:
            snapshot[key] = [n for n in snapshot[key] if n not in broken]
    return snapshot


def latest_run_metrics(run_dir: Location | str) -> dict[str, Any] | None:
    """The metrics reported with the run's latest checkpoint (epoch, global_step, val_loss, ...), or None."""
    latest = _latest_result(_as_location(run_dir))
    return dict(latest.get("metrics") or {}) if latest else None


def best_run_checkpoint(run_dir: Location | str, warn: Any = print) -> Location | None:
    """The state file of the run's whole checkpoint with the lowest validation loss (latest on ties); one that
    is not whole is named by `warn` and passed over."""
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
    for _, _, name in sorted(candidates):
        problem = checkpoint_problem(run_dir.join(name))
        if problem is None:
            return run_dir.join(name, STATE_FILE)
        warn(f"⚠️  WARNING: checkpoint {run_dir.join(name)} is not whole: {problem}. Passing over it.")
    return None


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
