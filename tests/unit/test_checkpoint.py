"""The checkpoint format: writing, atomic best_model.pt, and resolving what --resume-from-checkpoint names."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import (
    CheckpointError,
    checkpoint_problem,
    load_state,
    save_checkpoint_dir,
    write_best_model,
)
from raytrain_app.checkpoint.resolve import last_good_checkpoint, resolve_checkpoint
from raytrain_app.ray_adapter.run_record import plan_recovery, recover_run
from tests.helpers import FileEvents, checkpoint_state, flip_a_byte, ray_run


def make_run(run_dir: Path, losses: dict[int, float]) -> None:
    for step, loss in losses.items():
        save_checkpoint_dir(str(run_dir / f"checkpoint_step={step:06d}"), checkpoint_state(step, loss))
    latest = max(losses)
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": f"checkpoint_step={latest:06d}"}}))


def test_checkpoint_dir_round_trip(tmp_path: Path) -> None:
    save_checkpoint_dir(str(tmp_path / "c"), checkpoint_state(7, 0.5))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "meta.json", "state.pt"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]
    raw = (tmp_path / "c" / "state.pt").read_bytes()
    assert manifest["state.pt"] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert checkpoint_problem(str(tmp_path / "c")) is None
    loaded = load_state(str(tmp_path / "c" / "state.pt"))
    assert loaded["global_step"] == 7 and torch.equal(loaded["model_state_dict"]["w"], torch.full((2,), 7.0))
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["eval_val_loss"] == 0.5


def test_best_model_is_replaced_whole_and_a_failed_write_keeps_the_old_one(tmp_path: Path) -> None:
    write_best_model(str(tmp_path), checkpoint_state(1, 0.9))
    write_best_model(str(tmp_path), checkpoint_state(2, 0.8))
    assert load_state(str(tmp_path / "best_model.pt"))["global_step"] == 2
    # torch.save fails mid-write: a lock cannot be pickled (the same TypeError on every Python the project supports)
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object"):
        write_best_model(str(tmp_path), {**checkpoint_state(3, 0.7), "bad": threading.Lock()})
    assert load_state(str(tmp_path / "best_model.pt"))["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt"]  # no temporary left behind


def test_resolve_each_kind_of_location(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir, {3: 0.9, 6: 0.4, 9: 0.6})
    assert resolve_checkpoint(str(run_dir)).uri == str(run_dir / "checkpoint_step=000006" / "state.pt")  # the best
    assert resolve_checkpoint(str(run_dir / "checkpoint_step=000009")).uri == str(
        run_dir / "checkpoint_step=000009" / "state.pt")
    torch.save(checkpoint_state(1, 1.0), tmp_path / "model.pt")
    assert resolve_checkpoint(str(tmp_path / "model.pt")).uri == str(tmp_path / "model.pt")
    assert resolve_checkpoint(str(tmp_path / "missing.pt")) is None


def test_folder_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a folder without a checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save(checkpoint_state(1, 1.0), tmp_path / "full.pt")
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
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model_state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_state(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_published_files_are_readable_by_others_as_the_umask_allows(tmp_path) -> None:
    import os

    from raytrain_app.checkpoint.format import write_best_model
    from raytrain_app.storage.location import parse_location
    from raytrain_app.storage.publish import _UMASK, publish_bytes

    best = write_best_model(str(tmp_path), {"model_state_dict": {}})
    publish_bytes(b"{}", parse_location(str(tmp_path / "sweep.json")))
    for path in (best.path, str(tmp_path / "sweep.json")):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~_UMASK  # not mkstemp's owner-only 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt", "sweep.json"]  # no temporary left


def cut_off(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda d: cut_off(d / "state.pt"), "state.pt is .* bytes, its manifest says"),
    (lambda d: flip_a_byte(d / "state.pt"), "state.pt does not match the SHA-256"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
    (lambda d: shutil.rmtree(d), "does not exist"),
])
def test_a_checkpoint_that_is_not_whole_is_named_with_its_problem(tmp_path: Path, damage, problem: str) -> None:
    folder = tmp_path / "checkpoint_step=000005"
    save_checkpoint_dir(str(folder), checkpoint_state(5, 0.5))
    damage(folder)
    assert re.search(problem, checkpoint_problem(str(folder)))
    if folder.exists():
        with pytest.raises(CheckpointError, match=f"{folder} is not whole"):
            resolve_checkpoint(str(folder))


def test_a_checkpoint_written_before_manifests_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint_step=000005"
    save_checkpoint_dir(str(folder), checkpoint_state(5, 0.5))
    (folder / "manifest.json").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert checkpoint_problem(str(folder)) is None


@pytest.mark.parametrize("damage", [cut_off, flip_a_byte, Path.unlink])
def test_a_broken_latest_checkpoint_falls_back_and_rays_record_follows(tmp_path: Path, damage, capsys) -> None:
    snapshot_file = ray_run(tmp_path / "run", [4, 8, 12])
    damage(tmp_path / "run" / "checkpoint_step=000012" / "state.pt")
    chosen = recover_run(str(tmp_path / "run"))
    assert chosen.path == str(tmp_path / "run" / "checkpoint_step=000008" / "state.pt")
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'run' / 'checkpoint_step=000012'} is not whole" in out
    snapshot = json.loads(snapshot_file.read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_step=000008"
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == [
        "checkpoint_step=000004", "checkpoint_step=000008"]
    assert snapshot["checkpoint_report_indices"] == [0, 1]
    # Ray's own reader takes the rewritten record (it refuses one naming a folder that is gone).
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
    _CheckpointManagerState.model_validate(snapshot)
    assert recover_run(str(tmp_path / "run")).path == chosen.path  # whole now: nothing more to say
    assert "not whole" not in capsys.readouterr().out


def test_a_run_with_no_whole_checkpoint_stops_and_changes_nothing(tmp_path: Path) -> None:
    snapshot_file = ray_run(tmp_path / "run", [4, 8])
    for step in (4, 8):
        cut_off(tmp_path / "run" / f"checkpoint_step={step:06d}" / "state.pt")
    before = snapshot_file.read_bytes()
    with pytest.raises(CheckpointError, match="has no whole checkpoint left"):
        recover_run(str(tmp_path / "run"))
    assert snapshot_file.read_bytes() == before


def test_the_best_checkpoint_of_a_run_folder_skips_a_broken_one(tmp_path: Path) -> None:
    ray_run(tmp_path / "run", [4, 8, 12])  # the loss is 1/step: step 12 is the best
    flip_a_byte(tmp_path / "run" / "checkpoint_step=000012" / "state.pt")
    assert resolve_checkpoint(str(tmp_path / "run")).path.endswith("checkpoint_step=000008/state.pt")


def ray_checkpoint_manager(run_dir: Path, keep: int, score: str = "val_loss", order: str = "min"):
    """Ray Train's own checkpoint manager, loading the run folder's record exactly as a restarted run does."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    config = CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=score, checkpoint_score_order=order)
    return CheckpointManager(checkpoint_config=config,
                             storage_context=StorageContext(storage_path=str(run_dir.parent),
                                                            experiment_dir_name=run_dir.name))


