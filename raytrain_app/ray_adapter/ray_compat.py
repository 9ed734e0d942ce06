"""Every use of a non-public Ray API, in one place, for the one Ray version it was written against.

Ray's public API has no way to do these; each function says what it reaches into. Importing this module checks
the installed Ray version and ends the process with one line when it is not the supported one: these internals
change between releases, and a silent mismatch would corrupt a run's record or lose a stop request. To move to
another Ray version, check each function here against its source, then change SUPPORTED_RAY_VERSION (and the
pin in pyproject.toml).

It does not import Ray at import time: the driver sets environment variables Ray reads when it is imported.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from raytrain_app.observability.console import configure_console

log = logging.getLogger(__name__)

SUPPORTED_RAY_VERSION = "2.60.0"
EXIT_UNSUPPORTED = 2  # a mistake in the environment the user set up, as the commands' other input mistakes


def ray_version_problem(installed: str | None) -> str | None:
    """The one line saying why `installed` (Ray's version, None: not installed) cannot be used, or None."""
    if installed == SUPPORTED_RAY_VERSION:
        return None
    found = f"Ray {installed} is installed" if installed else "Ray is not installed"
    return (f"error: raytrain_app supports Ray {SUPPORTED_RAY_VERSION} only, and {found}: install it with "
            f"pip install 'ray[default,train,tune]=={SUPPORTED_RAY_VERSION}'")


def _installed_ray_version() -> str | None:
    try:
        return version("ray")
    except PackageNotFoundError:
        return None


_problem = ray_version_problem(_installed_ray_version())
if _problem:
    configure_console()  # at import, before any command has set up the console: the process ends with this line
    log.error(_problem)
    raise SystemExit(EXIT_UNSUPPORTED)


# --- Ray Train's run record (checkpoint_manager_snapshot.json) ------------------------------------------------

def new_run_record(results: list[tuple[int, str, dict[str, Any]]], score: str = "val_loss",
                   higher_is_better: bool = False) -> dict[str, Any]:
    """Ray Train's record of a run holding `results`: (report index, checkpoint folder name, its metrics), in
    report order; the last is the latest. `score`: the run's checkpoint_score_attribute (--select-metric).
    (The schema of Ray Train V2's CheckpointManager snapshot.)"""
    entries = [(index, {"version": 0, "checkpoint_dir_name": name, "metrics": metrics})
               for index, name, metrics in results]
    latest = entries[-1][1]
    # Ray keeps the list in its own order, worst score first (the highest loss, the lowest accuracy), ties in
    # report order; it inserts into and deletes from that order, so any other would make it delete the wrong
    # checkpoints.
    sign = 1 if higher_is_better else -1
    entries.sort(key=lambda e: (sign * e[1]["metrics"][score], e[0]))
    return {"ray_version": _installed_ray_version(), "checkpoint_results": [r for _, r in entries],
            "checkpoint_report_indices": [i for i, _ in entries], "latest_checkpoint_result": latest,
            "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": max(i for i, _ in entries) + 1, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


def run_record_without(snapshot: dict[str, Any], broken: set[str], latest: str) -> dict[str, Any]:
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


def latest_recorded_checkpoint(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """The record's latest checkpoint entry (checkpoint_dir_name, metrics), or None."""
    return snapshot.get("latest_checkpoint_result") or None


def recorded_checkpoint_names(snapshot: dict[str, Any]) -> set[str]:
    return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}


# --- the cluster ---------------------------------------------------------------------------------------------

def autoscaler_max_resources() -> dict[str, float] | None:
    """The most resources an autoscaling cluster can grow to, from its autoscaler config (what Ray Train itself
    checks before placing workers), or None for a cluster without one. (ray._private.state.)"""
    from ray._private.state import state

    try:
        found = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API, its failures undocumented: the cluster then counts as fixed
        return None
    return {k: float(v) for k, v in found.items()} if found else None


# --- a Ray Train run --------------------------------------------------------------------------------------------

@functools.cache
def torch_trainer_class() -> type:
    """Ray's TorchTrainer, less one process at every worker-group start: Ray Train starts a DatasetManager actor
    for the trainer's Ray Datasets at each start and restart even when it has none, and this service streams its
    own data (raytrain_app.datasets) and passes none. That actor is a Python process importing Ray, about 1.3 s of
    CPU on each start, restarts after a lost worker included. With datasets, the class keeps Ray's callbacks.
    (DataParallelTrainer._create_default_callbacks and ray.train.v2._internal.callbacks.DatasetsCallback.)"""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = "TorchTrainer"
    return Trainer


# --- a Ray Train worker ----------------------------------------------------------------------------------------

def preemption_reader() -> Callable[[], Any]:
    """A function returning this worker's copy of Ray Train's preemption notice (or None), read without the
    collective that the public `ray.train.get_preemption_info()` runs (the loop agrees across ranks itself).
    (ray.train.v2._internal.execution.context.)"""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        context = get_train_context()
    except RuntimeError:  # not in a Ray Train worker: no notices
        return lambda: None
    return lambda: getattr(context.preemption_context, "preemption_info", None)


def quiet_report_logs() -> None:
    """Lower Ray Train's per-report INFO lines to warnings (our one line per validation says what matters). Ray
    names the first logger after its source file's path, the second after its module."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


# --- Ray Tune ---------------------------------------------------------------------------------------------------

def override_restored_tuner(tuner: Any, *, max_concurrent_trials: int, failure_config: Any) -> None:
    """`Tuner.restore` brings back the settings of the sweep's first start (tuner.pkl) and offers no way to change
    them; the cluster may have changed since, and --max-failures may have: this run's values apply.
    (Tuner._local_tuner and its _tune_config / _run_config.)"""
    internal = tuner._local_tuner
    internal._tune_config.max_concurrent_trials = max_concurrent_trials
    internal._run_config.failure_config = failure_config


# The cheapest RPC every GCS serves, from Ray's internal gRPC protocol (src/ray/protobuf/gcs_service.proto); Ray's
# own clients call it first when they connect. An empty request is a valid GetClusterIdRequest, and the reply is
# not decoded: only whether and how the GCS answers matters (joining.probe).
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def address_record(environ: Mapping[str, str] = os.environ) -> Path:
    """The file `ray start --head` writes its address to (`ray/ray_current_cluster` in Ray's temp folder), found
    by Ray's own rule (`ray._common.utils.get_default_system_temp_dir`): RAY_TMPDIR, else TMPDIR on Linux, else
    /tmp. Computed here rather than imported: the driver decides whether to join before it imports Ray."""
    if "RAY_TMPDIR" in environ:
        base = environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in environ:
        base = environ["TMPDIR"]
    else:
        base = "/tmp"
    return Path(os.path.join(base, "ray", "ray_current_cluster"))


# How Ray's clients carry the token on gRPC (ray/_private/authentication/authentication_constants.py).
AUTH_METADATA_KEY = "authorization"
AUTH_BEARER_PREFIX = "Bearer "


def client_auth_token(environ: Mapping[str, str], *, explicit_address: bool) -> tuple[str | None, str]:
    """The token a Ray 2.60 client would send, and where it came from ("" when it sends none). `ray.init` sends
    one when RAY_AUTH_MODE=token, or, with RAY_AUTH_MODE unset, when it joins a local cluster it found by itself
    (`address in (None, "auto")`, worker.py) and a token exists; the job client only with RAY_AUTH_MODE=token.
    Ray's token loader reads RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token. A
    token file that cannot be read gives (None, its path)."""
    mode = environ.get("RAY_AUTH_MODE")
    if (mode or "").lower() != "token" and (mode is not None or explicit_address):
        return None, ""
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    home = Path(environ.get("HOME") or Path.home())
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or home / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None, str(path)
    except OSError:
        return None, str(path)
