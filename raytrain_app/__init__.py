"""raytrain_app: resumable PyTorch training on Ray Train, of the built-in sequence Transformer or your own model.

The commands are the modules at the top (`python -m raytrain_app.main|tune|jobs|ckpt|report|data`, or
`raytrain train|tune|jobs|ckpt|report|data`). Below them the layers, each a subpackage that imports only the
ones under it (checked in `make test`): cli, ray_adapter, observability, checkpoint, core, datasets, storage.
See docs/architecture.md.

Your own model is a `ModelSpec` (docs/own-model.md); `train`, `score`, `batch_predict` and `load_model` are the
Python API (docs/python-api.md). The names below are imported on first use, so that the commands do not pay for
torch and Ray before they need them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelSpec": "raytrain_app.core.model_spec",
    "DataShape": "raytrain_app.core.model_spec",
    "TrainConfig": "raytrain_app.core.config",
    "train": "raytrain_app.api",
    "score": "raytrain_app.api",
    "batch_predict": "raytrain_app.api",
    "load_model": "raytrain_app.api",
    "write_dataset": "raytrain_app.api",
    "TrainResult": "raytrain_app.api",
    "PredictResult": "raytrain_app.api",
    "TrainingFailed": "raytrain_app.api",
    "TrainingDiverged": "raytrain_app.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raytrain_app' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