def register_with_ray(manager, folder: Path, metrics: dict) -> None:
    """Report a new checkpoint to Ray Train's checkpoint manager, as a run does (it then deletes what it keeps no
    more)."""
    import asyncio

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    async def register() -> None:
        manager.register_checkpoint(_TrainingReport(checkpoint=Checkpoint(path=str(folder)), metrics=metrics,
                                                    validation=False))

    asyncio.run(register())


@pytest.mark.parametrize("damage", [cut_off, flip_a_byte, Path.unlink])
def test_a_damaged_or_missing_ray_record_is_rebuilt_in_rays_own_order(tmp_path: Path, damage, capsys) -> None:
    """Ray writes its record in place: a kill during that write leaves it cut off (or, before the first one,
    missing), and Ray then refuses to start, or starts over. The rebuilt record loads in Ray's own checkpoint
    manager, names the newest whole checkpoint, and keeps Ray's order (worst loss first), so the checkpoint Ray
    deletes next is the worst, never the best."""
    run = tmp_path / "run"
    losses = {4: 0.4, 8: 0.6, 12: 0.5, 16: 0.7}  # not in step order
    for step, loss in losses.items():
        save_checkpoint_dir(str(run / f"checkpoint_step={step:06d}"),
                            {**checkpoint_state(step, loss), "eval_val_loss": loss})
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    damage(run / "checkpoint_manager_snapshot.json")
    cut_off(run / "checkpoint_step=000016" / "state.pt")  # and the newest folder was never finished
    recovery = plan_recovery(str(run))
    assert recovery.state.path.endswith("checkpoint_step=000012/state.pt")
    assert "rebuilding it from the run's 3 whole checkpoint(s)" in capsys.readouterr().out
    recovery.apply()

    manager = ray_checkpoint_manager(run, keep=1)
    assert manager.latest_checkpoint_result.metrics["global_step"] == 12
    assert [r.metrics["global_step"] for r in manager._checkpoint_results] == [8, 12, 4]  # worst first
    save_checkpoint_dir(str(run / "checkpoint_step=000020"), {**checkpoint_state(20, 0.45), "eval_val_loss": 0.45})
    register_with_ray(manager, run / "checkpoint_step=000020", {"val_loss": 0.45})
    assert {p.name for p in run.glob("checkpoint_step=*")} == {
        "checkpoint_step=000004", "checkpoint_step=000016", "checkpoint_step=000020"}  # 16: never recorded


