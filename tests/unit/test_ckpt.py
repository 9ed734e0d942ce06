"""`python -m raytrain_app.ckpt show|export` on what --resume-from-checkpoint accepts, local and on S3."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import save_checkpoint_dir, write_best_model
from raytrain_app.checkpoint.state import training_state
from raytrain_app.ckpt import main
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from raytrain_app.storage.location import parse_location
from raytrain_app.storage.publish import publish_file
from tests.conftest import make_bucket, s3_uri
from tests.unit.test_checkpoint import flip_a_byte

CFG = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3,
                  num_workers=1, dropout=0.0)


def trained_state(step: int = 12) -> dict:
    """A full training state (the loop's own state_dict) after a few real optimizer steps."""
    seed_everything(0, 0)
    model = SequenceTransformer(CFG)
    trainer = Trainer(CFG, model, model, torch.device("cpu"))
    x, y = torch.randn(16, 8, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        trainer.train_step([(x, y)])
    trainer.global_step, trainer.epoch, trainer.best_val_loss = step, 1, 0.75
    trainer.lineage = {"base_checkpoint": "s3://b/base/state.pt", "base_global_step": 8, "base_epoch": 1,
                       "base_sha256": "ab" * 32, "base_lineage": None}
    return training_state(trainer, eval_val_loss=0.8)


def outputs(state_dict: dict) -> torch.Tensor:
    model = SequenceTransformer(CFG).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * 8 * 4).reshape(2, 8, 4))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "run-x"
    save_checkpoint_dir(str(run_dir / "checkpoint_step=000012"), trained_state())
    write_best_model(str(tmp_path / "runs"), trained_state())
    return run_dir


@pytest.mark.parametrize("which", ["folder", "state.pt", "run folder", "best_model.pt"])
def test_show_prints_what_a_checkpoint_holds(run: Path, which: str, capsys: pytest.CaptureFixture) -> None:
    where = {"folder": run / "checkpoint_step=000012", "state.pt": run / "checkpoint_step=000012" / "state.pt",
             "run folder": run, "best_model.pt": run.parent / "best_model.pt"}[which]
    assert main(["show", str(where)]) == 0
    out = capsys.readouterr().out
    assert "Epoch: 1 complete; global step 12" in out
    assert "Validation loss at this checkpoint: 0.800000; best so far: 0.750000" in out
    assert "--hidden-dim 16 --num-layers 2 --num-heads 2" in out
    assert re.search(r"Model: 6,851 parameters; state file \d+\.\d KB; optimizer state\n", out)
    assert "Lineage: from s3://b/base/state.pt at global step 8 (SHA-256 abababababab...)" in out
    whole = "Manifest: whole (every file matches manifest.json)"
    assert (whole in out) == (which != "best_model.pt")


def test_show_names_a_damaged_folder_and_a_missing_one(run: Path, capsys: pytest.CaptureFixture) -> None:
    flip_a_byte(run / "checkpoint_step=000012" / "meta.json")
    assert main(["show", str(run / "checkpoint_step=000012" / "state.pt")]) == 0
    assert "Manifest: NOT WHOLE: meta.json does not match the SHA-256 in its manifest" in capsys.readouterr().out
    assert main(["show", str(run / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: X {run / 'nope'}: nothing there"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_exported_weights_give_the_checkpoints_outputs(run: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run), "--format", fmt, str(out)]) == 0
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        weights = load_file(str(out))
        with safe_open(str(out), "pt") as f:
            config = json.loads(f.metadata()["config"])
    else:
        exported = torch.load(out, weights_only=True)
        weights, config = exported["model_state_dict"], exported["config"]
    assert set(exported_keys := weights) == set(trained_state()["model_state_dict"]) and exported_keys
    assert (config["hidden_dim"], config["num_layers"]) == (16, 2)  # enough to build the model
    assert torch.equal(outputs(weights), outputs(trained_state()["model_state_dict"]))


def test_show_and_export_on_s3(tmp_path: Path, s3_endpoint: str, capsys: pytest.CaptureFixture) -> None:
    local = tmp_path / "checkpoint_step=000012"
    save_checkpoint_dir(str(local), trained_state())
    bucket = make_bucket(s3_endpoint, "inspect")
    folder = parse_location(s3_uri(bucket, "runs/run-x/checkpoint_step=000012", s3_endpoint))
    for name in ("state.pt", "meta.json", "manifest.json"):
        publish_file(str(local / name), folder.join(name))
    assert main(["show", folder.uri]) == 0
    out = capsys.readouterr().out
    assert "global step 12" in out and "Manifest: whole" in out
    target = parse_location(s3_uri(bucket, "exports/model.safetensors", s3_endpoint))
    assert main(["export", folder.uri, "--format", "safetensors", target.uri]) == 0
    from safetensors.torch import load

    assert torch.equal(outputs(load(target.read_bytes())), outputs(trained_state()["model_state_dict"]))
