"""The Python API: train, evaluate and predict from a script or a notebook, with the commands' config, guarantees
and files, returning what they did instead of printing only. See docs/python-api.md.

    import raytrain_app as rt

    result = rt.train(data="data/demo.pkl", model="my_models.cnn:spec", model_args={"channels": 64}, epochs=5)
    scores = rt.score(result.best_model, data="data/demo.pkl")   # python -m raytrain_app.evaluate
    model = rt.load_model(result.best_model)          # a ready nn.Module, inputs as the data holds them

Every function runs a command with the settings as its flags (train: main, score: evaluate, batch_predict:
predict): `train(lr=3e-4, use_amp=True)` is `python -m raytrain_app.main --lr 0.0003 --use-amp`, the same run
name, the same run folder, and the same call (or command) continues it after any interruption. A mistake raises
the commands' one-line errors (ConfigError, DataError, CheckpointError, UserError, StorageError: all ValueErrors)
before anything starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from raytrain_app.cli.errors import EXIT_DIVERGED
from raytrain_app.core.config import ConfigError, TrainConfig, cli_fields, flag_name


class TrainingFailed(RuntimeError):
    """Training did not finish (workers failed more than --max-failures times, storage failed): calling `train`
    again with the same settings continues from the latest checkpoint."""


class TrainingDiverged(RuntimeError):
    """Training stopped itself after --max-skipped-steps non-finite steps in a row (see `divergence`)."""

    def __init__(self, message: str, divergence: dict[str, int]) -> None:
        super().__init__(message)
        self.divergence = divergence


@dataclass(frozen=True)
class TrainResult:
    """What a training run left: where its checkpoints and best model are, and its last reported metrics."""

    run_name: str
    run_dir: str  # <save-dir>/<run-name>: every checkpoint, metrics.jsonl, the run's record
    best_model: str | None  # best_model.pt (or the checkpoint a fork started from, when none beat it)
    completed: bool  # False: stopped by a signal at a checkpointed step; train again to continue
    epoch: int
    global_step: int
    metrics: dict[str, Any] = field(default_factory=dict)  # best_val_loss, best_val_accuracy, train_ema_loss, ...

    @property
    def best_val_loss(self) -> float | None:
        return self.metrics.get("best_val_loss")

    @property
    def best_val_accuracy(self) -> float | None:
        return self.metrics.get("best_val_accuracy")


def as_argv(settings: dict[str, Any], allowed: set[str]) -> list[str]:
    """Settings as the flags that give them (a ConfigError names a setting the command does not have)."""
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (see docs/cli.md for the settings)")
    argv: list[str] = []
    for name, value in settings.items():
        flag = f"--{flag_name(name)}"
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag_name(name)}")
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def train(config_file: str | None = None, **settings: Any) -> TrainResult:
    """Train (or continue) the run these settings name: the fields of `TrainConfig` (`data`, `model`,
    `model_args`, `epochs`, `lr`, `resume_from_checkpoint`, ...), over a `--config` file's. Connects to the Ray
    cluster in RAY_ADDRESS, or starts a local one. Raises TrainingFailed or TrainingDiverged when training does not
    finish; a signal (Ctrl-C) stops it at a checkpointed step and returns `completed=False`."""
    import raytrain_app.main as command

    argv = as_argv(settings, {f.name for f in cli_fields(TrainConfig)})
    argv += ["--config", config_file] if config_file else []
    try:
        outcome = command.train(argv)
    except SystemExit as e:  # argparse refused a value; it printed why
        raise ConfigError(f"a setting's value was refused (see the message above): {' '.join(argv)}") from e
    plan = outcome.plan
    if outcome.exit_code == EXIT_DIVERGED:
        raise TrainingDiverged(f"training diverged at global steps {outcome.divergence['first_step']}-"
                               f"{outcome.divergence['last_step']}; see the lines above for the command that "
                               "resumes from the last good checkpoint", outcome.divergence)
    if outcome.exit_code != 0 and outcome.stopped_by is None:
        raise TrainingFailed(f"training failed; train again with the same settings to continue from the latest "
                             f"checkpoint in {plan.run_dir}")
    metrics = dict(outcome.metrics)
    return TrainResult(run_name=plan.run_name, run_dir=plan.run_dir.uri, best_model=outcome.best_model,
                       completed=outcome.stopped_by is None, epoch=int(metrics.get("epoch", 0)),
                       global_step=int(metrics.get("global_step", 0)), metrics=metrics)


def score(checkpoint: str, data: str, *, split: str = "test", out: str | None = None, batch_size: int = 256,
             device: str | None = None) -> dict[str, Any]:
    """Score `checkpoint` (anything --resume-from-checkpoint accepts) on a split of `data`, as
    `python -m raytrain_app.evaluate` does; returns the report it writes to `out`/metrics.json: loss, accuracy,
    per-class scores and the confusion matrix for classification; loss (MSE), rmse, mae and r2 for regression."""
    import raytrain_app.evaluate as command
    from raytrain_app.observability.evaluation_report import METRICS_FILE
    from raytrain_app.storage.location import parse_location

    out = out or f"evaluation-{split}"
    argv = ["--checkpoint", checkpoint, "--data", data, "--split", split, "--out", out,
            "--batch-size", str(batch_size), *(["--device", device] if device else [])]
    command.evaluate(command.parser().parse_args(argv))
    return json.loads(parse_location(out, flag="--out").join(METRICS_FILE).read_bytes())


@dataclass(frozen=True)
class PredictResult:
    out: str  # the Parquet folder of predictions
    rows: int
    rejected: int  # rows passed through with an error (a NaN, a wrong length) instead of a prediction


def batch_predict(checkpoint: str, data: str, out: str, *, split: str | None = None, num_replicas: str | None = None,
            batch_size: int = 256, use_gpu: bool = False, overwrite: bool = False) -> PredictResult:
    """Predictions of `checkpoint` over `data` (Parquet files or a dataset pickle) with Ray Data, written
    atomically to `out`, as `python -m raytrain_app.predict` does."""
    import raytrain_app.predict as command
    from raytrain_app.storage.location import parse_location

    argv = ["--checkpoint", checkpoint, "--data", data, "--out", out, "--batch-size", str(batch_size),
            *(["--split", split] if split else []), *(["--num-replicas", num_replicas] if num_replicas else []),
            *(["--use-gpu"] if use_gpu else []), *(["--overwrite"] if overwrite else [])]
    code = command.predict(command.build_parser().parse_args(argv))
    if code != 0:
        raise TrainingFailed(f"prediction failed; nothing was written to {out}")
    where = parse_location(out, flag="--out")
    rows, rejected = command.count_rows(where)
    return PredictResult(out=where.uri, rows=rows, rejected=rejected)


def load_model(where: str, device: str = "cpu") -> Any:
    """The trained model at `where` as a ready `torch.nn.Module` in eval mode: anything
    --resume-from-checkpoint accepts (best_model.pt, a checkpoint or run folder, a URI) or a file of
    `python -m raytrain_app.ckpt export` (.safetensors or .pt). It takes inputs as the data holds them (the
    statistics it standardises them with are in its weights) and returns what the model returns (class
    scores). The model's own module (its --model) must be importable here."""
    from raytrain_app.checkpoint.inference import load_exported_model, load_trained_model

    if where.endswith(".safetensors"):
        return load_exported_model(where).build(device)
    return load_trained_model(where).build(device)


