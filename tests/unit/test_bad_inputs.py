"""Every mistake a user can make with `python -m raytrain_app.main` that is found before Ray is involved, made for
real: one line on stderr naming the input and the cause, a non-zero exit, no traceback, and no file written or
changed. Those that need a cluster to be found: tests/integration/test_bad_inputs.py.

They run `raytrain_app.main.main` (what `python -m` runs and passes to sys.exit) in this process: a process start
each would cost a minute of the suite."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.main import main
from tests.conftest import run_main, write_dataset
from tests.helpers import PLUGIN, TINY_MODEL, flip_a_byte, ray_run, tree

SHAPES = {"feature_dim": 4, "seq_len": 8, "num_classes": 3}


def dump(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def arrays(n: int = 64, x: np.ndarray | None = None, y: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 8, 4)).astype(np.float32) if x is None else x,
            "y": rng.integers(0, 3, n) if y is None else y}


def checkpoint(path: Path, **arch: int) -> Path:
    """A training checkpoint of the tiny model (or of other `arch` values) for the 4-feature test data."""
    cfg = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, **SHAPES, **arch)
    torch.save({"epoch": 1, "global_step": 8, "model_state_dict": SequenceTransformer(cfg).state_dict(),
                "config": cfg.to_dict()}, path)
    return path


def checkpoint_folder(folder: Path, extra: dict | None = None, damaged: bool = False) -> Path:
    """A checkpoint folder whose manifest matches its files, as a run writes it, but whose state.pt cannot be
    loaded: it holds `extra` (pickled code), or its bytes were `damaged` before the manifest was written."""
    from raytrain_app.checkpoint.format import MANIFEST_FILE, save_checkpoint_dir

    state = torch.load(checkpoint(folder.parent / f"{folder.name}.pt"), weights_only=True)
    save_checkpoint_dir(str(folder), {"val_loss": 0.5, **state, **(extra or {})})
    if damaged:  # cut short, and the manifest rewritten to match: only loading it can tell
        state_file = folder / "state.pt"
        state_file.write_bytes(state_file.read_bytes()[:-100])
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(state_file.read_bytes()).hexdigest(),
                                         "size": state_file.stat().st_size}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


class RunsCode:
    """A pickle that would create a file when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


