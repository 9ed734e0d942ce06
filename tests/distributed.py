"""Training on several processes without Ray: the plain-PyTorch loop under torch.distributed (gloo, CPU), for the
sharding tests and the end-to-end tests' uninterrupted reference run (a Ray run must end with its bits).
`train_all(...)` starts `world_size` processes, each running one run after another: build the model in the
requested layout (DDP or FSDP), optionally restore a checkpoint folder, train with checkpoints written by
`save_training_state`, and stop at a chosen step the way a preemption does. Rank 0 writes what the test compares:
every step's training loss and the final weights, gathered whole.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path
from typing import Any

import torch

STEPS = 16  # of the runs below: 2 epochs of 8 steps; checkpoints at steps 5, 8 (epoch end), 10, 15, 16
MID = 5  # a mid-epoch checkpoint the sharding tests resume from


def config(data: Path, strategy: str, **overrides: Any) -> dict:
    """Every run is elastic (--num-workers 1-2): on 1 worker it accumulates 2 micro-batches per step and keeps
    the effective batch."""
    from raytrain_app.core.config import TrainConfig

    return TrainConfig(data=str(data), hidden_dim=16, num_layers=2, num_heads=2, warmup_steps=4, epochs=2,
                       batch_size=16, eval_every=MID, num_workers="1-2", strategy=strategy, feature_dim=4,
                       seq_len=8, num_classes=3, **overrides).to_dict()


def runs_folder(shared_tmp: Path) -> Path:
    """The uninterrupted runs `ddp2` and `fsdp2` (2 workers), `ddp2-per-step` (per-step labels) and their data
    (trained once per test session, whichever test needs them first)."""
    from tests.conftest import computed_once, write_dataset

    def compute(folder: Path) -> str:
        # 65 validation rows: shares of 32 and 33, so the ranks run 2 and 3 forwards in evaluation.
        data = write_dataset(folder / "data.pkl", num_val=65)
        per_step = write_dataset(folder / "per-step.pkl", num_val=65, per_step=True)
        runs = {f"{strategy}2": {"config": config(data, strategy)} for strategy in ("ddp", "fsdp")}
        runs["ddp2-per-step"] = {"config": config(per_step, "ddp", per_step=True)}
        train_all(folder, runs, world_size=2)
        return str(folder)

    return Path(computed_once(shared_tmp, "sharding-runs", compute))


# On one machine: gloo's sockets on loopback, whatever the machine's network address.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def train_all(tmp_path: Path, runs: dict[str, dict[str, Any]], *, world_size: int,
              timeout_s: float = 240) -> dict[str, dict[str, Any]]:
    """Several runs one after the other in the same `world_size` processes (starting processes and importing
    torch costs more than training this model): {name: {"config", "resume", "stop_at_step", "input_mean"}} ->
    {name: results as `train` returns them}. `input_mean`: a value the model's input mean holds before the
    checkpoint is restored (what restoring must overwrite)."""
    from tests.conftest import require_slow

    require_slow("trains on gloo processes")
    specs = []
    for name, run in runs.items():
        out_dir = tmp_path / name
        out_dir.mkdir(parents=True)
        specs.append({"config": run["config"], "resume": str(run["resume"]) if run.get("resume") else None,
                      "stop_at_step": run.get("stop_at_step"), "out_dir": str(out_dir),
                      "input_mean": run.get("input_mean")})
    init_file = tmp_path / f"init-{next(iter(runs))}"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(rank, world_size, str(init_file), specs))
                 for rank in range(world_size)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout_s)
    for p in processes:
        if p.is_alive():
            p.kill()
    errors = sorted(tmp_path.glob("*/error-rank*.txt"))
    assert not errors, errors[0].read_text()
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return {name: torch.load(tmp_path / name / "result.pt", weights_only=True) for name in runs}


def _worker(rank: int, world_size: int, init_file: str, specs: list[dict[str, Any]]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    for spec in specs:
        try:
            _train(rank, world_size, spec)
        except BaseException:
            Path(spec["out_dir"], f"error-rank{rank}.txt").write_text(traceback.format_exc())
            raise
    dist.destroy_process_group()


def _train(rank: int, world_size: int, spec: dict[str, Any]) -> None:
    import torch.distributed as dist

    from raytrain_app.checkpoint.format import STATE_FILE, checkpoint_dir_name, load_state
    from raytrain_app.checkpoint.sharded import gather_full_state
    from raytrain_app.checkpoint.state import restore_training_state, save_training_state
    from raytrain_app.core.config import TrainConfig
    from raytrain_app.core.interrupts import CONTINUE, STOP
    from raytrain_app.core.model import set_normalization
    from raytrain_app.core.model_spec import build_model
    from raytrain_app.core.parallel import parallelize
    from raytrain_app.core.rng import seed_everything
    from raytrain_app.core.trainer import Trainer
    from raytrain_app.datasets.formats import open_dataset
    from raytrain_app.datasets.normalize import feature_stats

    cfg = TrainConfig.from_dict(spec["config"])
    device = torch.device("cpu")
    seed_everything(cfg.seed, rank)
    data = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    model = build_model(cfg)
    if not spec["resume"] and cfg.normalize == "standard":  # as the driver does for a run from scratch
        set_normalization(model, *feature_stats(data.train))
    if spec.get("input_mean") is not None:
        model.input_mean.fill_(spec["input_mean"])
    trainer = Trainer(cfg, model, parallelize(cfg, model, device, world_size), device)
    if spec["resume"]:
        state = load_state(os.path.join(spec["resume"], STATE_FILE), mmap=True)
        restore_training_state(trainer, state, checkpoint_dir=spec["resume"])
    losses: dict[int, float] = {}
    checkpoints: list[str] = []

    def on_step() -> None:
        losses[trainer.global_step] = trainer.last_loss.item()

    def on_checkpoint(metrics: dict[str, Any], scores: Any, is_best: bool) -> None:
        name = checkpoint_dir_name(metrics["global_step"])
        save_training_state(trainer, os.path.join(spec["out_dir"], name), scores)
        checkpoints.append(name)

    def interrupt() -> int:  # a preemption: save this step, stop
        return STOP if trainer.global_step == spec["stop_at_step"] else CONTINUE

    trainer.fit(data, on_checkpoint, interrupt if spec["stop_at_step"] else None, on_step)
    # What this worker holds of the weights and AdamW moments (its shards under FSDP), for the memory plan.
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
    moments = [t.to_local() if hasattr(t, "to_local") else t for s in trainer.optimizer.state.values()
               for k, t in s.items() if k != "step"]
    held = {"parameters": sum(t.nbytes for t in local), "optimizer": sum(t.nbytes for t in moments)}
    weights, _ = gather_full_state(trainer.model, None)
    if rank == 0:
        torch.save({"losses": losses, "weights": weights, "checkpoints": checkpoints, "held_bytes": held},
                   os.path.join(spec["out_dir"], "result.pt"))
    dist.barrier()
