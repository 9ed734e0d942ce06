"""The model plug-in point: what this service needs to know about a model to train, checkpoint, shard, evaluate
and serve it. Pure PyTorch: no I/O, no Ray.

A user's model is a `ModelSpec` in a module of their own, named as `--model package.module:attribute`. Required
is only what every model needs: `build` (the module, from the data's shape, the model's own settings and
--dropout) and the `task`. The rest is optional, and each optional part buys something (docs/own-model.md):
`args` (settings given with --model-args, recorded in every checkpoint), `shard_units` (what --strategy fsdp
shards and --activation-checkpointing recomputes, one by one) and `flops_per_sample` (the MFU figure). The
built-in Transformer is the spec `raytrain_app.core.model.TRANSFORMER`, the default, named `transformer`.

The model gets its inputs as the data holds them; this service standardises them first (--normalize) with
statistics it keeps in the model's state dict (`Standardized`), so that every checkpoint carries what its
weights expect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raytrain_app.core.config import ARCH_FIELDS, BUILTIN_MODEL, CLASSIFICATION, REGRESSION, ConfigError, TrainConfig

TASKS = (CLASSIFICATION, REGRESSION)
BUILTIN = BUILTIN_MODEL  # --model's default: the built-in SequenceTransformer
# Imported by name like any plug-in (and so the model module, which uses this protocol, is not imported here).
BUILTIN_SPEC = "raytrain_app.core.model:TRANSFORMER"


@dataclass(frozen=True)
class DataShape:
    """What the data says a model is built for. `input_shape`: one sample's input ([T, F] for a sequence of T
    steps of F features, [F] for a row of F features); `per_step`: one target per step ([N, T] targets) rather
    than one per sample; `num_classes`: classification's class count (0 for regression)."""

    input_shape: tuple[int, ...]
    per_step: bool = False
    num_classes: int = 0
    task: str = CLASSIFICATION

    @property
    def num_features(self) -> int:
        """The last axis: what --normalize standardises, feature by feature."""
        return self.input_shape[-1]


@dataclass(frozen=True)
class ModelSpec:
    """A model this service can train. See the module docstring and docs/own-model.md."""

    build: Callable[[DataShape, Any, float], nn.Module]  # (shape, args, dropout) -> the module, in training mode
    task: str = CLASSIFICATION  # or REGRESSION: outputs of the targets' shape (see raytrain_app.core.tasks)
    args: type | None = None  # a dataclass of the model's own settings (--model-args), every field with a default
    shard_units: Callable[[nn.Module], Iterable[nn.Module]] | None = None  # submodules, each its own FSDP unit
    flops_per_sample: Callable[[DataShape, Any], float] | None = None  # training FLOPs of one sample, for MFU
    standardizes_inputs: bool = False  # the module holds input_mean/input_std itself (the built-in model)

    def __post_init__(self) -> None:
        if not callable(self.build):
            raise TypeError("ModelSpec.build must be a function (shape, args, dropout) -> nn.Module")
        if self.task not in TASKS:
            raise TypeError(f"ModelSpec.task must be {' or '.join(TASKS)}, got {self.task!r}")
        if self.args is not None and not dataclasses.is_dataclass(self.args):
            raise TypeError("ModelSpec.args must be a dataclass of the model's settings")


class SpecError(ConfigError):
    """The model named by --model cannot be used: not importable, not a spec, its settings or its build fail."""


