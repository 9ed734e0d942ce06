"""`python -m raytrain_app.ckpt show|export` on what --resume-from-checkpoint accepts, in local folders (on S3:
tests/integration/test_ckpt.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import save_checkpoint_dir, write_best_model
from raytrain_app.ckpt import main
from tests.helpers import flip_a_byte, outputs, trained_state


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


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_model_gives_a_ready_module_from_a_checkpoint_or_an_export(run: Path, tmp_path: Path, fmt: str) -> None:
    """The Python API's load_model: a run folder (its best checkpoint) or an exported file, in eval mode, with the
    checkpoint's outputs."""
    import raytrain_app as rt

    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run), "--format", fmt, str(out)]) == 0
    expected = outputs(trained_state()["model_state_dict"])
    for where in (run, out):
        model = rt.load_model(str(where))
        assert not model.training
        with torch.no_grad():
            assert torch.equal(model(torch.linspace(-1, 1, 2 * 8 * 4).reshape(2, 8, 4)), expected), where


def test_show_prints_the_tasks_scores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Classification's line names the accuracy; a regression checkpoint's names RMSE and MAE, at the checkpoint
    and the run's best so far."""
    state = trained_state()
    save_checkpoint_dir(str(tmp_path / "c"), state)
    assert main(["show", str(tmp_path / "c")]) == 0
    assert "\nValidation accuracy at this checkpoint: 0.5000; best so far: " in capsys.readouterr().out
    for key in ("eval_val_accuracy", "val_accuracy"):
        state.pop(key, None)
    state.update(eval_val_rmse=0.6421, val_rmse=0.61, eval_val_mae=0.5, val_mae=0.48,
                 config={**state["config"], "task": "regression"})
    save_checkpoint_dir(str(tmp_path / "r"), state)
    assert main(["show", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert ("\nValidation RMSE at this checkpoint: 0.6421; best so far: 0.6100; MAE at this checkpoint: 0.5000; "
            "best so far: 0.4800\n") in out and "accuracy" not in out
