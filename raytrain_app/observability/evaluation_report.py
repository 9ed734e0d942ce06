"""What `python -m raytrain_app.evaluate` writes for people and tools: the numbers as JSON, a table on the
console, and a PNG: the confusion matrix of a classifier, or a regression model's predicted against true values.
Each PNG carries what it plots as JSON in its `Description` text, so what it shows can be checked without eyes."""

from __future__ import annotations

import io
import json
from typing import Any

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion.png"
REGRESSION_FILE = "regression.png"
# At most this many points in the regression plot (and its metadata): evenly spaced through the split beyond it,
# so the file stays small whatever the split's size.
MAX_PLOT_POINTS = 5000


def table(report: dict[str, Any]) -> list[str]:
    lines = [f"  {'class':>5}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"]
    for row in report["classes"]:
        lines.append(f"  {row['class']:>5}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}  "
                     f"{row['support']:>8d}")
    macro = report["macro"]
    lines.append(f"  {'macro':>5}  {macro['precision']:>9.4f}  {macro['recall']:>9.4f}  {macro['f1']:>9.4f}  "
                 f"{report['count']:>8d}")
    return lines


def metrics_json(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=2) + "\n").encode()


def confusion_png(confusion: list[list[int]], title: str) -> bytes:
    """The matrix (rows: true class, columns: predicted), counts written in the cells up to 30 classes; the
    matrix itself in the PNG's text chunk, so what it shows can be checked without eyes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(confusion)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)), dpi=100)
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax)
    if n <= 30:
        top = max((max(row) for row in confusion), default=0)
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if count > top / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    out = io.BytesIO()
    fig.savefig(out, format="png", bbox_inches="tight", metadata={"Title": title,
                                                                  "Description": json.dumps(confusion)})
    plt.close(fig)
    return out.getvalue()


def plotted_points(count: int) -> list[int]:
    """The indices of the (true, predicted) pairs the regression plot shows: all, or MAX_PLOT_POINTS evenly
    spaced from the first to the last."""
    if count <= MAX_PLOT_POINTS:
        return list(range(count))
    return [i * (count - 1) // (MAX_PLOT_POINTS - 1) for i in range(MAX_PLOT_POINTS)]


def regression_png(truth: list[float], predicted: list[float], title: str) -> bytes:
    """Predicted against true values as a scatter, with the line y = x (a perfect model's points lie on it); the
    points themselves in the PNG's text chunk as {"true": [...], "predicted": [...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=100)
    ax.scatter(truth, predicted, s=6, alpha=0.5, linewidths=0)
    values = truth + predicted
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper left")
    ax.set_title(title)
    out = io.BytesIO()
    points = json.dumps({"true": truth, "predicted": predicted})
    fig.savefig(out, format="png", bbox_inches="tight", metadata={"Title": title, "Description": points})
    plt.close(fig)
    return out.getvalue()