def load_spec(name: str) -> ModelSpec:
    """The spec `--model` names: `transformer` (built-in) or `package.module:attribute`, imported (SpecError)."""
    if name == BUILTIN:
        name = BUILTIN_SPEC
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise SpecError(f"--model {name}: name the built-in {BUILTIN} or your spec as package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - ImportError, or whatever the user's module raises as it is imported
        raise SpecError(f"--model {name}: cannot import {module_name} ({type(e).__name__}: {e}); it must be "
                        "importable where the command runs and on every node (an installed package, PYTHONPATH, "
                        "or the job's working directory)") from None
    spec = getattr(module, attribute, None)
    if not isinstance(spec, ModelSpec):
        found = "nothing" if spec is None else type(spec).__name__
        raise SpecError(f"--model {name}: {module_name}.{attribute} must be a raytrain_app ModelSpec, found {found}")
    return spec


def spec_args(spec: ModelSpec, given: dict[str, Any] | None, model: str) -> Any:
    """The spec's settings object from `given` (--model-args) over its defaults (SpecError on a mistake)."""
    given = dict(given or {})
    if spec.args is None:
        if given:
            raise SpecError(f"--model-args {', '.join(sorted(given))}: --model {model} takes no settings")
        return None
    known = {f.name: f for f in dataclasses.fields(spec.args)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise SpecError(f"--model-args: {model} has no setting {', '.join(unknown)} (it has "
                        f"{', '.join(known) or 'none'})")
    for key, value in given.items():
        expected = known[key].default
        if expected is not dataclasses.MISSING and expected is not None and not _same_kind(value, expected):
            raise SpecError(f"--model-args {key}={value!r}: {model} expects a value like {expected!r}")
    try:
        return spec.args(**given)
    except Exception as e:  # noqa: BLE001 - a required field left out, or the dataclass's own validation
        raise SpecError(f"--model-args for {model}: {type(e).__name__}: {e}") from None


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def data_shape(cfg: TrainConfig) -> DataShape:
    """The shape the config's model is built for (filled from the data or the checkpoint; a config written before
    inputs of any shape holds sequences [seq_len, feature_dim])."""
    input_shape = tuple(cfg.input_shape) if cfg.input_shape else (cfg.seq_len, cfg.feature_dim)
    return DataShape(input_shape=input_shape, per_step=cfg.per_step, num_classes=cfg.num_classes, task=cfg.task)


class Standardized(nn.Module):
    """A plug-in model behind the input standardisation (--normalize): `input_mean` and `input_std` (per feature,
    over the last axis) are buffers in the state dict, so a checkpoint carries the statistics its weights expect.
    Zeros and ones (--normalize none) change nothing: x - 0 and x / 1 are exact."""

    def __init__(self, net: nn.Module, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("input_mean", torch.zeros(num_features))
        self.register_buffer("input_std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.input_mean) / self.input_std)


def build_model(cfg: TrainConfig, spec: ModelSpec | None = None) -> nn.Module:
    """The model the config names, built for its data shape with its settings and --dropout, behind the input
    standardisation. Raises SpecError when the spec's build fails or does not return a module."""
    spec = spec or load_spec(cfg.model)
    shape = data_shape(cfg)
    args = model_args(cfg, spec)
    try:
        net = spec.build(shape, args, cfg.dropout)
    except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises is named in the one line
        raise SpecError(f"--model {cfg.model} did not build for inputs {list(shape.input_shape)}: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise SpecError(f"--model {cfg.model}: build returned {type(net).__name__}, not a torch.nn.Module")
    return net if spec.standardizes_inputs else Standardized(net, shape.num_features)


@contextlib.contextmanager
def without_init(device: str = "meta") -> Iterator[None]:
    """Build modules on `device` without running torch.nn.init's initialisers (Hugging Face's `no_init_weights`
    does the same): for a check of shapes, where nothing needs the values. On the meta device (shapes only: no
    memory, no compute) they would go through PyTorch's reference implementations, whose first use imports for
    over a second of CPU in every process that checks a model."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS if hasattr(nn.init, name)}
    for name in saved:
        setattr(nn.init, name, _unchanged)
    try:
        with torch.device(device):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def on_meta_device() -> contextlib.AbstractContextManager[None]:
    """Modules built inside have shapes only (see `without_init`)."""
    return without_init("meta")


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                 "sparse_")


def _unchanged(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def model_args(cfg: TrainConfig, spec: ModelSpec | None = None) -> Any:
    """The model's settings object: the built-in's from its flags, a plug-in's from --model-args."""
    spec = spec or load_spec(cfg.model)
    if cfg.model == BUILTIN:  # its settings are flags of their own
        return spec.args(**{name: getattr(cfg, name) for name in ARCH_FIELDS})
    return spec_args(spec, cfg.model_args, cfg.model)


def inner(model: nn.Module) -> nn.Module:
    """The user's module inside the standardisation wrapper (the built-in model has none)."""
    return model.net if isinstance(model, Standardized) else model


def units(cfg: TrainConfig, model: nn.Module) -> list[nn.Module]:
    """The submodules --strategy fsdp shards one by one and --activation-checkpointing recomputes (none: the
    model is one unit)."""
    spec = load_spec(cfg.model)
    return list(spec.shard_units(inner(model))) if spec.shard_units is not None else []


def checkpoint_activations(unit: nn.Module) -> None:
    """Make `unit` keep only its inputs in training and run again in the backward pass (with the same dropout
    masks: the RNG state is saved and restored, so results are unchanged). Its forward is replaced on the
    instance, so its parameters keep their names (and FSDP's hooks, which run around forward, stay outside)."""
    forward = unit.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if unit.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    unit.forward = recomputed


def count_flops(cfg: TrainConfig) -> float | None:
    """Training FLOPs of one sample, for MFU: the spec's own count, else None (not reported)."""
    spec = load_spec(cfg.model)
    if spec.flops_per_sample is None:
        return None
    flops = spec.flops_per_sample(data_shape(cfg), model_args(cfg, spec))
    return float(flops) if flops and math.isfinite(flops) else None


def model_identity(config: dict[str, Any] | None) -> dict[str, Any]:
    """The model a checkpoint's config (`TrainConfig.to_dict()`) holds: its spec's name and settings. A config
    written before models were pluggable holds the built-in one."""
    config = config or {}
    name = config.get("model") or BUILTIN
    if name == BUILTIN:
        defaults = load_spec(BUILTIN).args()
        args = {f: config.get(f, getattr(defaults, f)) for f in ARCH_FIELDS}
    else:
        args = dict(config.get("model_args") or {})
    return {"spec": name, "args": args}


def model_text(config: dict[str, Any] | None) -> str:
    """The model a config holds, as the console names it: `transformer (hidden_dim=64, num_layers=2, ...)`."""
    identity = model_identity(config)
    args = ", ".join(f"{k}={v}" for k, v in identity["args"].items())
    return identity["spec"] + (f" ({args})" if args else "")
