"""What `python -m raytrain_app.evaluate` writes for people and tools: the numbers as JSON, a table on the
console, and the confusion matrix as a PNG."""

from __future__ import annotations

import io
import json
from typing import Any

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion.png"


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
