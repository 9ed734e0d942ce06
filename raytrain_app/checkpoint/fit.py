"""Fitting a run's config to the checkpoint it starts from: the model (its spec and settings) from the
checkpoint, and a check that its weights have this model's shapes (on the meta device: no memory, no compute).
"""

from __future__ import annotations

import logging
from typing import Any

from raytrain_app.checkpoint.resolve import StateSummary
from raytrain_app.core.config import ARCH_FIELDS, TrainConfig
from raytrain_app.core.errors import UserError
from raytrain_app.core.model_spec import BUILTIN, model_identity

log = logging.getLogger(__name__)


def fit_to_checkpoint(
    cfg: TrainConfig, given: set[str], summary: StateSummary, *, num_classes_given: bool
) -> TrainConfig:
    """Take the model (spec and settings; the built-in's architecture fields) from the checkpoint; a flag given
    with another value is an error (exit 2).

    `num_classes_given`: the dataset states its class count (else it is max label + 1 and may be smaller)."""
    from raytrain_app.core.model import arch_from_shapes

    changes, mismatches = _model_from_checkpoint(cfg, given, summary)
    # The data's shapes the checkpoint was trained for; the built-in's weights say them where no config does.
    saved = {**(arch_from_shapes(summary.model_shapes) if changes["model"] == BUILTIN else {}), **summary.config}
    for name, what in (("feature_dim", "feature dimension"), ("seq_len", "sequence length"),
                       ("num_classes", "class count")):
        if not saved.get(name):  # unknown: the weight shapes are checked next
            continue
        data_value = getattr(cfg, name)
        if name == "num_classes" and not num_classes_given and data_value <= saved[name]:
            changes[name] = saved[name]  # the data just doesn't use the top classes
        elif data_value != saved[name]:
            mismatches.append(f"dataset {what} {data_value} (checkpoint has {saved[name]})")
    saved_shape = summary.config.get("input_shape")
    if saved_shape and cfg.input_shape and list(saved_shape) != list(cfg.input_shape):
        mismatches.append(f"dataset inputs {list(cfg.input_shape)} (checkpoint has {list(saved_shape)})")
    saved_task = summary.config.get("task") or "classification"  # configs from before regression: classification
    if saved_task != cfg.task:
        mismatches.append(f"dataset targets are {cfg.task} (checkpoint has {saved_task})")
    # Both heads have the same shapes, so only the config can tell them apart.
    if "per_step" in summary.config and bool(summary.config["per_step"]) != cfg.per_step:
        kinds = {True: "per-step labels [N, T]", False: "per-sequence labels [N]"}
        saved_kind = kinds[bool(summary.config["per_step"])]
        mismatches.append(f"dataset has {kinds[cfg.per_step]} (checkpoint has {saved_kind})")
    changes["normalize"] = _checkpoint_normalization(cfg, given, summary)
    if mismatches:
        raise UserError(
            f"checkpoint {summary.path} does not fit this model: {'; '.join(mismatches)}. "
            "Drop the architecture flags (or --model-args) to use the checkpoint's, or use data with the same shape."
        )
    return cfg.replace(**changes)


def _model_from_checkpoint(cfg: TrainConfig, given: set[str],
                           summary: StateSummary) -> tuple[dict[str, Any], list[str]]:
    """(the checkpoint's model as config changes, the flags given that contradict it). Another --model is refused
    outright: nothing of the two models would fit."""
    from raytrain_app.core.model import arch_from_shapes

    saved_model = model_identity(summary.config)["spec"]
    if "model" in given and cfg.model != saved_model:
        raise UserError(f"checkpoint {summary.path} holds a model of --model {saved_model}, not {cfg.model}: drop "
                        "--model to continue that model, or train yours from scratch")
    changes: dict[str, Any] = {"model": saved_model}
    mismatches = []
    if saved_model != BUILTIN:
        saved_args = dict(summary.config.get("model_args") or {})
        for key, value in (cfg.model_args or {}).items() if "model_args" in given else ():
            if saved_args.get(key) != value:
                mismatches.append(f"--model-args {key}={value} (checkpoint has {saved_args.get(key)})")
        return {**changes, "model_args": saved_args}, mismatches
    saved = {**arch_from_shapes(summary.model_shapes), **summary.config}
    for name in ARCH_FIELDS:
        if saved.get(name) is None:
            continue
        if name in given and getattr(cfg, name) != saved[name]:
            mismatches.append(f"--{name.replace('_', '-')} {getattr(cfg, name)} (checkpoint has {saved[name]})")
        else:
            changes[name] = saved[name]
    return changes, mismatches


def _checkpoint_normalization(cfg: TrainConfig, given: set[str], summary: StateSummary) -> str:
    """A run started from a checkpoint standardises its inputs as the checkpoint's weights expect: with the
    statistics in the checkpoint (whatever data this run has), or not at all when the checkpoint has none."""
    from raytrain_app.core.model import has_input_stats

    if has_input_stats(summary.model_shapes):
        saved = summary.config.get("normalize") or "standard"
    else:
        saved = "none"  # written before --normalize existed: trained on the features as they are
    if "normalize" in given and cfg.normalize != saved:
        log.info(f"Note: --normalize {cfg.normalize} does not apply to a run started from a checkpoint; its "
                 f"weights expect {'its own statistics' if saved == 'standard' else 'the features as they are'} "
                 f"(--normalize {saved}), and that is kept.")
    return saved


def check_weights_fit(cfg: TrainConfig, summary: StateSummary) -> None:
    """Compare the checkpoint's tensors with the model on the meta device: no memory, no compute."""
    import torch

    from raytrain_app.core.model import NORMALIZATION_KEYS, has_input_stats
    from raytrain_app.core.model_spec import build_model, on_meta_device

    with on_meta_device():
        # Tensors only: a model's extra state (get_extra_state) has no shape.
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items() if isinstance(v, torch.Tensor)}
    found = summary.model_shapes
    if not has_input_stats(found):  # written before input normalisation: loads as none
        expected = {k: v for k, v in expected.items() if k not in NORMALIZATION_KEYS}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape {', '.join(wrong[:3])}" if wrong else "",
        ]))
        raise UserError(f"checkpoint {summary.path} holds a different model ({details}); "
                        "pass the architecture flags (or --model-args) it was trained with")

