"""The command line, generated from the config dataclasses: every field is a flag with its docstring as
help. Precedence, written down once: command-line flags > `--config FILE` (YAML or TOML) > field defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from typing import Any

from raytrain_app.core.config import (
    SECTION_STARTS,
    SECTION_TITLES,
    SWEEP_OWNED_FLAGS,
    ConfigError,
    SweepConfig,
    TrainConfig,
    cli_fields,
    config_sections,
    flag_name,
)


def _cli_type(f: dataclasses.Field) -> Any:
    if "parse" in f.metadata:
        return f.metadata["parse"]
    return {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)


def _add_fields(parser: argparse._ActionsContainer, cls: type, hidden: frozenset[str] = frozenset(),
                fields: list[dataclasses.Field] | None = None) -> None:
    """`hidden`: accepted (so a clear error can name them) but not listed in --help."""
    for f in fields if fields is not None else cli_fields(cls):
        flag = f"--{flag_name(f.name)}"
        help_text = argparse.SUPPRESS if f.name in hidden else f"{f.metadata['help']} (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        parser.add_argument(flag, type=_cli_type(f), choices=f.metadata.get("choices"), help=help_text)


def build_parser(prog: str = "python -m raytrain_app.main", description: str | None = None,
                 *, sweep: bool = False) -> argparse.ArgumentParser:
    """The CLI, generated from `TrainConfig` (and `SweepConfig` for sweeps). Every default is SUPPRESS so we
    know which flags were given."""
    # No abbreviations: a prefix that works today would change meaning when a flag is added, and commands this
    # tool prints (resume, fork) are built by replacing flags by their full names.
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings; command-line flags win.")
    if sweep:
        _add_fields(parser.add_argument_group("sweep"), SweepConfig)
        _add_fields(parser.add_argument_group("training (fixed for every trial)"), TrainConfig,
                    hidden=frozenset(SWEEP_OWNED_FLAGS))
    else:
        for section, section_fields in config_sections().items():
            _add_fields(parser.add_argument_group(SECTION_TITLES[section]), TrainConfig, fields=section_fields)
    return parser


def load_config_file(path: str, allowed: set[str]) -> dict[str, Any]:
    """Read a YAML or TOML settings file; keys may use dashes or underscores."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config file not found: {path}")
    import yaml

    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            values = tomllib.loads(raw.decode())
        else:
            values = yaml.safe_load(raw) or {}
    except (ValueError, yaml.YAMLError) as e:  # TOML and UnicodeDecode errors, a YAML date 2020-13-45: ValueErrors
        raise ConfigError(f"--config {path} could not be parsed: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings, got {type(values).__name__}")
    values = _flatten_sections({str(k).replace("-", "_"): v for k, v in values.items()}, path)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) in --config {path}: {', '.join(unknown)}")
    return values


def _flatten_sections(values: dict[str, Any], path: str) -> dict[str, Any]:
    """A file's settings may be grouped by the config's sections (`optim: {lr: 0.001}`, a TOML `[optim]` table) or
    flat; a section may not set what another key sets too."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTION_STARTS and isinstance(value, dict):  # `model: my.mod:spec` is the setting, not a section
            inner = {str(k).replace("-", "_"): v for k, v in value.items()}
        else:
            inner = {key: value}
        for name, setting in inner.items():
            if name in flat:
                raise ConfigError(f"--config {path} sets {name} twice")
            flat[name] = setting
    return flat


def _given_values(parser: argparse.ArgumentParser, argv: list[str] | None, allowed: set[str]) -> dict[str, Any]:
    """The settings the user gave: a --config file's, then the flags' (flags win)."""
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = load_config_file(config_path, allowed) if config_path else {}
    values.update(args)
    return values


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Parse the command line into a config, and the set of fields the user set (flags or config file)."""
    values = _given_values(build_parser(), argv, {f.name for f in cli_fields()})
    return TrainConfig.from_dict(values), set(values)


def parse_sweep_config(argv: list[str] | None = None,
                       prog: str = "python -m raytrain_app.tune") -> tuple[SweepConfig, TrainConfig, set[str]]:
    """Parse a sweep's command line: its SweepConfig, the fixed TrainConfig of every trial, and the training
    fields the user set. A --config file may hold both kinds of keys. Trials restart the schedule at the base
    checkpoint unless --no-restart-schedule is given."""
    sweep_names = {f.name for f in cli_fields(SweepConfig)}
    values = _given_values(build_parser(prog, sweep=True), argv, sweep_names | {f.name for f in cli_fields()})
    train_values = {k: v for k, v in values.items() if k not in sweep_names}
    for name, instead in SWEEP_OWNED_FLAGS.items():
        if name in train_values:
            raise ConfigError(f"--{flag_name(name)} is not a sweep setting: {instead}")
    sweep = SweepConfig(**{k: v for k, v in values.items() if k in sweep_names})
    given = set(train_values)
    train_values.setdefault("restart_schedule", True)
    return sweep, TrainConfig.from_dict(train_values), given

