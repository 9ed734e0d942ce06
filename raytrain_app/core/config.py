"""The one training configuration: CLI, config files, checkpoints, Tune and jobs all use `TrainConfig`.

Precedence, written down once: command-line flags > `--config FILE` (YAML or TOML) > field defaults.
The CLI is generated from the dataclass fields, so a new field is a new flag with its docstring as help.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A mistake in the user's configuration; the message names the flag and what to do."""


def _opt(default: Any, help: str, *, cli: bool = True, identity: bool = True, **extra: Any) -> Any:
    """A dataclass field with its CLI help.

    `identity=False` marks operational settings that do not change what is trained (where checkpoints go,
    how many retries): they are left out of the default run name, so changing them continues the same run.
    `cli=False` marks fields filled from the data or the checkpoint, never from a flag.
    `added_later=True` marks settings added after the first release (see `TrainConfig.identity_hash`).
    """
    return field(default=default, metadata={"help": help, "cli": cli, "identity": identity, **extra})


# Fields that define the built-in network's shapes (its settings, flags of their own): a checkpoint can only be
# loaded into the same values.
ARCH_FIELDS = ("hidden_dim", "num_layers", "num_heads")
BUILTIN_MODEL = "transformer"  # --model's default (raytrain_app.core.model_spec)

# What the targets are (from the data): integer labels, or float values.
CLASSIFICATION, REGRESSION = "classification", "regression"
# The validation scores reported beside the loss, by task, and the direction of every metric a best model can be
# chosen by: the one place that says whether higher is better (checkpoints kept, best_model.pt, a run folder's
# best checkpoint, a sweep's ranking and early stopping).
TASK_SCORES = {CLASSIFICATION: ("val_accuracy",), REGRESSION: ("val_rmse", "val_mae")}
ALL_SCORES = tuple(name for scores in TASK_SCORES.values() for name in scores)
HIGHER_IS_BETTER = {"val_loss": False, "val_accuracy": True, "val_rmse": False, "val_mae": False}
SCORE_LABELS = {"val_loss": "loss", "val_accuracy": "accuracy", "val_rmse": "RMSE", "val_mae": "MAE"}


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER[metric]