def test_a_run_selecting_by_accuracy_is_rebuilt_and_resolved_by_accuracy(tmp_path: Path) -> None:
    """--select-metric val_accuracy: the rebuilt record keeps Ray's order for that score (lowest accuracy first),
    Ray then deletes the least accurate, and the run folder's best checkpoint is its most accurate one."""
    run = tmp_path / "run"
    accuracies = {4: 0.7, 8: 0.5, 12: 0.6}  # the losses rank them the other way round
    for step, accuracy in accuracies.items():
        save_checkpoint_dir(str(run / f"checkpoint_step={step:06d}"), {
            **checkpoint_state(step, accuracy), "eval_val_accuracy": accuracy,
            "config": {"select_metric": "val_accuracy"}})
    (run / "checkpoint_manager_snapshot.json").write_text("{")
    plan_recovery(str(run), warn=lambda line: None).apply()
    assert resolve_checkpoint(str(run)).path.endswith("checkpoint_step=000004/state.pt")
    manager = ray_checkpoint_manager(run, keep=1, score="val_accuracy", order="max")
    assert [r.metrics["global_step"] for r in manager._checkpoint_results] == [8, 12, 4]  # worst first
    save_checkpoint_dir(str(run / "checkpoint_step=000020"), {**checkpoint_state(20, 0.1), "eval_val_accuracy": 0.55})
    register_with_ray(manager, run / "checkpoint_step=000020", {"val_accuracy": 0.55})
    assert {p.name for p in run.glob("checkpoint_step=*")} == {"checkpoint_step=000004", "checkpoint_step=000020"}


