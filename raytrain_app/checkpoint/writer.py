"""Checkpoints written off the training path.

At a checkpoint the loop blocks only while the state is copied into host memory (on CUDA, pinned buffers filled
by non-blocking copies, one synchronisation); a background thread then serialises it into a local folder, hashes
it into its manifest and writes best_model.pt. A whole model's state (DDP) is copied and written by rank 0; a
sharded one's (FSDP) by every worker, each its own shard (`stage` is then torch.distributed.checkpoint's). The
checkpoint is reported once that is done; Ray then copies the folder to the run's storage (in its own thread,
except for preemption and stop saves) and registers it once it is there. A process killed before then leaves
Ray's record at the previous checkpoint, which a restart resumes from exactly as before.

`ray.train.report` is a barrier: every rank reports the same checkpoint at the same step. Every rank says whether
its write is done through the loop's per-step agreement (the same tiny all-reduce the interrupts use), and every
rank reports at the first step at which all are. At most one checkpoint is in flight: the next one, a preemption
save, a stop and the end of training first wait for it (and for Ray to have uploaded and deleted its folder), so
host memory holds at most one copy of the state, whose buffers are reused from one checkpoint to the next.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

WriteFn = Callable[[Any, bool, str], Any]  # (staged state, is_best, dir name) -> what report takes
StageFn = Callable[[Any], Any]  # (state) -> its copy in host memory, taken on the training thread


# (metrics, written checkpoint or None, dir name, urgent: uploaded before returning, a preemption or stop save)
ReportFn = Callable[[dict[str, Any], Any, str, bool], None]


UPLOAD_WAIT_LIMIT_S = 3600.0


@dataclass
class _InFlight:
    metrics: dict[str, Any]
    dir_name: str
    thread: threading.Thread | None = None  # rank 0's write
    outcome: dict[str, Any] = field(default_factory=dict)  # "checkpoint" or "error", set by the thread


class CheckpointWriter:
    """One per worker. `stage` (default: `snapshot`) then `write` run on every rank that has a state to save
    (rank 0 for a whole model), `write` in a background thread unless `asynchronous` is False; `report` runs on
    every rank, on the training thread, at the same step."""

    def __init__(self, write: WriteFn, report: ReportFn, *, rank: int, asynchronous: bool = True,
                 wait_uploaded: Callable[[float], None] | None = None, stage: StageFn | None = None) -> None:
        """`wait_uploaded(timeout_s)`: returns once every checkpoint reported so far is uploaded (Ray uploads in
        the background, then deletes the local files); the next write waits for it, so one checkpoint's files at
        most are on this machine's disk or in its memory."""
        self.write, self.report, self.rank, self.asynchronous = write, report, rank, asynchronous
        self.stage = stage or self.snapshot
        self.wait_uploaded = wait_uploaded
        self.uploading: Any = None  # the last reported checkpoint, until it is known to be uploaded
        self.in_flight: _InFlight | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}  # reused host copies, by position in the state
        # What the benchmarks and metrics read: the training thread's time blocked by checkpoints, and the
        # background writes' time (what a synchronous save would have blocked).
        self.blocked_s = 0.0
        self.write_s = 0.0
        self.checkpoints = 0

    # --- the training thread ---------------------------------------------------------------------------------
    def submit(self, metrics: dict[str, Any], state: Any, is_best: bool, dir_name: str) -> None:
        """Start checkpoint `dir_name` (`state`: None on a rank with nothing to write). Every rank calls it at the
        same step."""
        self.flush()  # the one in flight first (each wait is counted where it happens)
        self._wait_for_upload()
        started = time.perf_counter()
        job = _InFlight(metrics, dir_name)
        if state is not None:
            snapshot = self.stage(state)
            job.thread = threading.Thread(target=self._write, args=(job, snapshot, is_best), daemon=True,
                                          name=f"checkpoint-{dir_name}")
            if self.asynchronous:
                job.thread.start()
            else:
                job.thread.run()  # here and now: --no-async-checkpoint
        self.in_flight = job
        self.blocked_s += time.perf_counter() - started
        self.checkpoints += 1
        if not self.asynchronous:
            self.flush()

    def ready(self) -> bool:
        """Whether this rank's part of the checkpoint in flight is written (a rank with nothing to write: at
        once); the loop reports it once every rank says so."""
        job = self.in_flight
        return job is not None and (job.thread is None or not job.thread.is_alive())

    def pending(self) -> bool:
        return self.in_flight is not None

    def flush(self, urgent: bool = False) -> None:
        """Wait for the checkpoint in flight (rank 0) and report it (every rank). `urgent` (a preemption notice, a
        stop): uploaded to the run's storage before this returns (Ray registers it at its controller's next poll).
        A failed write is raised here: Ray Train then restarts the workers from the last checkpoint it registered."""
        job = self.in_flight
        if job is None:
            return
        started = time.perf_counter()
        if job.thread is not None and job.thread.ident is not None:
            job.thread.join()
        self.in_flight = None
        if "error" in job.outcome:
            raise job.outcome["error"]
        checkpoint = job.outcome.get("checkpoint")
        self.report(job.metrics, checkpoint, job.dir_name, urgent)
        self.uploading = checkpoint
        self.blocked_s += time.perf_counter() - started

    def _wait_for_upload(self) -> None:
        if self.uploading is None or self.wait_uploaded is None:
            return
        started = time.perf_counter()
        self.wait_uploaded(UPLOAD_WAIT_LIMIT_S)
        self.uploading = None
        self.blocked_s += time.perf_counter() - started

    # --- rank 0's copy and write -------------------------------------------------------------------------------
    def snapshot(self, state: Any, path: tuple = ()) -> Any:
        """`state` with every tensor copied to host memory (the live ones go on changing) and every container
        new. On CUDA the copies are non-blocking into pinned buffers, then waited for once."""
        copied = self._copy(state, path)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return copied

    def _copy(self, value: Any, path: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                     pin_memory=tensor.is_cuda)
                self._buffers[path] = buffer
            buffer.copy_(tensor, non_blocking=tensor.is_cuda)
            return buffer
        if isinstance(value, dict):  # the same type: a module's state dict is an OrderedDict with _metadata
            out = type(value)()
            for k, v in value.items():
                out[k] = self._copy(v, (*path, k))
            if hasattr(value, "_metadata"):
                out._metadata = copy.deepcopy(value._metadata)
            return out
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, (*path, i)) for i, v in enumerate(value)]
            if isinstance(value, list):
                return items
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a namedtuple keeps its type
        return value  # numbers, strings, None: immutable

    def _write(self, job: _InFlight, snapshot: dict[str, Any], is_best: bool) -> None:
        started = time.perf_counter()
        try:
            job.outcome["checkpoint"] = self.write(snapshot, is_best, job.dir_name)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            job.outcome["error"] = e
        finally:
            self.write_s += time.perf_counter() - started