@dataclass(kw_only=True)
class TrainConfig:
    # --- data (section "data") ---
    data: str = _opt(
        "data/demo.pkl",
        "Dataset: a pickled dict {'train': {'x', 'y'}, 'val': {...}} (see docs/data.md).",
    )
    val_fraction: float = _opt(0.1, "Fraction of train held out for validation when the dataset has no 'val' split.")
    normalize: str = _opt(
        "standard", "standard: standardise every input feature with the mean and std of the training split, computed "
        "once when a run starts and kept in its checkpoints (a run continued or fine-tuned from a checkpoint keeps "
        "the checkpoint's statistics, and one from before normalisation existed keeps none); none: features as they "
        "are.", choices=("standard", "none"), added_later=True)
    aug_noise_std: float = _opt(
        0.0, "Std of Gaussian noise added to training features (augmentation; may change on resume)."
    )

    # --- model (section "model"; architecture fields must match a checkpoint being loaded) ---
    model: str = _opt(
        BUILTIN_MODEL, "The model: transformer (the built-in one) or your own ModelSpec as package.module:attribute, "
        "importable where the command runs and on every node (see docs/own-model.md). A run started from a "
        "checkpoint trains the checkpoint's model.", added_later=True)
    model_args: dict[str, Any] | None = _opt(
        None, "Your model's own settings: key=value pairs (hidden=32,layers=2) or a JSON object; in a --config file, a "
        "model_args section. The built-in transformer takes --hidden-dim, --num-layers and --num-heads instead.",
        added_later=True, parse=str)  # a mapping after __post_init__
    hidden_dim: int = _opt(64, "Transformer width (the built-in model).")
    num_layers: int = _opt(2, "Number of Transformer blocks (the built-in model).")
    num_heads: int = _opt(4, "Attention heads; must divide --hidden-dim (the built-in model).")
    dropout: float = _opt(0.1, "Dropout probability (may change when fine-tuning).")
    feature_dim: int = _opt(0, "Input features per step, from the data.", cli=False)
    seq_len: int = _opt(0, "Sequence length, from the data.", cli=False)
    num_classes: int = _opt(0, "Number of classes, from the data.", cli=False)
    per_step: bool = _opt(False, "True when targets are [N, T] (one class per step), from the data.", cli=False)
    input_shape: list[int] | None = _opt(
        None, "One sample's input shape, from the data (None, in configs written before: [seq_len, feature_dim]).",
        cli=False)
    task: str = _opt("classification", "classification (integer labels) or regression (float targets), from the "
                     "data.", cli=False, choices=(CLASSIFICATION, REGRESSION))

    # --- optimisation (section "optim") ---
    epochs: int = _opt(5, "Total epochs (not additional ones): resuming at epoch 5 with --epochs 10 runs 6-10.")
    lr: float = _opt(1e-3, "Peak learning rate (AdamW), reached after warmup, then cosine decay to lr/10.")
    weight_decay: float = _opt(0.01, "AdamW weight decay (applied to matrices, not to biases and norms).")
    batch_size: int = _opt(32, "Sequences per worker per micro-batch.")
    grad_accum_steps: int = _opt(1, "Micro-batches per optimizer step.")
    warmup_steps: int = _opt(20, "Linear warmup, in optimizer steps.")
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    eval_every: int = _opt(50, "Validate and checkpoint every N optimizer steps (and at the end of every epoch).")
    select_metric: str = _opt(
        "val_loss", "What makes a checkpoint the best: val_loss (lowest), val_accuracy (highest; classification), "
        "val_rmse or val_mae (lowest; regression). It picks best_model.pt, the checkpoints --keep-checkpoints keeps, "
        "a run folder's best checkpoint, and a sweep's ranking and early stopping.",
        choices=tuple(HIGHER_IS_BETTER), added_later=True)
    seed: int = _opt(0, "Seed for initialisation, data order, dropout and augmentation.")

    # --- precision and speed (section "speed") ---
    use_amp: bool = _opt(False, "Mixed precision with torch.autocast (bf16 or fp16, see --amp-dtype).")
    amp_dtype: str = _opt(
        "bf16", "Autocast dtype with --use-amp; fp16 also uses a GradScaler.", choices=("bf16", "fp16")
    )
    compile: bool = _opt(False, "torch.compile the model (under --strategy fsdp: each Transformer block).")
    strategy: str = _opt(
        "ddp", "ddp: every worker holds the whole model and optimizer, rank 0 writes one state file; fsdp: "
        "parameters, gradients and optimizer state sharded across workers (FSDP2), every worker writes its shard. "
        "A run may change it when it resumes (see docs/sharding.md).", choices=("ddp", "fsdp"), identity=False,
        added_later=True)
    activation_checkpointing: bool = _opt(
        False, "Recompute each Transformer block's activations in the backward pass instead of keeping them "
        "(less memory, about a third more compute; results unchanged).", identity=False, added_later=True)
    grad_compression: str = _opt(
        "none", "DDP: all-reduce gradients in bf16 (half the traffic, rounding in the sum) instead of fp32.",
        choices=("none", "bf16"), added_later=True)
    best_model: str = _opt(
        "full", "What best_model.pt holds for --strategy fsdp: full (weights, optimizer and counters, resumable) "
        "or weights (weights and counters: a third of the host memory and file size). DDP runs always write full.",
        choices=("full", "weights"), identity=False, added_later=True)
    gpu_memory_gb: float | None = _opt(
        None, "Memory of each GPU in GB for the memory plan that refuses a run that cannot fit (default: from the "
        "cluster's accelerator type; see python -m raytrain_app.plan).", identity=False, added_later=True)

    # --- cluster (section "cluster"), then the run and its checkpoints ("run"), then what it reports ("logging") ---
    num_workers: int = _opt(
        2, "Ray Train workers (data-parallel ranks): N, or MIN-MAX to train elastically on whatever the cluster "
        "offers in that range (the effective batch stays batch-size x MAX x grad-accum-steps).",
        parse=str,  # "2" or "1-2"; __post_init__ splits a range into min_workers and num_workers
    )
    min_workers: int | None = _opt(
        None, "Fewest workers an elastic run (--num-workers MIN-MAX) keeps training with.", cli=False,
        identity=False, added_later=True,
    )
    use_gpu: bool = _opt(False, "One GPU per worker.")
    save_dir: str = _opt("./checkpoints", "Where runs live (Ray storage_path): <save-dir>/<run-name>/.", identity=False)
    run_name: str | None = _opt(
        None, "Run name; by default derived from the hyperparameters, so the same command continues the same run.",
        identity=False,
    )
    resume_from_checkpoint: str | None = _opt(
        None, "Start from a checkpoint: a .pt file, a checkpoint folder or a run folder (its best checkpoint)."
    )
    reset_optimizer: bool = _opt(
        False, "With --resume-from-checkpoint: start the AdamW moments and fp16 scaler anew instead of loading them.",
        added_later=True,
    )
    restart_schedule: bool = _opt(
        False, "With --resume-from-checkpoint: run warmup and the cosine decay anew over this run's steps, instead of "
        "continuing the checkpoint's position in the schedule (sweep trials: on unless --no-restart-schedule).",
        added_later=True,
    )
    max_failures: int = _opt(
        3, "Worker-group restarts from the latest checkpoint before the run fails.", identity=False
    )
    max_skipped_steps: int = _opt(
        25, "Stop when this many optimizer steps in a row were skipped for a non-finite loss or gradients (the "
        "run has diverged; 0: never stop). Skipped steps are counted in the metrics.", identity=False,
        added_later=True,
    )
    keep_checkpoints: int = _opt(3, "Checkpoints kept per run: the N best by --select-metric, plus always the latest.",
                                 identity=False)
    async_checkpoint: bool = _opt(
        True, "Write checkpoints in the background: training waits only for a copy of the state in host memory "
        "(--no-async-checkpoint: write them on the training path).", identity=False, added_later=True)
    use_wandb: bool = _opt(
        False, "Log to Weights & Biases: rank 0 logs the config and every metric at step = global step; a resumed "
        "run continues its wandb run.", identity=False)
    wandb_project: str = _opt("raytrain", "wandb project.", identity=False, added_later=True)
    wandb_entity: str | None = _opt(None, "wandb entity (team or user; default: the API key's).", identity=False,
                                    added_later=True)
    wandb_mode: str | None = _opt(
        None, "wandb mode: online, offline or disabled (default: online when an API key is configured, else "
        "offline).", identity=False, added_later=True, choices=("online", "offline", "disabled"))
    progress_every: float = _opt(
        10.0, "Seconds between progress lines on the console when it is not a terminal (a terminal gets a live "
        "bar).", identity=False, added_later=True)
    debug: bool = _opt(False, "Show the full traceback with an error message.", identity=False, added_later=True)

    def __post_init__(self) -> None:
        self._split_worker_range()
        positive = ("epochs", "batch_size", "grad_accum_steps", "eval_every", "hidden_dim", "num_layers",
                    "num_heads", "num_workers", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{flag_name(name)} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("weight_decay", "warmup_steps", "grad_clip", "aug_noise_std", "max_failures", "max_skipped_steps",
                     "progress_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag_name(name)} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"--num-heads {self.num_heads} must divide --hidden-dim {self.hidden_dim}; pick e.g. "
                f"--num-heads {_largest_divisor(self.hidden_dim, self.num_heads)}"
            )
        for f in fields(self):  # a config file or a dict is not checked by argparse's choices
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed and value not in allowed and not (value is None and f.default is None):
                raise ConfigError(f"--{flag_name(f.name)} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                                  f"got {value!r}")
        if isinstance(self.model_args, str):
            self.model_args = parse_model_args(self.model_args)
        if self.model_args is not None and not isinstance(self.model_args, dict):
            raise ConfigError(f"--model-args must be key=value pairs or a mapping, got {self.model_args!r}")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise ConfigError(f"--gpu-memory-gb must be positive, got {self.gpu_memory_gb}")

    def _split_worker_range(self) -> None:
        """--num-workers is N or MIN-MAX (a string from the CLI or a config file); MIN lands in min_workers."""
        value = self.num_workers
        if isinstance(value, int) and not isinstance(value, bool):
            return
        low, sep, high = str(value).strip().partition("-")
        try:
            low_n, high_n = int(low), int(high) if sep else None
        except ValueError:
            raise ConfigError(f"--num-workers must be a count like 2 or a range like 1-4, got {value!r}") from None
        if high_n is None:
            self.num_workers = low_n
            return
        if not 0 < low_n <= high_n:
            raise ConfigError(f"--num-workers {value}: the range must be MIN-MAX with 0 < MIN <= MAX, like 1-4")
        self.min_workers, self.num_workers = (low_n, high_n) if low_n < high_n else (None, high_n)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step at `world_size` workers. An elastic run keeps its effective batch
        (batch_size x num_workers x grad_accum_steps) when it has fewer workers by accumulating more; when the
        worker count does not divide it, the effective batch rounds up."""
        if not self.elastic or world_size >= self.num_workers:
            return self.grad_accum_steps
        return math.ceil(self.grad_accum_steps * self.num_workers / world_size)

    @property
    def selects_max(self) -> bool:
        """Whether the best checkpoint has the highest --select-metric (accuracy) rather than the lowest (a loss,
        an error)."""
        return higher_is_better(self.select_metric)

    @property
    def scores(self) -> tuple[str, ...]:
        """The validation scores this run reports beside val_loss (its task's)."""
        return TASK_SCORES[self.task]

    def check_select_metric(self) -> None:
        """--select-metric must be the loss or one of this task's scores (known once the data is)."""
        if self.select_metric != "val_loss" and self.select_metric not in self.scores:
            raise ConfigError(f"--select-metric {self.select_metric} is not measured for {self.task} data; use "
                              f"{' or '.join(('val_loss', *self.scores))}")

    def workers_text(self) -> str:
        return f"{self.min_workers}-{self.num_workers}" if self.elastic else str(self.num_workers)

    # --- round trips ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def identity_hash(self) -> str:
        """A short hash of everything that changes what is trained; the default run name is built from it.

        Settings added after the first release count only when they differ from their defaults, so an upgrade
        never renames existing runs: the same command keeps finding its run."""
        ident = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.metadata["identity"] and f.metadata["cli"]
                 and not (f.metadata.get("added_later") and getattr(self, f.name) == f.default)}
        for key in ("data", "resume_from_checkpoint"):
            if ident.get(key) and "://" not in ident[key]:
                ident[key] = os.path.abspath(ident[key])
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]

    def default_run_name(self) -> str:
        return f"run-{self.identity_hash()}"


def parse_model_args(text: str) -> dict[str, Any]:
    """--model-args: a JSON object (`'{"hidden": 32}'`) or key=value pairs (`hidden=32,layers=2`), each value read
    as JSON where it can be (numbers, true/false) and as text otherwise."""
    text = text.strip()
    if text.startswith("{"):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--model-args {text}: not a JSON object ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--model-args {text}: not a JSON object")
        return values
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-args {text}: give key=value pairs like hidden=32,layers=2, or a JSON object")
        try:
            values[key.strip()] = json.loads(raw)
        except ValueError:
            values[key.strip()] = raw.strip()
    return values


# The config's sections, each from its first field to the next section's (in field order): how --help, the
# command-line reference and --config files group the settings. The dataclass itself stays flat: a checkpoint's
# config, Ray's train_loop_config and the flags are one dict of settings, as users' tools read them.
SECTION_STARTS = {"data": "data", "model": "model", "optim": "epochs", "speed": "use_amp", "cluster": "num_workers",
                  "run": "save_dir", "logging": "use_wandb"}
SECTION_TITLES = {"data": "data", "model": "model", "optim": "optimisation", "speed": "precision and speed",
                  "cluster": "cluster", "run": "the run and its checkpoints", "logging": "logging and console"}


def config_sections(cls: type | None = None) -> dict[str, list[dataclasses.Field]]:
    """TrainConfig's CLI fields by section, in order."""
    sections: dict[str, list[dataclasses.Field]] = {}
    starts = {field_name: section for section, field_name in SECTION_STARTS.items()}
    current = next(iter(SECTION_STARTS))
    for f in fields(cls or TrainConfig):
        current = starts.get(f.name, current)
        if f.metadata["cli"]:
            sections.setdefault(current, []).append(f)
    return sections


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def as_flags(values: dict[str, Any], names: tuple[str, ...] | None = None) -> str:
    """Settings as the command-line flags that give them (`--use-amp`, `--no-compile`, `--lr 0.001`); `names`
    picks and orders them (default: every CLI setting in `values`)."""
    cli = {f.name for f in cli_fields()}
    if values.get("model") not in (None, BUILTIN_MODEL):  # a plug-in: the built-in model's flags do not apply
        cli -= set(ARCH_FIELDS)
    parts: list[str] = []
    for name in names or tuple(values):
        value = values.get(name)
        if name not in cli or value is None:
            continue
        if isinstance(value, dict):  # --model-args: key=value pairs, each value as JSON unless it is text
            if value:
                parts += [f"--{flag_name(name)}", ",".join(
                    f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())]
        elif isinstance(value, bool):
            parts.append(f"--{'' if value else 'no-'}{flag_name(name)}")
        else:
            parts += [f"--{flag_name(name)}", str(value)]
    return shlex.join(parts)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _lr_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--lr-grid must be comma-separated numbers like 1e-5,3e-5,1e-4, got {text!r}") from None


# Training flags a sweep sets itself, with what to use instead.
SWEEP_OWNED_FLAGS = {
    "lr": "the sweep sets each trial's learning rate: use --lr-grid or --lr-min/--lr-max",
    "resume_from_checkpoint": "every trial starts from --base-checkpoint",
    "run_name": "trial runs are named from their trial ids; name the sweep with --sweep-name",
}


@dataclass(kw_only=True)
class SweepConfig:
    """A learning-rate sweep: every trial starts from `base_checkpoint` with its own learning rate. Every other
    training setting is a TrainConfig field, fixed for all trials."""

    base_checkpoint: str | None = _opt(
        None, "Checkpoint every trial starts from: anything --resume-from-checkpoint accepts (required)."
    )
    lr_grid: tuple[float, ...] | None = _opt(
        None, "Learning rates to try, comma-separated (e.g. 1e-5,3e-5,1e-4)."  # a string on the CLI: __post_init__
    )
    lr_min: float | None = _opt(None, "Smallest learning rate of a log-uniform search (with --lr-max).")
    lr_max: float | None = _opt(None, "Largest learning rate of a log-uniform search (with --lr-min).")
    num_samples: int = _opt(4, "Learning rates drawn log-uniformly between --lr-min and --lr-max (seeded by --seed).")
    scheduler: str = _opt("asha", "asha stops poor trials early; none runs every trial to the end.",
                          choices=("asha", "none"))
    grace_period: int | None = _opt(
        None, "ASHA: optimizer steps a trial trains before it may be stopped (default: --eval-every, at most half a "
        "trial)."
    )
    reduction_factor: float = _opt(3.0, "ASHA: keep the best 1/N of trials at each rung.")
    max_concurrent_trials: int | None = _opt(
        None, "Trials running at once (default and upper bound: as many as the cluster can hold).", identity=False
    )
    sweep_name: str | None = _opt(
        None, "Sweep name; by default derived from the settings, so the same command resumes the same sweep.",
        identity=False,
    )

    def __post_init__(self) -> None:
        if isinstance(self.lr_grid, str):
            self.lr_grid = _lr_list(self.lr_grid)
        elif self.lr_grid is not None:
            self.lr_grid = tuple(float(v) for v in self.lr_grid)
        if not self.base_checkpoint:
            raise ConfigError("--base-checkpoint is required: the checkpoint every trial starts from")
        ranged = self.lr_min is not None or self.lr_max is not None
        if (self.lr_grid is not None) == ranged:
            raise ConfigError("give the learning rates to try: --lr-grid 1e-5,3e-5,1e-4, or --lr-min 1e-5 --lr-max "
                              "1e-3 [--num-samples 4] (not both)")
        if self.lr_grid is not None:
            if not self.lr_grid or any(not lr > 0 for lr in self.lr_grid):
                raise ConfigError(f"--lr-grid values must be positive, got {','.join(map(str, self.lr_grid))}")
            if len(set(self.lr_grid)) != len(self.lr_grid):
                raise ConfigError("--lr-grid lists a learning rate twice")
        else:
            if self.lr_min is None or self.lr_max is None:
                raise ConfigError("--lr-min and --lr-max go together")
            if not 0 < self.lr_min < self.lr_max:
                raise ConfigError(f"need 0 < --lr-min < --lr-max, got {self.lr_min} and {self.lr_max}")
        for name in ("num_samples", "grace_period", "max_concurrent_trials"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{flag_name(name)} must be positive, got {value}")
        if not self.reduction_factor > 1:
            raise ConfigError(f"--reduction-factor must be greater than 1, got {self.reduction_factor}")
        if self.scheduler not in ("asha", "none"):
            raise ConfigError(f"--scheduler must be asha or none, got {self.scheduler!r}")

    def learning_rates(self, seed: int) -> list[float]:
        """The trials' learning rates: the grid as given, or `num_samples` log-uniform draws (3 significant
        digits, sorted) from a generator seeded by `seed`, so the same command always means the same trials."""
        if self.lr_grid is not None:
            return list(self.lr_grid)
        import numpy as np

        rng = np.random.default_rng(seed)
        draws = np.exp(rng.uniform(np.log(self.lr_min), np.log(self.lr_max), size=self.num_samples))
        return sorted({float(f"{lr:.3g}") for lr in draws})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        ident = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["identity"]}
        if ident["base_checkpoint"] and "://" not in ident["base_checkpoint"]:
            ident["base_checkpoint"] = os.path.abspath(ident["base_checkpoint"])
        return ident


def sweep_identity_hash(sweep: SweepConfig, train: TrainConfig) -> str:
    """A short hash of everything that changes what a sweep trains; its default name is built from it."""
    payload = {"sweep": sweep.identity(), "train": train.identity_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def cli_fields(cls: type = TrainConfig) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.metadata["cli"]]