def write_dataset(out: str, train: Any, val: Any = None, test: Any = None, *, target: str | None = None,
                  num_classes: int | None = None, val_fraction: float = 0.1, seed: int = 0) -> str:
    """Write a dataset `--data` reads, from numpy arrays or pandas DataFrames; returns where it is.

    Each split is `(x, y)` arrays (x floats [N, ...]; y integer labels [N] or [N, T] for classification, floats for
    regression) or a DataFrame whose column `target` is y and whose other columns are the features of one row
    (x [N, F]). `out` ending in .pkl is the pickle format; anything else (a folder, an s3:// or gs:// URI) is
    Parquet, where a dataset without `val` gets the validation rows training would hold out (`val_fraction`,
    `seed`). The arrays are checked as `--data` is, before anything is written."""
    import numpy as np

    from raytrain_app.datasets.formats import dataset_from_arrays, write_pickle_atomic
    from raytrain_app.datasets.parquet import write_parquet_dataset

    def arrays(split: Any, name: str) -> dict[str, Any]:
        if hasattr(split, "columns"):  # a pandas DataFrame: one row per sample
            if target is None or target not in split.columns:
                raise ConfigError(f"write_dataset: {name} is a DataFrame: name its target column with target=")
            return {"x": split.drop(columns=[target]).to_numpy(np.float32), "y": split[target].to_numpy()}
        x, y = split
        return {"x": np.asarray(x), "y": np.asarray(y)}

    raw = {name: arrays(split, name) for name, split in (("train", train), ("val", val), ("test", test))
           if split is not None}
    if num_classes is not None:
        raw["num_classes"] = num_classes
    data = dataset_from_arrays(raw, out, val_fraction=val_fraction, seed=seed)  # DataError, nothing written
    if out.endswith(".pkl") and "://" not in out:
        write_pickle_atomic(raw, out)
        return out
    if "val" not in raw:  # the rows training would hold out (the check above held them out), as their own file
        raw["train"] = {"x": data.train.x.numpy(), "y": data.train.y.numpy()}
        raw["val"] = {"x": data.val.x.numpy(), "y": data.val.y.numpy()}
    split = {name: (raw[name]["x"], raw[name]["y"]) for name in ("train", "val", "test") if name in raw}
    given = num_classes if data.task == "classification" and data.num_classes_given else None
    return write_parquet_dataset(out, split["train"], split["val"], given, test=split.get("test")).uri
