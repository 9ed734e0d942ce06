"""Checkpoints: the only code that knows the file format (state.pt, meta.json, manifest.json, best_model.pt),
the training state's schema and the fork policy (what a run started from another run's checkpoint keeps),
verification and resolution of what a user passed, and the background writer that keeps serialisation off
the training path. It builds on `core`, `datasets` and `storage`, and never imports Ray: the Ray adapter hands
it folders and reports them."""
