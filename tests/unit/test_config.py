"""The config dataclass and the CLI generated from it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from raytrain_app.cli.flags import parse_config
from raytrain_app.core.config import ConfigError, TrainConfig, cli_fields
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.main import main
from tests.conftest import REPO_ROOT
from tests.helpers import run_in_process

USER_FLAGS = [  # fixed names: users' scripts already use them
    "--data", "--epochs", "--lr", "--weight-decay", "--dropout", "--batch-size", "--grad-accum-steps", "--use-amp",
    "--compile", "--use-wandb", "--save-dir", "--resume-from-checkpoint", "--hidden-dim", "--num-layers",
    "--num-heads", "--eval-every",
]
SERVICE_FLAGS = [
    "--num-workers", "--use-gpu", "--amp-dtype", "--run-name", "--seed", "--warmup-steps", "--grad-clip",
    "--aug-noise-std", "--max-failures", "--keep-checkpoints", "--config",
]


def test_help_lists_every_flag() -> None:
    result = run_in_process(main, ["--help"])
    assert result.returncode == 0
    for flag in USER_FLAGS + SERVICE_FLAGS:
        assert f"{flag} " in result.stdout or f"{flag}\n" in result.stdout, flag


def test_defaults_and_given_fields() -> None:
    cfg, given = parse_config(["--lr", "3e-4", "--use-amp", "--amp-dtype", "fp16"])
    assert cfg.lr == 3e-4 and cfg.use_amp and cfg.amp_dtype == "fp16"
    assert given == {"lr", "use_amp", "amp_dtype"}
    assert cfg.save_dir == "./checkpoints" and cfg.epochs == TrainConfig().epochs


def test_the_documented_large_gpu_configuration_is_flags_alone_and_its_state_the_documented_size() -> None:
    """docs/performance.md's large configuration: its command parses as it stands (every flag known and valid, no
    --config file), and the state of the model it builds (fp32 weights and AdamW's two moments, counted on the
    meta device) is the size the page gives."""
    section = (REPO_ROOT / "docs" / "performance.md").read_text().split("## The large configuration on GPUs")[1]
    words = shlex.split(section.split("```bash")[1].split("```")[0].replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "raytrain_app.main"]
    cfg, given = parse_config(words[3:])
    assert {"hidden_dim", "num_layers", "num_heads", "use_amp", "use_gpu"} <= given and "config" not in given
    with torch.device("meta"):  # 1.2 B parameters, no memory
        model = SequenceTransformer(cfg.replace(feature_dim=4, seq_len=8, num_classes=3))  # as from the data
    state_gb = 12 * sum(p.numel() for p in model.parameters()) / 1e9
    documented = re.search(r"Its state is about (\d+) GB", section)
    assert documented and state_gb == pytest.approx(float(documented[1]), abs=1)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_then_flags_win(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    if suffix == ".yaml":
        path.write_text("lr: 0.01\nbatch-size: 7\nhidden_dim: 32\n")
    else:
        path.write_text('lr = 0.01\nbatch-size = 7\nhidden_dim = 32\n')
    cfg, given = parse_config(["--config", str(path), "--lr", "0.002"])
    assert (cfg.lr, cfg.batch_size, cfg.hidden_dim) == (0.002, 7, 32)
    assert {"lr", "batch_size", "hidden_dim"} <= given


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.01\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) in --config .*bad.yaml: learning_rate"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(("name", "raw", "problem"), [
    ("cut.yaml", b"lr: [0.1, 0.2\n", "while parsing a flow sequence"),
    ("date.yaml", b"start: 2020-13-45\n", "month must be in 1..12"),  # YAML's timestamp, refused by datetime
    ("cut.toml", b"lr = \n", "Invalid value (at line 1, column 6)"),
    ("latin1.toml", b"lr = '\xe9'\n", "'utf-8' codec can't decode byte 0xe9"),
])
def test_a_config_file_that_cannot_be_parsed_is_refused_naming_it(tmp_path: Path, name: str, raw: bytes,
                                                                  problem: str) -> None:
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(path)])
    assert str(error.value).startswith(f"--config {path} could not be parsed: {problem}")


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "0"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be positive"),
    (["--hidden-dim", "30", "--num-heads", "4"], "--num-heads 4 must divide --hidden-dim 30"),
    (["--dropout", "1.5"], "--dropout must be in"),
])
def test_invalid_values_name_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(flags)


def test_invalid_value_on_the_command_line_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_in_process(main, ["--lr", "-1", "--save-dir", str(tmp_path / "s")])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --lr must be positive, got -1.0"
    assert not (tmp_path / "s").exists()


def test_round_trip_through_a_dict() -> None:
    cfg = TrainConfig(lr=0.5, hidden_dim=8, num_heads=2, feature_dim=3, seq_len=4, num_classes=2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_run_name_is_stable_and_follows_what_is_trained() -> None:
    a, _ = parse_config(["--lr", "1e-3"])
    b, _ = parse_config(["--lr", "1e-3", "--save-dir", "/elsewhere", "--max-failures", "9"])
    c, _ = parse_config(["--lr", "2e-3"])
    d, _ = parse_config(["--lr", "1e-3", "--resume-from-checkpoint", "x.pt"])
    assert a.default_run_name() == b.default_run_name()  # where it is stored does not change what it is
    assert len({a.default_run_name(), c.default_run_name(), d.default_run_name()}) == 3


def test_run_names_survive_new_settings() -> None:
    # Pinned: run-47c1babf is what this command was named before --reset-optimizer and --restart-schedule
    # existed. A rename would make the same command start a new run instead of continuing its own.
    cfg, _ = parse_config(["--data", "/data/x.pkl", "--epochs", "5"])
    assert cfg.default_run_name() == "run-47c1babf"
    changed, _ = parse_config(["--data", "/data/x.pkl", "--epochs", "5", "--reset-optimizer"])
    assert changed.default_run_name() != "run-47c1babf"  # a new setting counts once it is used


def test_every_setting_is_in_one_section_and_a_config_file_may_group_them(tmp_path: Path) -> None:
    from raytrain_app.cli.flags import parse_config
    from raytrain_app.core.config import config_sections

    sections = config_sections()
    names = [f.name for section in sections.values() for f in section]
    assert sorted(names) == sorted(f.name for f in cli_fields()) and len(names) == len(set(names))
    assert [f.name for f in sections["model"]][:2] == ["model", "model_args"] and "lr" in {f.name for f in
                                                                                           sections["optim"]}
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text("data:\n  data: d.pkl\nmodel:\n  model: examples.conv_classifier.model:spec\n"
                       "  model_args: {channels: 8}\noptim:\n  lr: 0.0003\n  epochs: 7\nlogging:\n  use-wandb: true\n")
    flat = tmp_path / "flat.toml"
    flat.write_text('data = "d.pkl"\nmodel = "examples.conv_classifier.model:spec"\nlr = 0.0003\nepochs = 7\n'
                    "use_wandb = true\n[model_args]\nchannels = 8\n")
    assert parse_config(["--config", str(grouped)]) == parse_config(["--config", str(flat)])
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 0.1\noptim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="sets lr twice"):
        parse_config(["--config", str(twice)])
