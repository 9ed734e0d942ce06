"""A run's metrics: `metrics.jsonl` in the run folder (local or a URI) and, with --use-wandb, a wandb run.

Rank 0 records every optimizer step's training metrics and writes them, with the checkpoint's validation and
speed figures, when a checkpoint is saved (just before it is reported to Ray). The file is the history of the
weights the run has now: an attempt that continues from step N first drops the rows after N (written by an
attempt whose later checkpoints were lost) and writes those steps again as it retrains them. wandb cannot take a
step twice: it gets only steps after the last one any attempt may have given it, so a retrained stretch keeps the
values first logged there, and a process killed within wandb's flush interval (1 s) leaves a gap in wandb, never
a duplicate. The wandb run id is chosen at the run's first start and kept in its checkpoints and its start event,
so every attempt of a run continues the same wandb run, and a new run in a reused folder gets a new one.

metrics.jsonl rows (one JSON object per line):
  {"kind": "event", "event": "start" | "resume" | "diverged", "step", "cause", "attempt", "time", ...}
  {"kind": "train", "step", "train_ema_loss", "lr"}          every optimizer step (rank 0's EMA loss)
  {"kind": "checkpoint", "step", "epoch", "val_loss", "val_accuracy", "best_val_loss", "best_val_accuracy",
   "train_ema_loss" (mean over ranks),
   "validated", "skipped_steps", "samples_per_s", "tokens_per_s", "step_time_s", "data_wait_fraction", "mfu",
   "peak_gpu_mem_gb"}
  A regression run's checkpoint rows hold "val_rmse", "val_mae", "best_val_rmse" and "best_val_mae" instead of
  the accuracies; a value not measured (no validation yet) is null.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import tempfile
import time
from typing import Any

import torch

from raytrain_app.core.config import ALL_SCORES, TrainConfig
from raytrain_app.core.model import transformer_flops_per_token
from raytrain_app.core.model_spec import count_flops
from raytrain_app.core.trainer import unvalidated
from raytrain_app.storage.location import Location
from raytrain_app.storage.publish import publish_bytes

log = logging.getLogger(__name__)



def scores_in(keys: Any, prefix: str = "") -> tuple[str, ...]:
    """The task's scores a metrics dict, progress message or metrics.jsonl row holds (as `prefix` + name):
    val_accuracy for classification, val_rmse and val_mae for regression."""
    return tuple(name for name in ALL_SCORES if f"{prefix}{name}" in keys)


def measured(name: str, value: float | None) -> bool:
    """Whether a reported score (or best score) is a real one, not the stand-in for "not validated"."""
    return value is not None and math.isfinite(value) and value != unvalidated(name)

METRICS_FILE = "metrics.jsonl"
WANDB_FLUSH_INTERVAL_S = 1.0
DATA_ROW_KINDS = ("train", "checkpoint")


# Dense bf16/fp16 tensor-core peak per GPU (vendor datasheets), by a part of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
              "L4": 121e12, "A10G": 125e12}


def new_wandb_run_id() -> str:
    return secrets.token_hex(8)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for the MFU estimate; None where it is not known (CPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The longest known part of the name wins: an "NVIDIA L40" is not an L4."""
    parts = sorted((part for part in PEAK_FLOPS if part in device_name), key=len, reverse=True)
    return PEAK_FLOPS[parts[0]] if parts else None


def flops_per_token(cfg: TrainConfig, num_params: int) -> float:
    """The built-in Transformer's training FLOPs per token (`core.model.transformer_flops_per_token`)."""
    return transformer_flops_per_token(num_params, cfg.num_layers, cfg.hidden_dim, cfg.seq_len)


