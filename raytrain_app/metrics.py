"""A run's metrics: `metrics.jsonl` in the run folder (local or a URI) and, with --use-wandb, a wandb run.

Rank 0 records every optimizer step's training metrics and writes them, with the checkpoint's validation and
speed figures, when a checkpoint is saved. A step is written once however the run is interrupted and resumed:
rows of steps already in the file are not written again (a resumed run retrains them to the same values), and
wandb gets exactly the rows the file gets, after it: a process killed in between, or within wandb's flush
interval (1 s) after it, leaves a gap in wandb, never a duplicate. The wandb run id follows from the run folder,
so every attempt of a run continues the same wandb run.

metrics.jsonl rows (one JSON object per line):
  {"kind": "event", "event": "start" | "resume", "step", "cause", "attempt", "time", ...}
  {"kind": "train", "step", "train_ema_loss", "lr"}                           every optimizer step
  {"kind": "checkpoint", "step", "epoch", "val_loss", "best_val_loss", "validated", "skipped_steps",
   "samples_per_s", "tokens_per_s", "step_time_s", "data_wait_fraction", "mfu", "peak_gpu_mem_gb"}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from raytrain_app.checkpoint import publish_bytes
from raytrain_app.config import TrainConfig
from raytrain_app.storage import Location

METRICS_FILE = "metrics.jsonl"
WANDB_FLUSH_INTERVAL_S = 1.0
DATA_ROW_KINDS = ("train", "checkpoint")

# Dense bf16/fp16 tensor-core peak per GPU (vendor datasheets), by a part of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10G": 125e12}


def wandb_run_id(run_uri: str) -> str:
    """The wandb run id of a run: the same for every attempt of it (restart, re-run, resubmission)."""
    return hashlib.sha256(run_uri.encode()).hexdigest()[:16]


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for the MFU estimate; None where it is not known (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for part, flops in PEAK_FLOPS.items() if part in name), None)


def flops_per_token(cfg: TrainConfig, num_params: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus attention's 12 x layers x width x
    sequence length (the PaLM paper's estimate)."""
    return 6 * num_params + 12 * cfg.num_layers * cfg.hidden_dim * cfg.seq_len


