"""What the cluster can ever offer, and a check before any worker starts that a run's workers fit in it
(Ray would otherwise wait for them forever).
"""

from __future__ import annotations

import logging
import math

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.memory import GB, GPU_MEMORY_GB, check_fits
from raytrain_app.ray_adapter import ray_compat
from raytrain_app.ray_adapter.driver import scaling_config

log = logging.getLogger(__name__)


def run_resources(cfg: TrainConfig) -> dict[str, float]:
    """The resources one run's workers reserve (Ray's own accounting, e.g. {"CPU": 2} or {"GPU": 8})."""
    return dict(scaling_config(cfg).total_resources)


def cluster_capacity() -> tuple[dict[str, float], bool]:
    """(the most resources this cluster can ever offer, whether it autoscales). An autoscaling cluster's
    maximum comes from its autoscaler config (what Ray Train itself checks); a fixed cluster has what its
    nodes have now."""
    import ray

    autoscaler_max = ray_compat.autoscaler_max_resources()
    if autoscaler_max:
        return autoscaler_max, True
    return {k: float(v) for k, v in ray.cluster_resources().items()}, False


def how_many_fit(need: dict[str, float], capacity: dict[str, float]) -> int:
    """How many copies of `need` fit in `capacity` at once."""
    counts = [math.floor(capacity.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min(counts) if counts else 0


def check_cluster_fits(cfg: TrainConfig) -> None:
    """Fail fast, before a worker starts, when the cluster (as far as it can ever grow) cannot place the run's
    workers: Ray would otherwise wait for them forever."""
    capacity, autoscaling = cluster_capacity()
    where = "this cluster can grow to" if autoscaling else "this cluster has"
    shown = ", ".join(f"{k} {v:g}" for k, v in sorted(capacity.items()) if k in ("CPU", "GPU") and v) or "nothing"
    if cfg.use_gpu and capacity.get("GPU", 0.0) < 1:
        raise UserError(f"--use-gpu: {where} no GPU ({shown}); drop --use-gpu to train on CPUs, or add GPU nodes")
    per_worker = {k: v / cfg.num_workers for k, v in run_resources(cfg).items()}
    fewest = cfg.min_workers or cfg.num_workers
    fits = how_many_fit(per_worker, capacity)
    if fits < fewest:
        need = ", ".join(f"{k} {v:g}" for k, v in sorted(per_worker.items()) if v)
        raise UserError(f"--num-workers {cfg.workers_text()}: each worker needs {need} and {where} {shown}, so at "
                        f"most {fits} worker(s) can ever be placed; lower --num-workers or add nodes")



def check_cluster_gpu_memory_fits(cfg: TrainConfig) -> None:
    """Refuse a run whose memory plan does not fit the GPUs of the accelerator type the cluster reports (the
    smallest, if several), before any worker starts (--gpu-memory-gb, when given, is checked without Ray)."""
    capacity, _ = cluster_capacity()
    types = sorted(k.split(":", 1)[1] for k in capacity if k.startswith("accelerator_type:"))
    known = sorted((GPU_MEMORY_GB[t], t) for t in types if t in GPU_MEMORY_GB)
    if not known:
        log.info(f"Memory plan not checked: the cluster reports no known GPU type ({', '.join(types) or 'none'}); "
                 "pass --gpu-memory-gb to check it.")
        return
    gb, name = known[0]
    check_fits(cfg, gb * GB, f"{name}, {gb:g} GB")