def read_rows(location: Location) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a line cut off by a kill is skipped)."""
    return parse_rows(location.read_bytes().decode(errors="replace")) if location.is_file() else []


def parse_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _lines(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(_finite(r)) + "\n" for r in rows)


def high_water(rows: list[dict[str, Any]]) -> int:
    """The last step the rows hold data of (-1: none)."""
    return max((int(r["step"]) for r in rows if r.get("kind") in DATA_ROW_KINDS), default=-1)


class RunMetrics:
    """Rank 0's recorder.

    `start_step`: the step training continues from; `restored_step`: the step restored from the run's own
    checkpoint (None when the run starts from its beginning, a fork's base included); `attempt`: the driver's id,
    which tells a worker restart (same driver) from a re-run; `fork_of`: a fork's lineage; `wandb_run_id`: the id
    kept in the restored checkpoint.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Location, *, start_step: int, restored_step: int | None,
                 attempt: str, fork_of: dict[str, Any] | None, num_params: int, device: torch.device,
                 wandb_group: str | None = None, wandb_run_id: str | None = None) -> None:
        self.cfg, self.device = cfg, device
        self.file = run_dir.join(METRICS_FILE)
        raw = self.file.read_bytes().decode(errors="replace") if self.file.is_file() else ""
        rows = parse_rows(raw)
        events = [r for r in rows if r.get("kind") == "event"]
        # wandb may hold any step an earlier attempt wrote to the file, even one dropped below.
        self.wandb_high_water = max([high_water(rows)] + [int(e.get("wandb_through", -1)) for e in events])
        kept = [r for r in rows if r.get("kind") == "event" or int(r["step"]) <= start_step]
        self.text = _lines(kept)  # what the file holds once rewritten
        self.rewrite = self.text != raw  # rows dropped, or a line cut off by a kill
        self.high_water = start_step
        self.wandb_run_id = (wandb_run_id or next((e["wandb_run_id"] for e in reversed(events)
                                                   if e.get("wandb_run_id")), None) or new_wandb_run_id())
        now = time.time()
        if not events:
            event = {"event": "start", "step": start_step, "cause": "fork" if fork_of else "new run",
                     "fork_of": fork_of, "config": cfg.to_dict()}
        else:
            same_driver = any(e.get("attempt") == attempt for e in events)
            cause = ("worker restart (a worker or node was lost)" if same_driver
                     else "re-run (a new driver: the same command again, or a resubmitted job)")
            if restored_step is None:
                cause += "; no checkpoint had been saved, so from the run's start"
            event = {"event": "resume", "step": start_step, "cause": cause}
        self.steps: list[tuple[int, torch.Tensor, float]] = []  # (step, EMA loss on the device, lr)
        self.flops_per_sample = count_flops(cfg)  # None: the model's spec does not count them, no MFU
        self.peak = peak_flops(device)
        # Time between consecutive optimizer steps, since the last checkpoint; the interval that holds a
        # validation and a checkpoint is left out, so the figures are the training loop's own speed.
        self.last_step_at: tuple[float, float] | None = None  # (time, data wait so far) at the previous step
        self.timed_steps, self.step_s, self.wait_s = 0, 0.0, 0.0
        self.first_step_time: float | None = None
        self.first_step_written = False
        # Written now, so that an attempt that dies before its first checkpoint is on record too.
        self._write([{"kind": "event", **event, "attempt": attempt, "time": now, "wandb_run_id": self.wandb_run_id,
                      "wandb_through": self.wandb_high_water}])
        self.wandb = None
        if cfg.use_wandb:
            try:
                self.wandb = open_wandb(cfg, run_dir, self.wandb_run_id, wandb_group, fork_of)
            except Exception as e:  # noqa: BLE001 - logging must not cost the training run
                _wandb_failed("could not start", e)

    def on_step(self, step: int, ema: torch.Tensor, lr: float, data_wait_s: float = 0.0) -> None:
        """After optimizer step `step`; `data_wait_s`: the loop's total time waiting for data so far."""
        self.steps.append((step, ema.detach().clone(), lr))  # no host sync: read at the next checkpoint
        if self.first_step_time is None:  # this attempt's first step (benchmarks/recovery.py times restarts)
            self.first_step_time = time.time()
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
        if self.peak and self.flops_per_sample:
            out["mfu"] = samples_per_s / world_size * self.flops_per_sample / self.peak
        if self.device.type == "cuda":
            out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out

    def commit(self, checkpoint_row: dict[str, Any] | None, events: list[dict[str, Any]] = ()) -> None:
        """Write the steps since the last commit, this checkpoint's row and `events`: the file first, then wandb.
        Called before the checkpoint is reported: a process killed in between has written steps its re-run
        trains again (and then writes again); the other order would lose them."""
        self.last_step_at, self.timed_steps, self.step_s, self.wait_s = None, 0, 0.0, 0.0
        rows: list[dict[str, Any]] = []
        if self.steps:
            emas = torch.stack([e for _, e, _ in self.steps]).tolist()  # one device sync per checkpoint
            rows += [{"kind": "train", "step": s, "train_ema_loss": e, "lr": lr}
                     for (s, _, lr), e in zip(self.steps, emas, strict=True)]
            self.steps = []
        if checkpoint_row is not None:
            rows.append({"kind": "checkpoint", **checkpoint_row})
            if self.first_step_time is not None and not self.first_step_written:
                rows[-1]["first_step_time"] = self.first_step_time  # the attempt's first checkpoint says when
                self.first_step_written = True
        rows = [r for r in rows if int(r["step"]) > self.high_water]  # a preemption save right after a checkpoint
        self._write(rows + [{"kind": "event", "time": time.time(), **e} for e in events])
        self.high_water = max(self.high_water, high_water(rows))
        for_wandb = [r for r in rows if int(r["step"]) > self.wandb_high_water]
        self.wandb_high_water = max(self.wandb_high_water, high_water(for_wandb))
        if self.wandb is not None and for_wandb:
            try:
                log_to_wandb(self.wandb, for_wandb)
            except Exception as e:  # noqa: BLE001 - logging must not cost the training run
                _wandb_failed("stopped logging", e)
                self.wandb = None

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows and not self.rewrite:
            return
        lines = _lines(rows)
        if self.file.is_local and not self.rewrite:
            os.makedirs(os.path.dirname(self.file.path), exist_ok=True)
            with open(self.file.path, "a") as f:
                f.write(lines)
        else:  # object stores cannot append: the whole object again (one write per checkpoint)
            publish_bytes((self.text + lines).encode(), self.file)
            self.rewrite = False
        self.text += lines

    def close(self, failed: bool = False) -> None:
        if self.wandb is not None:
            import wandb

            try:
                self.wandb.finish(exit_code=1 if failed else 0)
                # finish() returns before wandb's service has written the run's last records, and Ray ends a
                # worker's process without running atexit hooks (where wandb waits for it): wait here.
                wandb.teardown(exit_code=1 if failed else 0)
            except Exception as e:  # noqa: BLE001 - nor may finishing it
                _wandb_failed("could not finish", e)


