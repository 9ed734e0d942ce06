"""Graceful stop and preemption: a stopped job saves the step it is at, so its resubmission loses nothing.

The path of a stop, end to end:
  1. The driver gets SIGINT or SIGTERM (Ctrl-C, `ray job stop` with the job's RAY_JOB_STOP_SIGNAL, a pod or node
     shutting down). `fit_until_stopped` runs `trainer.fit()` on a thread so that the main thread can take the
     signal (Ray Train's own SIGINT handler, which aborts the run without saving, is only installed on the main
     thread) and record it in a `StopRequest` actor.
  2. Every worker polls that actor from a background thread (`Interrupts`), never from the training step.
  3. At the next optimizer step the loop agrees across ranks to stop, saves a checkpoint of that step, and
     returns; the run ends normally in Ray, and the driver exits with 128 + the signal's number so that a job
     system sees an interruption, not a success.
A second signal ends the driver at once (its workers go with it); the latest checkpoint is then the last one
saved.

Ray's preemption notice (`ray.train.get_preemption_info`, e.g. a spot node about to be reclaimed) makes the
workers save the current step once and keep training; Ray Train restarts from that checkpoint when the node goes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from raytrain_app.core.interrupts import CONTINUE, SAVE, STOP
from raytrain_app.ray_adapter import ray_compat

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_INTERVAL_S = 0.5  # how often each worker asks the driver whether to stop


def new_stop_request() -> Any:
    """An actor holding the driver's stop request. Owned by the driver, and placed on the driver's node (as Ray
    Train places its controller) so that losing a worker node never loses it: it lives and dies with the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class StopRequest:
        def __init__(self) -> None:
            self.reason: str | None = None
            self.diverged: dict[str, int] | None = None

        def request(self, reason: str) -> None:
            self.reason = self.reason or reason

        def get(self) -> str | None:
            return self.reason

        # The other way: rank 0 tells the driver the run stopped itself because it diverged (Ray's Result
        # only carries a checkpoint's metrics, and a diverged step is deliberately not checkpointed).
        def report_divergence(self, info: dict[str, int]) -> None:
            self.diverged = info

        def divergence(self) -> dict[str, int] | None:
            return self.diverged

        # And rank 0's progress (about once a second), for the driver's console.
        def report_progress(self, progress: dict[str, Any]) -> None:
            self.latest_progress = progress

        def progress(self) -> dict[str, Any] | None:
            return getattr(self, "latest_progress", None)

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return StopRequest.options(scheduling_strategy=here).remote()


def fit_until_stopped(trainer: Any, stop_request: Any,
                      on_tick: Callable[[], None] | None = None) -> tuple[Any, int | None]:
    """`trainer.fit()`, with SIGINT and SIGTERM turned into a graceful stop. Returns (result, the signal that
    stopped it or None). Exceptions from fit() are raised here. `on_tick` is called about every 0.2 s (the
    progress display)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = e

    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:  # the second one: the user insists
            log.warning(f"\n{name} again: stopping now without waiting for the workers to save.")
            os._exit(128 + signum)
        received.append(signum)
        log.info(f"\n{name} received: the workers save a checkpoint of the current step, then the run stops "
                 f"(send it again to stop at once).")

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    thread = threading.Thread(target=fit, name="trainer.fit", daemon=True)
    thread.start()
    forwarded = False
    try:
        while thread.is_alive():
            thread.join(0.2)  # short waits keep the main thread free to take signals
            if on_tick is not None and thread.is_alive():
                on_tick()
            if received and not forwarded:
                # Not from the handler: a Ray call there could re-enter one the main thread is making.
                stop_request.request.remote(signal.Signals(received[0]).name)
                forwarded = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], (received[0] if received else None)


class Interrupts:
    """The loop's interrupt function on a worker: STOP once the driver asked to stop, SAVE once per preemption
    notice, CONTINUE otherwise. Cheap enough to call every step: it reads state set by a background thread."""

    def __init__(self, stop_request: Any, on_notice: Callable[[Any], None] | None = None) -> None:
        """`on_notice(info)` is called when a preemption notice turns into SAVE (to say so in the logs)."""
        self._stop = threading.Event()
        self._preemption_seen: object | None = None
        self._on_notice = on_notice
        self._preemption_info = ray_compat.preemption_reader()
        threading.Thread(target=self._watch, args=(stop_request,), name="stop-watch", daemon=True).start()

    def _watch(self, stop_request: Any) -> None:
        import ray

        while not self._stop.is_set():
            try:
                if ray.get(stop_request.get.remote(), timeout=30) is not None:
                    self._stop.set()
                    return
            except ray.exceptions.GetTimeoutError:
                continue  # a busy node: ask again
            except ray.exceptions.RayError as e:  # the driver and its actor are gone: Ray ends these workers too
                log.info(f"Stop requests can no longer be received ({type(e).__name__}): the driver is gone.")
                return
            time.sleep(POLL_INTERVAL_S)

    def __call__(self) -> int:
        if self._stop.is_set():
            return STOP
        info = self._preemption_info()
        if info is not None and info is not self._preemption_seen:
            self._preemption_seen = info
            if self._on_notice is not None:
                self._on_notice(info)
            return SAVE
        return CONTINUE
