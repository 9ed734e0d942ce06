"""The checkpoint format: writing, atomic best_model.pt, and resolving what --resume-from-checkpoint names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint import (
    CheckpointError,
    load_state,
    resolve_checkpoint,
    save_checkpoint_dir,
    write_best_model,
)


def state(step: int, eval_loss: float) -> dict:
    return {"epoch": 1, "global_step": step, "model_state_dict": {"w": torch.full((2,), float(step))},
            "val_loss": eval_loss, "eval_val_loss": eval_loss, "config": {}}


def make_run(run_dir: Path, losses: dict[int, float]) -> None:
    for step, loss in losses.items():
        save_checkpoint_dir(str(run_dir / f"checkpoint_step={step:06d}"), state(step, loss))
    latest = max(losses)
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": f"checkpoint_step={latest:06d}"}}))


def test_checkpoint_dir_round_trip(tmp_path: Path) -> None:
    save_checkpoint_dir(str(tmp_path / "c"), state(7, 0.5))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json", "state.pt"]
    loaded = load_state(str(tmp_path / "c" / "state.pt"))
    assert loaded["global_step"] == 7 and torch.equal(loaded["model_state_dict"]["w"], torch.full((2,), 7.0))
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["eval_val_loss"] == 0.5


def test_best_model_is_replaced_whole_and_a_failed_write_keeps_the_old_one(tmp_path: Path) -> None:
    write_best_model(str(tmp_path), state(1, 0.9))
    write_best_model(str(tmp_path), state(2, 0.8))
    assert load_state(str(tmp_path / "best_model.pt"))["global_step"] == 2
    with pytest.raises(Exception):  # noqa: B017 - torch.save of something unpicklable fails mid-write
        write_best_model(str(tmp_path), {**state(3, 0.7), "bad": lambda: None})
    assert load_state(str(tmp_path / "best_model.pt"))["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt"]  # no temporary left behind


def test_resolve_each_kind_of_location(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir, {3: 0.9, 6: 0.4, 9: 0.6})
    assert resolve_checkpoint(str(run_dir)).uri == str(run_dir / "checkpoint_step=000006" / "state.pt")  # the best
    assert resolve_checkpoint(str(run_dir / "checkpoint_step=000009")).uri == str(
        run_dir / "checkpoint_step=000009" / "state.pt")
    torch.save(state(1, 1.0), tmp_path / "model.pt")
    assert resolve_checkpoint(str(tmp_path / "model.pt")).uri == str(tmp_path / "model.pt")
    assert resolve_checkpoint(str(tmp_path / "missing.pt")) is None


def test_folder_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a folder without a checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save(state(1, 1.0), tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is not a readable checkpoint"):
        load_state(str(tmp_path / "cut.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="has no 'model_state_dict'"):
        load_state(str(tmp_path / "other.pt"))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path: Path) -> None:
    import os

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model_state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_state(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_published_files_are_readable_by_others_as_the_umask_allows(tmp_path) -> None:  # noqa: ANN001
    import os

    from raytrain_app.checkpoint import _UMASK, publish_bytes, write_best_model
    from raytrain_app.storage import parse_location

    best = write_best_model(str(tmp_path), {"model_state_dict": {}})
    publish_bytes(b"{}", parse_location(str(tmp_path / "sweep.json")))
    for path in (best.path, str(tmp_path / "sweep.json")):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~_UMASK  # not mkstemp's owner-only 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt", "sweep.json"]  # no temporary left