def _wandb_failed(what: str, error: Exception) -> None:
    first_line = (str(error).strip().splitlines() or [""])[0]
    log.info(f"⚠️  wandb {what} ({type(error).__name__}: {first_line}); training goes on, and every metric is "
             f"still written to {METRICS_FILE}")


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or inf: such a value is written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


WANDB_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                      "disabled": "disabled"}


def prepare_wandb(cfg: TrainConfig, where: Location) -> TrainConfig:
    """On the driver, before Ray starts: the wandb mode every worker uses (--wandb-mode, else WANDB_MODE, else
    online when an API key is configured here, else offline). The key from this machine's `wandb login`, which
    remote workers do not have, is put in WANDB_API_KEY, which the driver passes on to them with every WANDB_*
    variable. `where`: the run's or the sweep's folder."""
    if not cfg.use_wandb:
        return cfg
    key = os.environ.get("WANDB_API_KEY") or _netrc_api_key()
    mode = cfg.wandb_mode or WANDB_MODE_ALIASES.get(os.environ.get("WANDB_MODE", "")) or (
        "online" if key else "offline")
    if mode == "online" and key:
        os.environ["WANDB_API_KEY"] = key
    if mode == "offline" and not where.is_local and not os.environ.get("WANDB_DIR"):
        log.info(f"⚠️  wandb is offline and the run is on {where.uri.split('://')[0]}://: its offline files go to "
                 f"the temporary folder of rank 0's machine. Set WANDB_DIR to a folder that lasts to keep them.")
    return cfg.replace(wandb_mode=mode)


def _netrc_api_key() -> str | None:
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        return wbnetrc.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    except Exception:  # noqa: BLE001 - wandb's private helper, absent or different in other versions: no key
        return None


def offline_dir(run_dir: Location) -> str:
    """Where offline run files go: WANDB_DIR, else the folder holding the run (local runs), else the system's
    temporary folder (the driver warns about that one)."""
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    return os.path.dirname(run_dir.path) if run_dir.is_local else tempfile.gettempdir()


def open_wandb(cfg: TrainConfig, run_dir: Location, run_id: str, group: str | None,
               fork_of: dict[str, Any] | None) -> Any:
    """The run's wandb run, created or continued (resume="allow" with the run's own id)."""
    import wandb

    config = {**cfg.to_dict(), "run_dir": run_dir.uri}
    if fork_of:
        config["forked_from"] = {"checkpoint": fork_of.get("base_checkpoint"),
                                 "global_step": fork_of.get("base_global_step")}
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=run_id, name=run_dir.name,
                      resume="allow", group=group, config=config, mode=cfg.wandb_mode or "offline",
                      dir=offline_dir(run_dir), settings=wandb.Settings(
                          silent=True, console="off",
                          # wandb buffers its run file for 15 s: a process killed meanwhile would lose all of it.
                          x_transaction_log_flush_interval=WANDB_FLUSH_INTERVAL_S))


WANDB_KEYS = {"val_loss": "val/loss", "best_val_loss": "val/best_loss", "val_accuracy": "val/accuracy",
              "best_val_accuracy": "val/best_accuracy", "val_rmse": "val/rmse", "best_val_rmse": "val/best_rmse",
              "val_mae": "val/mae", "best_val_mae": "val/best_mae", "skipped_steps": "train/skipped_steps",
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

