"""docs/cli.md, generated from the config dataclasses: `python -m raytrain_app.cli.reference > docs/cli.md`
(`make docs`). A test fails when the committed file differs from what this prints, so the reference cannot
drift from the flags."""

from __future__ import annotations

import dataclasses
import sys

from raytrain_app.core.config import (
    SECTION_TITLES,
    SWEEP_OWNED_FLAGS,
    SweepConfig,
    TrainConfig,
    cli_fields,
    config_sections,
    flag_name,
)

HEADER = """# Command-line reference

Generated from the config dataclasses (`raytrain_app/core/config.py`) by `make docs`; do not edit by hand.
Every setting can also come from a `--config FILE` (YAML or TOML, keys with dashes or underscores); flags given
on the command line win over the file, and the file wins over the defaults. Boolean settings take
`--name` / `--no-name`.
"""


def _type_name(f: dataclasses.Field) -> str:
    if f.type in ("bool", bool):
        return "flag"
    if "choices" in f.metadata:
        return " \\| ".join(f.metadata["choices"])
    text = str(f.type).removesuffix(" | None")
    return {"int": "integer", "float": "number", "str": "text", "tuple[float, ...]": "numbers, comma-separated",
            "dict[str, Any]": "key=value,... or JSON"}.get(
        text, text)


def _default(f: dataclasses.Field) -> str:
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"`{f.default}`"


def _table(cls: type, skip: frozenset[str] = frozenset(), fields: list[dataclasses.Field] | None = None) -> list[str]:
    lines = ["| flag | value | default | what it does |", "| --- | --- | --- | --- |"]
    for f in fields if fields is not None else cli_fields(cls):
        if f.name in skip:
            continue
        flag = f"--{flag_name(f.name)}"
        if f.type in ("bool", bool):
            flag = f"--[no-]{flag_name(f.name)}"
        what = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{flag}` | {_type_name(f)} | {_default(f)} | {what} |")
    return lines


def reference() -> str:
    """The whole of docs/cli.md."""
    owned = ", ".join(f"`--{flag_name(n)}` ({why})" for n, why in SWEEP_OWNED_FLAGS.items())
    parts = [
        HEADER,
        "## Training: `python -m raytrain_app.main` (`raytrain train`)",
        "",
        "Settings that change what is trained make up the default run name, so the same command continues the "
        "same run; operational settings (where checkpoints go, retries, logging) do not.",
        "",
        "In a `--config` file the settings may be flat or grouped by these sections (`optim:` with `lr:` under it in "
        "YAML, an `[optim]` table in TOML).",
        "",
        *[line for section, section_fields in config_sections().items() for line in (
            f"### {SECTION_TITLES[section]} (`{section}`)", "", *_table(TrainConfig, fields=section_fields), "")],
        "## Sweeps: `python -m raytrain_app.tune` (`raytrain tune`)",
        "",
        "The sweep's own settings:",
        "",
        *_table(SweepConfig),
        "",
        "Every training flag above applies to all trials alike, except those the sweep sets itself: " + owned + ".",
        "",
        "## The other commands",
        "",
        "Their flags are listed by `--help`:",
        "",
        "- `python -m raytrain_app.jobs submit|status|logs|stop` (`raytrain jobs`): run training or a sweep as a "
        "Ray job that is resubmitted after a failure.",
        "- `python -m raytrain_app.ckpt show|export` (`raytrain ckpt`): what a checkpoint holds; its weights as "
        "safetensors.",
        "- `python -m raytrain_app.report RUN` (`raytrain report`): a run's summary and loss plot.",
        "- `python -m raytrain_app.data synth|convert` (`raytrain data`): a synthetic dataset; a pickle converted "
        "to Parquet.",
        "- `python -m raytrain_app.plan` (`raytrain plan`): the memory plan of a training command: does it fit "
        "the GPUs?",
        "- `python -m raytrain_app.evaluate --checkpoint X --data D` (`raytrain evaluate`): a checkpoint scored on "
        "a test split: loss, accuracy, per-class precision, recall and F1, a confusion matrix.",
        "- `python -m raytrain_app.predict --checkpoint X --data D --out OUT` (`raytrain predict`): batch "
        "predictions over Parquet files or a pickle with Ray Data, written whole or not at all.",
        "",
        "## Exit codes",
        "",
        "| code | meaning |",
        "| --- | --- |",
        "| 0 | finished (or nothing left to train) |",
        "| 1 | training failed after its retries, or an error nobody foresaw (one line; `--debug` for the "
        "traceback) |",
        "| 2 | a mistake in the command's input: one line naming it, and nothing was written |",
        "| 3 | training diverged and stopped itself; the message gives the command to resume with a lower "
        "learning rate |",
        "| 128 + N | stopped by signal N (130: SIGINT, 143: SIGTERM) after saving the current step |",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(reference())
