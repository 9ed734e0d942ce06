"""Driver-side Ray: join or start a cluster, and build the TorchTrainer for one run.

Shared by `raytrain_app.main` (one run) and `raytrain_app.tune` (one run per trial); the worker side is
`ray_adapter.worker`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from typing import Any

from raytrain_app.core.config import ConfigError, TrainConfig
from raytrain_app.ray_adapter.fault_injection import STEP_DELAY_ENV_VAR
from raytrain_app.ray_adapter.joining import plan_join
from raytrain_app.storage.location import FORWARDED_ENV_VARS, Location

log = logging.getLogger(__name__)

# This driver process's id in the run's metrics: a restore under the same id is a worker restart, under another
# a re-run of the command.
ATTEMPT = secrets.token_hex(6)


# Ray Train's controller polls workers this often; each ray.train.report waits about one poll. Ray's default
# is 2 s; we only report at validations, so polling faster costs little and keeps checkpoints cheap.
DEFAULT_POLL_INTERVAL_S = "0.2"


def connect_ray(num_cpus: int) -> None:
    """Join the cluster this process belongs to (RAY_ADDRESS, `ray job submit`, a local `ray start`), or start
    a private local instance with `num_cpus` logical CPUs. Which one is decided in seconds (`joining.plan_join`):
    a cluster that does not answer is one line and exit code 2, never a wait in `ray.init`."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS", "unset").strip():
        del os.environ["RAY_ADDRESS"]  # blank: no address (ray.init would take it as given and fail to parse it)
    join = plan_join()
    if join.note:
        log.info(join.note)
    if join.starts_local:
        # A private instance stays on loopback; Ray reads this at import time, so set it before importing ray.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    env_vars = {
        # Endpoints and credentials the driver resolved storage with reach every worker, and wandb's settings.
        **{name: os.environ[name] for name in FORWARDED_ENV_VARS if name in os.environ},
        **{name: value for name, value in os.environ.items() if name.startswith("WANDB_")},
        **({STEP_DELAY_ENV_VAR: os.environ[STEP_DELAY_ENV_VAR]} if STEP_DELAY_ENV_VAR in os.environ else {}),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                            DEFAULT_POLL_INTERVAL_S),
        # Ray Train tees workers' print() into its logger, which doubles every line on the console.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    # In a job, Ray refuses a driver runtime env that names a variable the job's runtime env already sets
    # (jobs/runtime_env.yaml may set AWS_REGION, say): leave those to the job, which sets them everywhere.
    env_vars = {k: v for k, v in env_vars.items() if k not in _job_env_vars()}
    if join.starts_local:
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars})
    else:
        ray.init(address=join.address, runtime_env={"env_vars": env_vars})


def _job_env_vars() -> set[str]:
    """The environment variables the runtime env of the Ray job this driver runs in sets (none outside a job)."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if not job_config:
        return set()
    try:
        return set((json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


# How often an elastic run (--num-workers MIN-MAX) checks whether more workers fit now, in seconds; each check
# that finds more restarts the group, bigger, from the latest checkpoint. Ray's default, 60 s, suits a cloud's
# autoscaler; a cluster whose nodes come back in seconds may check more often. (docs/reliability.md)
RESIZE_INTERVAL_ENV_VAR = "RAYTRAIN_ELASTIC_RESIZE_INTERVAL_S"
DEFAULT_RESIZE_INTERVAL_S = 60.0


def resize_interval_s(environ: dict[str, str] | None = None) -> float:
    text = (os.environ if environ is None else environ).get(RESIZE_INTERVAL_ENV_VAR)
    if text is None:
        return DEFAULT_RESIZE_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{RESIZE_INTERVAL_ENV_VAR}={text}: give a number of seconds above 0 (default 60)")
    return value


def scaling_config(cfg: TrainConfig) -> Any:
    import ray.train

    if not cfg.elastic:
        return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)
    return ray.train.ScalingConfig(num_workers=(cfg.min_workers, cfg.num_workers), use_gpu=cfg.use_gpu,
                                   elastic_resize_monitor_interval_s=resize_interval_s())


def make_trainer(cfg: TrainConfig, *, run_name: str, storage: Location, init_from: str | None,
                 lineage: dict[str, Any] | None, callbacks: list[Any] | None = None,
                 fork_keeps_best: bool = True, log_prefix: str = "", stop_request: Any = None,
                 wandb_group: str | None = None, verified_checkpoint: str | None = None,
                 input_stats: tuple[list[float], list[float]] | None = None) -> Any:
    """The TorchTrainer of one run: `<storage>/<run_name>/`, restarted from its latest checkpoint on worker
    failure, continued from it when created again with the same name (a retry, a re-run).

    A new run starts from `init_from` (None: from scratch) and records `lineage`; see
    `restore_training_state` for `fork_keeps_best`. `stop_request`: see `ray_adapter.control`. `verified_checkpoint`:
    the name of the checkpoint folder the driver has just verified (`plan_recovery`): workers restoring it do
    not hash it again. `input_stats`: (mean, std) per feature a run from scratch standardises its inputs with
    (--normalize standard); a run from a checkpoint takes the checkpoint's."""
    import ray.train

    from raytrain_app.ray_adapter.ray_compat import torch_trainer_class
    from raytrain_app.ray_adapter.worker import train_func

    return torch_trainer_class()(
        train_func,
        train_loop_config={"config": cfg.to_dict(), "init_from": init_from, "lineage": lineage,
                           "fork_keeps_best": fork_keeps_best, "log_prefix": log_prefix,
                           "stop_request": stop_request, "run_dir": storage.join(run_name).uri,
                           "attempt": ATTEMPT, "wandb_group": wandb_group,
                           "verified_checkpoint": verified_checkpoint, "input_stats": input_stats},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=None if storage.is_local else storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,  # the best by --select-metric; Ray always keeps the latest too
                checkpoint_score_attribute=cfg.select_metric,
                checkpoint_score_order="max" if cfg.selects_max else "min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )

