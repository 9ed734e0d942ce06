"""raytrain_app: resumable PyTorch training of sequence Transformers on Ray Train.

The commands are the modules at the top (`python -m raytrain_app.main|tune|jobs|ckpt|report|data`, or
`raytrain train|tune|jobs|ckpt|report|data`). Below them the layers, each a subpackage that imports only the
ones under it (checked in `make test`): cli, ray_adapter, observability, checkpoint, core, datasets, storage.
See docs/architecture.md.
"""
