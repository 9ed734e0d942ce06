"""Checks before any worker starts, shared by training (`main.py`) and sweeps (`tune.py`): the data, the
checkpoint training starts from, and whether the model fits it. A mistake costs seconds, not a cluster, and is
reported as one line with exit code 2 before anything is written."""

from __future__ import annotations

import math

from raytrain_app.checkpoint.fit import check_weights_fit, fit_to_checkpoint
from raytrain_app.checkpoint.format import load_state
from raytrain_app.checkpoint.resolve import StateSummary, summarize
from raytrain_app.core.config import ARCH_FIELDS, SCORE_LABELS, TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.datasets.dataset import Dataset
from raytrain_app.datasets.formats import open_dataset
from raytrain_app.datasets.order import batches_per_epoch
from raytrain_app.storage.location import Location


def with_data_shape(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    cfg = cfg.replace(feature_dim=data.feature_dim, seq_len=data.seq_len, num_classes=data.num_classes,
                      per_step=data.per_step, input_shape=list(data.input_shape), task=data.task)
    cfg.check_select_metric()
    return cfg


# A model whose weights take up to this much is checked on the CPU, on zeros (a forward pass of two samples takes
# milliseconds); a larger one on the meta device (no memory; the first meta operation of a process costs about
# 1.5 s of CPU in PyTorch's imports).
CPU_CHECK_BYTES = 256 * 1024 * 1024


def check_model(cfg: TrainConfig, given: set[str]) -> None:
    """The model the run will train (its spec imported and built) takes the data's inputs and gives the outputs its
    task needs, before any worker starts; else one line, exit 2. Built on the meta device (shapes only), then run
    on two samples of zeros: on the CPU when its weights are small, else on the meta device."""
    import torch

    from raytrain_app.core.model_spec import SpecError, build_model, data_shape, load_spec, on_meta_device, without_init
    from raytrain_app.core.tasks import describe_outputs, output_shape

    spec = load_spec(cfg.model)
    shape = data_shape(cfg)
    if spec.task != shape.task:
        targets = "integer labels" if shape.task == "classification" else "float targets"
        raise SpecError(f"--model {cfg.model} is a {spec.task} model, but --data has {targets} ({shape.task}): "
                        "train it on data of its task, or pick a model of this one")
    with on_meta_device():
        model = build_model(cfg, spec)
    tensors = [*model.parameters(), *model.buffers()]
    device = "cpu" if sum(t.numel() * t.element_size() for t in tensors) <= CPU_CHECK_BYTES else "meta"
    if device == "cpu":  # zeros, not the model's initialisation: only the shapes are checked
        with without_init("cpu"):
            model = build_model(cfg, spec)
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.zero_()
    x = torch.zeros(2, *shape.input_shape, device=device)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except NotImplementedError:
        out = None  # an operation with no meta kernel: the workers' first step will tell
    except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises is named in the one line
        raise SpecError(f"--model {cfg.model} rejects inputs of shape {list(x.shape)} from --data: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    expected = output_shape(shape.task, 2, shape.input_shape, shape.per_step, shape.num_classes)
    if out is not None and (not isinstance(out, torch.Tensor) or list(out.shape) != expected):
        found = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"--model {cfg.model} returns {found} for inputs {list(x.shape)}; a {spec.task} model must "
                        f"return {expected} ({describe_outputs(shape.task, shape.per_step, shape.num_classes)})")
    _check_model_flags(cfg, given)


def _check_model_flags(cfg: TrainConfig, given: set[str]) -> None:
    from raytrain_app.core.model_spec import BUILTIN, SpecError

    if cfg.model != BUILTIN:
        builtin_flags = sorted(f"--{name.replace('_', '-')}" for name in ARCH_FIELDS if name in given)
        if builtin_flags:
            raise SpecError(f"{', '.join(builtin_flags)}: settings of the built-in transformer, not of --model "
                            f"{cfg.model}; give your model's settings with --model-args")
    elif cfg.model_args:
        raise SpecError("--model-args: the built-in transformer takes --hidden-dim, --num-layers and --num-heads")


def print_resume_summary(summary: StateSummary, uses_scaler: bool, reset_optimizer: bool = False) -> None:
    """`reset_optimizer`: --reset-optimizer applies (a new run forked from this checkpoint)."""
    print(f"📂 Loading checkpoint from: {summary.path}")
    print("  ✅ Loaded model weights")
    if reset_optimizer:
        print("  🔄 Optimizer state reset (--reset-optimizer)")
    else:
        print("  ✅ Loaded optimizer state" if summary.has_optimizer else "  ⚠️  No optimizer state: starting it fresh")
    if summary.has_scaler and not reset_optimizer:
        print("  ✅ Loaded gradient scaler state")
    elif uses_scaler:
        print("  ⚠️  No gradient scaler state: starting it fresh")
    print(f"  ✅ Resuming from epoch {summary.epoch}")
    print(f"  ✅ Resuming from global step {summary.global_step}")
    if summary.best_val_loss is not None and math.isfinite(summary.best_val_loss):
        print(f"  ✅ Best val loss: {summary.best_val_loss:.6f}")
    for name, value in summary.best_scores.items():  # val_accuracy; val_rmse, val_mae
        print(f"  ✅ Best val {SCORE_LABELS[name]}: {value:.4f}")
    if summary.train_ema_loss is not None:
        print(f"  ✅ Train EMA loss: {summary.train_ema_loss:.6f}")
    print("\n  🎯 Checkpoint loaded successfully!\n")


def start_position(summary: StateSummary | None) -> tuple[int, int]:
    """(completed epochs, batch index within the next epoch) training will start from."""
    if summary is None:
        return 0, 0
    position = summary.data_position or {}
    in_epoch = int(position.get("batch_index", 0)) if int(position.get("epoch", -1)) == summary.epoch else 0
    return summary.epoch, in_epoch


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, Dataset]:
    """Open and validate the dataset in the driver; the config gets its shapes and canonical location."""
    data = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    cfg = with_data_shape(cfg.replace(data=data.uri), data)
    if batches_per_epoch(data.train.num_rows, cfg.batch_size, cfg.num_workers) == 0:
        raise UserError(
            f"--batch-size {cfg.batch_size} with --num-workers {cfg.num_workers} needs at least "
            f"{cfg.batch_size * cfg.num_workers} training sequences; {cfg.data} has {data.train.num_rows}. "
            "Lower --batch-size."
        )
    return cfg, data


def prepare_start(cfg: TrainConfig, given: set[str], source: Location, data: Dataset,
                  label: str | None = None) -> tuple[TrainConfig, StateSummary]:
    """Read the checkpoint training starts from and fit the config to it (architecture), or raise UserError.
    `label` names the checkpoint in messages when `source` is a local copy of it."""
    summary = summarize(source, label)
    if summary.from_meta:
        # Summarised from meta.json: its state.pt was never read here. A file whose manifest matches can still
        # fail to load (written damaged, or holding pickled code): refused now, not on the workers. Local files
        # are memory-mapped (no tensor is read); a remote one is downloaded once more.
        load_state(source, mmap=True)
    cfg = fit_to_checkpoint(cfg, given, summary, num_classes_given=data.num_classes_given)
    check_weights_fit(cfg, summary)
    check_model(cfg, given)
    return cfg, summary

