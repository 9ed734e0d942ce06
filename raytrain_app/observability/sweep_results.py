"""What a sweep produced, for people: a table on stdout, `results.csv` and `sweep.png` in the sweep directory."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from raytrain_app.checkpoint.format import BEST_MODEL_FILE
from raytrain_app.core.config import CLASSIFICATION, SCORE_LABELS, TASK_SCORES, higher_is_better
from raytrain_app.storage.location import Location


def trial_dir_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_id_of(trial_dir: str) -> str:
    """The trial id of a trial folder (its path or name)."""
    return trial_dir.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial-")


RESULTS_FILE = "results.csv"
PLOT_FILE = "sweep.png"
CSV_COLUMNS = ("lr", "best_val_loss", "final_val_loss", "steps_trained", "status", "trial_id", "best_checkpoint")
# Then, for each of the task's scores: best_val_accuracy, final_val_accuracy; or best_val_rmse, final_val_rmse, ...
LABELS = {metric: f"validation {label}" for metric, label in SCORE_LABELS.items()}
COLUMN_TITLES = {"val_accuracy": "best val acc", "val_rmse": "best val RMSE", "val_mae": "best val MAE"}


def worst(metric: str) -> float:
    """A trial's value of `metric` when it has none: last in any ranking by it."""
    return -math.inf if higher_is_better(metric) else math.inf


@dataclass
class TrialResult:
    trial_id: str
    lr: float
    status: str  # finished | stopped early | diverged | unfinished | error | not run
    best_val_loss: float = math.inf
    final_val_loss: float = math.inf
    steps_trained: int = 0
    best_checkpoint: str = ""  # the trial's best_model.pt, empty when it has none
    curve: list[tuple[int, float]] = field(default_factory=list)  # (steps trained, validation loss)
    scores: tuple[str, ...] = TASK_SCORES[CLASSIFICATION]  # the task's: val_accuracy; val_rmse, val_mae
    # Of validations with a finite loss, by score; a score never measured is absent (see `best`).
    best_scores: dict[str, float] = field(default_factory=dict)
    final_scores: dict[str, float] = field(default_factory=dict)
    score_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (steps trained, value)

    def best(self, metric: str) -> float:
        return self.best_val_loss if metric == "val_loss" else self.best_scores.get(metric, worst(metric))

    def final(self, metric: str) -> float:
        return self.final_val_loss if metric == "val_loss" else self.final_scores.get(metric, worst(metric))

    def curve_of(self, metric: str) -> list[tuple[int, float]]:
        return self.curve if metric == "val_loss" else self.score_curves.get(metric, [])


def _last_per_step(frame: Any, metrics: dict[str, Any], key: str) -> dict[int, float]:
    """(steps trained -> the trial's reported `key`); a resumed trial repeats the validations after its last
    checkpoint: the last value per step wins."""
    curve: dict[int, float] = {}
    if frame is not None and {"steps_trained", key} <= set(frame.columns):
        for steps, value in zip(frame["steps_trained"], frame[key], strict=True):
            if not math.isnan(steps) and not math.isnan(value):
                curve[int(steps)] = float(value)
    if "steps_trained" in metrics and key in metrics:
        curve[int(metrics["steps_trained"])] = float(metrics[key])
    return curve


def collect(results: Any, *, sweep_dir: Location, epochs: int, ended_by_tune: set[str],
            scores: tuple[str, ...] = TASK_SCORES[CLASSIFICATION]) -> list[TrialResult]:
    """Turn Tune's ResultGrid into one TrialResult per trial, ordered by learning rate; `scores`: the task's
    (TrainConfig.scores).

    A trial is "finished" when it reached --epochs, "error" when it failed, "not run" when it never reported.
    One that did not reach --epochs is "stopped early" when Tune ended it (`ended_by_tune`: only the scheduler
    does that), "diverged" when it stopped itself after --max-skipped-steps non-finite steps in a row, else
    "unfinished" (the sweep was interrupted)."""
    rows = []
    for result in results:
        trial_id = trial_id_of(result.path)
        metrics = result.metrics or {}
        row = TrialResult(trial_id=trial_id, lr=float(result.config["lr"]), status="not run", scores=scores)
        frame = result.metrics_dataframe
        row.curve = sorted(_last_per_step(frame, metrics, "val_loss").items())
        for name in scores:  # validations only (an unmeasured score is reported as infinite, see tune_metrics)
            curve = sorted((s, v) for s, v in _last_per_step(frame, metrics, name).items() if math.isfinite(v))
            if curve:
                row.score_curves[name] = curve
        if row.curve:
            row.steps_trained = row.curve[-1][0]
            row.final_val_loss = row.curve[-1][1]
            row.best_val_loss = float(metrics.get("best_val_loss", min(loss for _, loss in row.curve)))
            for name, curve in row.score_curves.items():
                row.final_scores[name] = curve[-1][1]
                best_of_curve = (max if higher_is_better(name) else min)(v for _, v in curve)
                row.best_scores[name] = float(metrics.get(f"best_{name}", best_of_curve))
            if int(metrics.get("epoch", 0)) >= epochs:
                row.status = "finished"
            elif metrics.get("diverged"):
                row.status = "diverged"
            else:
                row.status = "stopped early" if trial_id in ended_by_tune else "unfinished"
        if result.error is not None:
            row.status = "error"
        best_model = sweep_dir.join(trial_dir_name(trial_id), BEST_MODEL_FILE)
        if row.curve and best_model.is_file():
            row.best_checkpoint = best_model.uri
        rows.append(row)
    return sorted(rows, key=lambda r: r.lr)


