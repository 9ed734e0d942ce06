"""Atomic publishing: readers of any storage see a whole file or none, never a part."""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs

from raytrain_app.storage.location import Location


def _read_umask() -> int:
    """The process's umask, read without changing it (os.umask can only read it by setting it, which races
    with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


_UMASK = _read_umask()


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