def test_a_regression_run_selecting_by_rmse_is_rebuilt_and_resolved_by_the_lowest_rmse(tmp_path: Path) -> None:
    """--select-metric val_rmse: the rebuilt record holds eval_val_rmse and keeps Ray's order for it (the highest
    RMSE first: an error, lower is better), Ray then deletes the highest, and the run folder's best
    checkpoint is the one with the lowest RMSE."""
    run = tmp_path / "run"
    rmses = {4: 0.5, 8: 0.7, 12: 0.6}  # the losses rank them the other way round
    for step, rmse in rmses.items():
        save_checkpoint_dir(str(run / f"checkpoint_step={step:06d}"), {
            **checkpoint_state(step, 1 - rmse), "eval_val_rmse": rmse, "val_rmse": min(rmses.values()),
            "eval_val_mae": rmse / 2, "val_mae": 0.25, "config": {"select_metric": "val_rmse", "task": "regression"}})
    (run / "checkpoint_manager_snapshot.json").write_text("{")
    plan_recovery(str(run), warn=lambda line: None).apply()
    assert resolve_checkpoint(str(run)).path.endswith("checkpoint_step=000004/state.pt")
    manager = ray_checkpoint_manager(run, keep=1, score="val_rmse", order="min")
    assert [r.metrics["global_step"] for r in manager._checkpoint_results] == [8, 12, 4]  # worst first
    assert manager._checkpoint_results[0].metrics["val_mae"] == 0.35
    assert "val_accuracy" not in manager._checkpoint_results[0].metrics
    save_checkpoint_dir(str(run / "checkpoint_step=000020"), {**checkpoint_state(20, 0.1), "eval_val_rmse": 0.55,
                                                              "val_rmse": 0.5, "config": {"task": "regression"}})
    register_with_ray(manager, run / "checkpoint_step=000020", {"val_rmse": 0.55})
    assert {p.name for p in run.glob("checkpoint_step=*")} == {"checkpoint_step=000004", "checkpoint_step=000020"}


def test_a_damaged_manifest_or_meta_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint_step=000005"
    save_checkpoint_dir(str(folder), checkpoint_state(5, 0.5))
    (folder / "manifest.json").write_text(json.dumps({"files": {"state.pt": {"sizf": 1}}}))
    assert checkpoint_problem(str(folder)) == "its manifest.json is damaged"
    flip_a_byte(folder / "manifest.json")
    flip_a_byte(folder / "meta.json")
    assert "no manifest.json" in checkpoint_problem(str(folder))


def test_the_last_good_checkpoint_is_the_newest_validated_with_a_finite_loss(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step, loss in {4: 0.5, 8: 0.4, 12: None, 16: None}.items():  # 12: not finite (or not validated)
        save_checkpoint_dir(str(run / f"checkpoint_step={step:06d}"),
                            {**checkpoint_state(step, 0.4), "eval_val_loss": loss})
    assert last_good_checkpoint(str(run), before_step=17).path.endswith("checkpoint_step=000008")
    assert last_good_checkpoint(str(run), before_step=8).path.endswith("checkpoint_step=000004")
    flip_a_byte(run / "checkpoint_step=000008" / "state.pt")
    assert last_good_checkpoint(str(run), before_step=17).path.endswith("checkpoint_step=000004")
    assert last_good_checkpoint(str(run), before_step=4) is None


def test_a_process_killed_while_writing_best_model_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """A real process SIGKILLed in the middle of writing a 400 MB best_model.pt: the file a later load finds is
    the previous one, whole; the cut-off bytes are only in a temporary file no load looks at."""
    write_best_model(str(tmp_path), checkpoint_state(1, 0.9))
    script = ("import sys, torch\n"
              "from raytrain_app.checkpoint.format import write_best_model\n"
              "write_best_model(sys.argv[1], {'epoch': 1, 'global_step': 2, 'val_loss': 0.5, 'config': {},\n"
              "                               'model_state_dict': {'w': torch.ones(100_000_000)}})\n")
    events = FileEvents()  # woken at every write in the folder: the write lasts well under a second
    events.watch(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 1 << 20 for p in tmp_path.glob(".best_model.pt.*.tmp")):
            assert proc.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "no temporary best_model.pt of more than 1 MiB within 60 s"
            events.wait(timeout=0.1)
    finally:
        proc.kill()
        proc.wait()
        events.close()
    assert load_state(str(tmp_path / "best_model.pt"))["global_step"] == 1
    assert resolve_checkpoint(str(tmp_path / "best_model.pt")).path == str(tmp_path / "best_model.pt")