def read_rows(location: Location) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a line cut off by a kill is skipped)."""
    if not location.is_file():
        return []
    rows = []
    for line in location.read_bytes().decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def high_water(rows: list[dict[str, Any]]) -> int:
    """The last step the rows hold data of (-1: none)."""
    return max((int(r["step"]) for r in rows if r.get("kind") in DATA_ROW_KINDS), default=-1)


class RunMetrics:
    """Rank 0's recorder. `restored_step`: the step the workers restored from the run's own checkpoint (None for
    a run's first start, a fork included); `attempt`: the driver's id, which tells a worker restart (same driver)
    from a re-run; `fork_of`: a fork's lineage."""

    def __init__(self, cfg: TrainConfig, run_dir: Location, *, start_step: int, restored_step: int | None,
                 attempt: str, fork_of: dict[str, Any] | None, num_params: int, device: torch.device,
                 wandb_group: str | None = None) -> None:
        self.cfg, self.device = cfg, device
        self.file = run_dir.join(METRICS_FILE)
        rows = read_rows(self.file)
        self.text = "".join(json.dumps(r) + "\n" for r in rows)  # what the file holds (cut lines dropped)
        self.high_water = high_water(rows)
        events = [r for r in rows if r.get("kind") == "event"]
        now = time.time()
        if restored_step is None:
            event = {"kind": "event", "event": "start", "step": start_step, "attempt": attempt, "time": now,
                     "cause": "fork" if fork_of else "new run", "fork_of": fork_of, "config": cfg.to_dict()}
        else:
            same_driver = bool(events) and events[-1].get("attempt") == attempt
            event = {"kind": "event", "event": "resume", "step": restored_step, "attempt": attempt, "time": now,
                     "cause": "worker restart (a worker or node was lost)" if same_driver
                     else "re-run (a new driver: the same command again, or a resubmitted job)"}
        self.pending: list[dict[str, Any]] = [event]
        self.steps: list[tuple[int, torch.Tensor, float]] = []  # (step, EMA loss on the device, lr)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len  # per worker and micro-batch
        self.flops_per_token = flops_per_token(cfg, num_params)
        self.peak = peak_flops(device)
        # Time between consecutive optimizer steps, since the last checkpoint; the interval that holds a
        # validation and a checkpoint is left out, so the figures are the training loop's own speed.
        self.last_step_at: tuple[float, float] | None = None  # (time, data wait so far) at the previous step
        self.timed_steps, self.step_s, self.wait_s = 0, 0.0, 0.0
        self.wandb = None
        if cfg.use_wandb:
            try:
                self.wandb = open_wandb(cfg, run_dir, wandb_group, fork_of)
            except Exception as e:  # noqa: BLE001 - logging must not cost the training run
                _wandb_failed("could not start", e)

    def on_step(self, step: int, ema: torch.Tensor, lr: float, data_wait_s: float = 0.0) -> None:
        """After optimizer step `step`; `data_wait_s`: the loop's total time waiting for data so far."""
        self.steps.append((step, ema.detach().clone(), lr))  # no host sync: read at the next checkpoint
        now = time.perf_counter()
        if self.last_step_at is not None:
            last, last_wait = self.last_step_at
            self.timed_steps += 1
            self.step_s += now - last
            self.wait_s += data_wait_s - last_wait
        self.last_step_at = (now, data_wait_s)

    def speed(self, world_size: int, accumulation: int) -> dict[str, Any]:
        """Throughput of the steps since the previous checkpoint (host time: on CUDA the queue of launched work
        makes each step's edges soft, which averages out over many steps)."""
        if self.timed_steps == 0 or self.step_s <= 0:
            return {}
        step_time = self.step_s / self.timed_steps
        samples_per_s = self.cfg.batch_size * accumulation * world_size / step_time
        tokens_per_s = samples_per_s * self.cfg.seq_len
        out = {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "step_time_s": step_time,
               "data_wait_fraction": min(1.0, max(0.0, self.wait_s / self.step_s))}
        if self.peak:
            out["mfu"] = tokens_per_s / world_size * self.flops_per_token / self.peak
        if self.device.type == "cuda":
            out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out

    def commit(self, checkpoint_row: dict[str, Any]) -> None:
        """Write the pending rows and this checkpoint's row: the file first, then wandb. Called before the
        checkpoint is reported: a process killed in between has written steps its re-run will retrain, which
        it then does not write again; the other order would lose them."""
        self.last_step_at, self.timed_steps, self.step_s, self.wait_s = None, 0, 0.0, 0.0
        if self.steps:
            emas = torch.stack([e for _, e, _ in self.steps]).tolist()  # one device sync per checkpoint
            self.pending += [{"kind": "train", "step": s, "train_ema_loss": e, "lr": lr}
                             for (s, _, lr), e in zip(self.steps, emas, strict=True)]
            self.steps = []
        self.pending.append({"kind": "checkpoint", **checkpoint_row})
        new = [r for r in self.pending if r["kind"] == "event" or int(r["step"]) > self.high_water]
        self.pending = []
        if not new:
            return
        lines = "".join(json.dumps(_finite(r)) + "\n" for r in new)
        if self.file.is_local:
            os.makedirs(os.path.dirname(self.file.path), exist_ok=True)
            with open(self.file.path, "a") as f:
                f.write(lines)
        else:  # object stores cannot append: the whole object again (one write per checkpoint)
            publish_bytes((self.text + lines).encode(), self.file)
        self.text += lines
        self.high_water = max(self.high_water, high_water(new))
        if self.wandb is not None:
            try:
                log_to_wandb(self.wandb, new)
            except Exception as e:  # noqa: BLE001
                _wandb_failed("stopped logging", e)
                self.wandb = None

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                _wandb_failed("could not finish", e)


def _wandb_failed(what: str, error: Exception) -> None:
    first_line = (str(error).strip().splitlines() or [""])[0]
    print(f"⚠️  wandb {what} ({type(error).__name__}: {first_line}); training goes on, and every metric is still "
          f"written to {METRICS_FILE}", flush=True)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or inf: such a value is written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def wandb_mode(cfg: TrainConfig) -> str:
    if cfg.wandb_mode:
        return cfg.wandb_mode
    import wandb

    return "online" if os.environ.get("WANDB_API_KEY") or wandb.api.api_key else "offline"


def open_wandb(cfg: TrainConfig, run_dir: Location, group: str | None, fork_of: dict[str, Any] | None) -> Any:
    """The run's wandb run, created or continued (resume="allow" with the run's own id). Offline files go to
    WANDB_DIR, else the run's local save folder, else the system's temporary folder."""
    import wandb

    directory = os.environ.get("WANDB_DIR") or (os.path.dirname(run_dir.path) if run_dir.is_local
                                                 else tempfile.gettempdir())
    config = {**cfg.to_dict(), "run_dir": run_dir.uri}
    if fork_of:
        config["forked_from"] = {"checkpoint": fork_of.get("base_checkpoint"),
                                 "global_step": fork_of.get("base_global_step")}
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=wandb_run_id(run_dir.uri),
                      name=run_dir.name, resume="allow", group=group, config=config, mode=wandb_mode(cfg),
                      dir=directory, settings=wandb.Settings(
                          silent=True, console="off",
                          # wandb buffers its run file for 15 s: a process killed meanwhile would lose all of it.
                          x_transaction_log_flush_interval=WANDB_FLUSH_INTERVAL_S))


WANDB_KEYS = {"val_loss": "val/loss", "best_val_loss": "val/best_loss", "skipped_steps": "train/skipped_steps",
              "epoch": "epoch"}


def log_to_wandb(run: Any, rows: list[dict[str, Any]]) -> None:
    """One wandb history row per step (the train row and the checkpoint row of a step are merged)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["kind"] == "train":
            by_step.setdefault(row["step"], {}).update({"train/ema_loss": row["train_ema_loss"], "train/lr": row["lr"]})
        elif row["kind"] == "checkpoint":
            by_step.setdefault(row["step"], {}).update({
                WANDB_KEYS.get(k, f"perf/{k}"): v for k, v in _finite(row).items()
                if k not in ("kind", "step", "validated") and v is not None})
    for step in sorted(by_step):
        run.log(by_step[step], step=step)