def best_trial(rows: list[TrialResult], metric: str = "val_loss") -> TrialResult | None:
    """The trial with the best `metric` (--select-metric: the lowest loss or error, the highest accuracy) that
    has a best_model.pt; of equal ones, the first (the lowest learning rate)."""
    candidates = [r for r in rows if math.isfinite(r.best(metric)) and r.best_checkpoint]
    if not candidates:
        return None
    return (max if higher_is_better(metric) else min)(candidates, key=lambda r: r.best(metric))


def table(rows: list[TrialResult], metric: str = "val_loss") -> str:
    """The trials, the best (by `metric`) marked with a *; beside the loss, the task's first score."""
    best = best_trial(rows, metric)
    score = rows[0].scores[0] if rows else TASK_SCORES[CLASSIFICATION][0]
    title = COLUMN_TITLES[score]
    width = max(12, len(title))
    lines = [f"  {'':1} {'lr':>9}  {'best val loss':>13}  {title:>{width}}  {'steps':>6}  {'status':<13}  "
             "best checkpoint"]
    for r in rows:
        mark = "*" if r is best else " "
        value = f"{r.best(score):.4f}" if math.isfinite(r.best(score)) else "-"
        lines.append(f"  {mark} {r.lr:>9.3g}  {r.best_val_loss:>13.6f}  {value:>{width}}  {r.steps_trained:>6d}  "
                     f"{r.status:<13}  {r.best_checkpoint or '-'}")
    return "\n".join(lines)


def csv_bytes(rows: list[TrialResult]) -> bytes:
    scores = rows[0].scores if rows else TASK_SCORES[CLASSIFICATION]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*CSV_COLUMNS, *(f"{kind}_{name}" for name in scores for kind in ("best", "final"))])
    for r in rows:
        writer.writerow([repr(r.lr), repr(r.best_val_loss), repr(r.final_val_loss), r.steps_trained, r.status,
                         r.trial_id, r.best_checkpoint,
                         *(repr(value(name)) for name in scores for value in (r.best, r.final))])
    return out.getvalue().encode()


def plot_png(rows: list[TrialResult], title: str, base_value: float | None = None, metric: str = "val_loss") -> bytes:
    """Left: each trial's best `metric` (--select-metric) against learning rate (log scale). Right: each trial's
    validation curve of it. `base_value`, the base checkpoint's, is drawn on both for reference."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    label = LABELS[metric]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    best = best_trial(rows, metric)
    shown = [r for r in rows if math.isfinite(r.best(metric))]
    for status, marker in (("finished", "o"), ("stopped early", "x"), ("error", "s")):
        points = [r for r in shown if r.status == status]
        if points:
            left.scatter([r.lr for r in points], [r.best(metric) for r in points], marker=marker, label=status)
    if best is not None:
        left.scatter([best.lr], [best.best(metric)], s=160, facecolors="none", edgecolors="red", label="best")
    has_base = base_value is not None and math.isfinite(base_value)
    if has_base:
        left.axhline(base_value, color="grey", linestyle="--", label="base checkpoint")
    left.set_xscale("log")
    left.set_xlabel("learning rate")
    left.set_ylabel(f"best {label}")
    left.legend()
    for r in rows:
        points = [(s, v) for s, v in r.curve_of(metric) if math.isfinite(v)]
        if points:
            right.plot([s for s, _ in points], [v for _, v in points], marker=".",
                       label=f"lr {r.lr:.3g}" + (" (stopped)" if r.status == "stopped early" else ""))
    if has_base:
        right.scatter([0], [base_value], marker="*", s=120, color="black", label="base checkpoint", zorder=3)
    right.set_xlabel("optimizer steps since the base checkpoint")
    right.set_ylabel(label)
    right.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    out = io.BytesIO()
    # The trials, machine-readable, in the PNG's text chunk: what the plot shows can be checked without eyes.
    trials = "; ".join(f"lr={r.lr!r} status={r.status} best_val_loss={r.best_val_loss!r} "
                       + " ".join(f"best_{name}={r.best(name)!r}" for name in r.scores) for r in rows)
    fig.savefig(out, format="png", dpi=100, metadata={"Title": title, "Description": trials,
                                                      "Comment": f"plotted: {metric}"})
    plt.close(fig)
    return out.getvalue()


def write(rows: list[TrialResult], sweep_dir: Location, title: str, base_value: float | None = None,
          metric: str = "val_loss") -> tuple[Location, Location]:
    csv_file, png_file = sweep_dir.join(RESULTS_FILE), sweep_dir.join(PLOT_FILE)
    csv_file.write_bytes(csv_bytes(rows))
    png_file.write_bytes(plot_png(rows, title, base_value, metric))
    return csv_file, png_file