# Each case: (set-up that writes its inputs into the folder and returns the flags, what the message says).
# --data defaults to a good dataset in the folder unless the flags name another.
Case = tuple[Callable[[Path], list[str]], str]
CASES: dict[str, Case] = {
    "missing data file": (lambda d: ["--data", str(d / "nope.pkl")], r"--data file not found: .*nope\.pkl"),
    "not a pickle": (lambda d: ["--data", str(_write(d / "notes.pkl", b"just text"))],
                     r"--data .*notes\.pkl is not a readable pickle"),
    "pickle that would run code": (lambda d: ["--data", str(dump(d / "evil.pkl", RunsCode(d / "pwned")))],
                                   r"--data .*evil\.pkl: refusing to load posix\.system"),
    "wrong keys": (lambda d: ["--data", str(dump(d / "keys.pkl", {"training": arrays()}))],
                   r"--data .*keys\.pkl must hold keys 'train'"),
    "wrong dimensions": (
        lambda d: ["--data", str(dump(d / "dims.pkl", {"train": arrays(x=np.zeros(64, np.float32))}))],
        r"--data .*dims\.pkl: train\.x must be \[N, \.\.\.\] with at least one axis after N \(\[N, F\] rows, "
        r"\[N, T, F\] sequences\), got shape \(64,\)"),
    "wrong dtype": (lambda d: ["--data", str(dump(d / "dtype.pkl", {"train": arrays(y=np.zeros(64, np.bool_))}))],
                    r"--data .*dtype\.pkl: train\.y must be an integer array"),
    "labels outside the class range": (
        lambda d: ["--data", str(dump(d / "labels.pkl", {"train": arrays(y=np.full(64, 5)), "num_classes": 3}))],
        r"--data .*labels\.pkl: labels must be in \[0, 3\), found values from 5 to 5"),
    "NaN in the features": (
        lambda d: ["--data", str(dump(d / "nan.pkl", {"train": arrays(x=np.full((64, 8, 4), np.nan, np.float32))}))],
        r"--data .*nan\.pkl: train\.x contains NaN or inf"),
    "empty split": (lambda d: ["--data", str(dump(d / "empty.pkl", {"train": arrays(), "val": arrays(n=0)}))],
                    r"--data .*empty\.pkl: val is empty"),
    "checkpoint folder without a checkpoint": (
        lambda d: ["--resume-from-checkpoint", str(_mkdir(d / "somewhere"))],
        r"--resume-from-checkpoint .*somewhere is a folder without a checkpoint"),
    "truncated .pt": (lambda d: ["--resume-from-checkpoint", str(_truncate(checkpoint(d / "cut.pt")))],
                      r"cut\.pt is not a readable checkpoint"),
    ".pt of a different model": (
        lambda d: ["--resume-from-checkpoint", str(_foreign(d / "other.pt"))],
        r"checkpoint .*other\.pt holds a different model \(missing .*; pass the architecture flags"),
    ".pt that is not a training checkpoint": (
        lambda d: ["--resume-from-checkpoint", str(_save(d / "weights.pt", {"w": torch.zeros(2)}))],
        r"weights\.pt is not a training checkpoint: it has no 'model_state_dict'"),
    "architecture mismatch": (
        lambda d: ["--resume-from-checkpoint", str(checkpoint(d / "base.pt")), "--hidden-dim", "32"],
        r"checkpoint .*base\.pt does not fit this model: --hidden-dim 32 \(checkpoint has 16\)"),
    "feature-dimension mismatch": (
        lambda d: ["--resume-from-checkpoint", str(checkpoint(d / "base.pt")),
                   "--data", str(write_dataset(d / "wide.pkl", feature_dim=5))],
        r"checkpoint .*base\.pt does not fit this model: dataset feature dimension 5 \(checkpoint has 4\)"),
    "zero learning rate": (lambda d: ["--lr", "0"], r"--lr must be positive, got 0"),
    "negative batch size": (lambda d: ["--batch-size", "-4"], r"--batch-size must be positive, got -4"),
    "zero epochs": (lambda d: ["--epochs", "0"], r"--epochs must be positive, got 0"),
    "zero accumulation steps": (lambda d: ["--grad-accum-steps", "0"], r"--grad-accum-steps must be positive, got 0"),
    "heads not dividing the width": (lambda d: ["--num-heads", "3"], r"--num-heads 3 must divide --hidden-dim 16"),
    "unknown key in --config": (
        lambda d: ["--config", str(_write(d / "c.yaml", b"lr: 0.001\nlearning_rate: 3\n"))],
        r"unknown key\(s\) in .*c\.yaml: learning_rate"),
    "unknown URI scheme": (lambda d: ["--save-dir", "ftp://host/runs"],
                           r"--save-dir ftp://host/runs: unknown URI scheme"),
    "checkpoint folder whose state.pt would run code": (
        lambda d: ["--resume-from-checkpoint", str(checkpoint_folder(d / "evil", {"extra": RunsCode(d / "pwned")}))],
        r"evil/state\.pt is not a readable checkpoint \(Weights only load failed"),
    "checkpoint folder whose state.pt is damaged": (
        lambda d: ["--resume-from-checkpoint", str(checkpoint_folder(d / "cut", damaged=True))],
        r"cut/state\.pt is not a readable checkpoint"),
    # A model of a user's own (--model), refused before any worker starts.
    "a model that cannot be imported": (
        lambda d: ["--model", "my_models.nowhere:spec"],
        r"--model my_models\.nowhere:spec: cannot import my_models\.nowhere \(ModuleNotFoundError: No module named "
        r"'my_models'\); it must be importable where the command runs and on every node"),
    "a name that is not a spec": (lambda d: ["--model", "tests.plugins:not_a_spec"],
                                  r"tests\.plugins\.not_a_spec must be a raytrain_app ModelSpec, found str"),
    "a spec that does not build": (
        lambda d: ["--model", "tests.plugins:broken_build"],
        r"--model tests\.plugins:broken_build did not build for inputs \[8, 4\]: RuntimeError: out of ideas"),
    "inputs the model rejects": (
        lambda d: ["--model", "tests.plugins:rejects_shape"],
        r"--model tests\.plugins:rejects_shape rejects inputs of shape \[2, 8, 4\] from --data: RuntimeError: "),
    "outputs that are not class scores": (
        lambda d: ["--model", "tests.plugins:wrong_outputs"],
        r"returns \[2, 1\] for inputs \[2, 8, 4\]; a classification model must return \[2, 3\]"),
    "settings the model does not have": (
        lambda d: ["--model", PLUGIN, "--model-args", "channels=8,depth=3"],
        rf"--model-args: {re.escape(PLUGIN)} has no setting depth \(it has channels, num_blocks, kernel_size\)"),
    "a setting the model's own check refuses": (
        lambda d: ["--model", PLUGIN, "--model-args", "kernel_size=4"],
        r"ValueError: kernel_size must be odd"),
    "a checkpoint of another model": (
        lambda d: ["--model", PLUGIN, "--resume-from-checkpoint", str(checkpoint(d / "base.pt"))],
        r"checkpoint .*base\.pt holds a model of --model transformer, not examples\.conv_classifier\.model:spec: "
        r"drop --model to continue that model"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not a checkpoint")
    return path


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _foreign(path: Path) -> Path:
    return _save(path, {"epoch": 1, "model_state_dict": torch.nn.Linear(4, 3).state_dict()})


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_gets_one_line_a_non_zero_exit_and_writes_nothing(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    setup, message = CASES[case]
    flags = setup(tmp_path)
    if "--data" not in flags:
        flags += ["--data", str(write_dataset(tmp_path / "good.pkl"))]
    if "--save-dir" not in flags:
        flags += ["--save-dir", str(tmp_path / "runs")]
    argv = [*TINY_MODEL, "--num-workers", "1", "--epochs", "2", *flags]
    before = tree(tmp_path)
    code = main(argv)
    stdout, stderr = capsys.readouterr()
    output = stdout + stderr
    assert code == 2, output
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), output
    assert stderr.strip() == errors[0], output  # the only line on stderr: no traceback, nothing else
    assert "Traceback" not in output
    assert tree(tmp_path) == before  # nothing written or changed: no run folder, no best_model.pt, no marker
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists()


def test_debug_shows_the_traceback_with_the_same_line(tmp_path: Path) -> None:
    result = run_main(["--data", str(tmp_path / "nope.pkl"), "--debug"], timeout=120)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --data file not found")


def test_a_run_with_no_whole_checkpoint_left_stops_with_one_line_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same command again, when every checkpoint of its run is damaged: exit 2, the run named, nothing
    changed (not Ray's record of the run either)."""
    from raytrain_app.checkpoint.format import save_checkpoint_dir
    from raytrain_app.cli.flags import parse_config

    argv = [*TINY_MODEL, "--data", str(write_dataset(tmp_path / "good.pkl")), "--save-dir", str(tmp_path / "runs")]
    run_dir = tmp_path / "runs" / parse_config(argv)[0].default_run_name()
    ray_run(run_dir, [4, 8])
    for step in (4, 8):
        save_checkpoint_dir(str(run_dir / f"checkpoint_step={step:06d}"), {
            **load_state_of(checkpoint(tmp_path / "base.pt")), "global_step": step, "val_loss": 0.5})
        flip_a_byte(run_dir / f"checkpoint_step={step:06d}" / "state.pt")
    before = tree(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (f"error: run {run_dir} has no whole checkpoint left (checkpoint_step=000004, "
                           "checkpoint_step=000008 checked); nothing was changed. Start it anew under another "
                           "--run-name, or restore the folder from a backup.")
    assert f"checkpoint {run_dir / 'checkpoint_step=000008'} is not whole: state.pt does not match" in out
    assert tree(tmp_path) == before


def load_state_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)
