"""raytrain_app: resumable PyTorch training on Ray Train, of the built-in sequence Transformer or your own model.

The commands are the modules at the top (`python -m raytrain_app.main|tune|jobs|ckpt|report|data`, or
`raytrain train|tune|jobs|ckpt|report|data`). Below them the layers, each a subpackage that imports only the
ones under it (checked in `make test`): cli, ray_adapter, observability, checkpoint, core, datasets, storage.
See docs/architecture.md.

Your own model is a `ModelSpec` (docs/own-model.md). The names below are imported on first use, so that the
commands do not pay for torch before they need it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelSpec": "raytrain_app.core.model_spec",
    "DataShape": "raytrain_app.core.model_spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raytrain_app' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
