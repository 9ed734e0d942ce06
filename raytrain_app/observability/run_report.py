"""A run's report for people: a summary of its metrics.jsonl, and loss.png (with validation accuracy, or RMSE)."""

from __future__ import annotations

import io
import time
from typing import Any

from raytrain_app.core.config import CLASSIFICATION, SCORE_LABELS, TASK_SCORES, as_flags, higher_is_better
from raytrain_app.observability.metrics import scores_in
from raytrain_app.storage.location import Location

PLOT_FILE = "loss.png"
SHOWN_SETTINGS = ("data", "hidden_dim", "num_layers", "num_heads", "epochs", "lr", "batch_size", "grad_accum_steps",
                  "num_workers", "use_amp", "amp_dtype", "compile", "seed")


def summary(run: Location, rows: list[dict[str, Any]]) -> list[str]:
    events = [r for r in rows if r.get("kind") == "event"]
    train = [r for r in rows if r.get("kind") == "train"]
    checkpoints = [r for r in rows if r.get("kind") == "checkpoint"]
    start = next((e for e in events if e.get("event") == "start"), None)
    lines = [f"Run: {run.uri}"]
    if start is not None:
        config = start.get("config") or {}
        lines.append(f"Settings: {as_flags(config, SHOWN_SETTINGS)}")
        fork = start.get("fork_of")
        lines.append(f"Started: {_when(start)} at global step {start['step']}, "
                     + (f"forked from {fork.get('base_checkpoint')} (global step {fork.get('base_global_step')})"
                        if fork else "a new run"))
    last = max((r["step"] for r in train + checkpoints), default=0)
    epoch = checkpoints[-1]["epoch"] if checkpoints else 0
    lines.append(f"Steps: {last} (epoch {epoch} complete{'d' if epoch else ''}), {len(checkpoints)} checkpoints")
    validated = [r for r in checkpoints if r.get("val_loss") is not None]
    if validated:
        best = min(validated, key=lambda r: (r["val_loss"], -r["step"]))
        lines.append(f"Best validation loss: {best['val_loss']:.6f} at global step {best['step']}")
    else:
        lines.append("Best validation loss: none yet")
    score = _first_score(checkpoints)
    scored = [r for r in validated if score is not None and r.get(score) is not None]
    if scored:
        sign = 1 if higher_is_better(score) else -1  # of equal values, the latest step (as for the loss)
        best = max(scored, key=lambda r: (sign * r[score], r["step"]))
        lines.append(f"Best validation {SCORE_LABELS[score]}: {best[score]:.4f} at global step {best['step']}")
    resumes = [e for e in events if e.get("event") == "resume"]
    lines.append(f"Resumes: {len(resumes)}")
    lines += [f"  at global step {e['step']}: {e.get('cause')} ({_when(e)})" for e in resumes]
    speed = next((r for r in reversed(checkpoints) if r.get("samples_per_s")), None)
    if speed is not None:
        mfu = f", MFU {100 * speed['mfu']:.1f}%" if speed.get("mfu") is not None else ""
        lines.append(f"Speed (last checkpoint): {speed['samples_per_s']:.1f} samples/s, "
                     f"{speed['tokens_per_s']:.0f} tokens/s, {1000 * speed['step_time_s']:.1f} ms/step, "
                     f"{100 * speed['data_wait_fraction']:.1f}% waiting for data{mfu}")
    return lines


def _first_score(checkpoints: list[dict[str, Any]]) -> str | None:
    """The task's first score (val_accuracy; val_rmse for regression), from the keys of the checkpoint rows."""
    return next((scores[0] for r in checkpoints if (scores := scores_in(r))), None)


def _when(event: dict[str, Any]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("time", 0)))


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """loss.png: training EMA loss and validation loss against the global step, the task's first score
    (validation accuracy, or RMSE) on a second axis; a dashed line per resume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = sorted((r["step"], r["train_ema_loss"]) for r in rows
                   if r.get("kind") == "train" and r.get("train_ema_loss") is not None)
    val = sorted((r["step"], r["val_loss"]) for r in rows
                 if r.get("kind") == "checkpoint" and r.get("val_loss") is not None)
    score = _first_score([r for r in rows if r.get("kind") == "checkpoint"])
    scored = sorted((r["step"], r[score]) for r in rows
                    if score is not None and r.get("kind") == "checkpoint" and r.get(score) is not None)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train EMA loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", markersize=3)
    if scored:
        right = ax.twinx()
        right.plot(*zip(*scored, strict=True), "s--", color="tab:green", label=f"validation {SCORE_LABELS[score]}",
                   markersize=3)
        right.set_ylabel(SCORE_LABELS[score])
        if score in TASK_SCORES[CLASSIFICATION]:  # a fraction; an error (RMSE) has the targets' scale
            right.set_ylim(0, 1)
        right.legend(loc="upper center")
    for i, event in enumerate(r for r in rows if r.get("kind") == "event" and r.get("event") == "resume"):
        ax.axvline(event["step"], color="grey", linestyle="--", linewidth=1,
                   label="resumed here" if i == 0 else None)
    ax.set_title(title)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()

