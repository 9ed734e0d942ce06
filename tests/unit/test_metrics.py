"""metrics.jsonl: every step written once across resumes, resume causes, speed figures."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from raytrain_app.core.config import TrainConfig
from raytrain_app.observability.metrics import RunMetrics, flops_per_token, peak_flops_of, prepare_wandb, read_rows
from raytrain_app.storage.location import parse_location

CFG = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, num_workers=1,
                  batch_size=4)


def recorder(run: Path, *, restored: int | None, attempt: str, start: int = 0, wandb_id: str | None = None,
             cfg: TrainConfig = CFG) -> RunMetrics:
    return RunMetrics(cfg, parse_location(str(run)), start_step=start, restored_step=restored, attempt=attempt,
                      fork_of=None, num_params=1000, device=torch.device("cpu"), wandb_run_id=wandb_id)


def train(rec: RunMetrics, steps: range, value: float = 1.0) -> None:
    for step in steps:
        rec.on_step(step, torch.tensor(value / step), 1e-3)


def rows_of(run: Path) -> list[dict]:
    return read_rows(parse_location(str(run / "metrics.jsonl")))


class WandbRun:
    """What wandb.log was given (the rows RunMetrics picks for wandb; the e2e test reads real wandb files)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log(self, row: dict, step: int) -> None:
        self.steps.append(step)


def test_the_file_is_the_history_of_the_weights_and_wandb_never_gets_a_step_twice(tmp_path: Path) -> None:
    run = tmp_path / "run-x"
    first = recorder(run, restored=None, attempt="driver-1")
    first.wandb = WandbRun()
    train(first, range(1, 6))
    first.commit({"step": 5, "epoch": 0, "val_loss": 0.9, **first.speed(1, 1)})
    train(first, range(6, 8))  # trained, then the process died before the next checkpoint
    assert first.wandb.steps == [1, 2, 3, 4, 5]

    # Ray restored the checkpoint at step 3 (the one at 5 had not been registered): steps 4-5 are trained again,
    # here to other values (as after an elastic resize); the file takes them, wandb (which has 4-5) does not.
    again = recorder(run, restored=3, attempt="driver-2", start=3)
    again.wandb = WandbRun()
    train(again, range(4, 10), value=2.0)
    again.commit({"step": 9, "epoch": 1, "val_loss": 0.8})
    rows = rows_of(run)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 10))
    assert [r["train_ema_loss"] for r in train_rows] == pytest.approx([1 / s for s in range(1, 4)]
                                                                      + [2 / s for s in range(4, 10)])
    assert [r["step"] for r in rows if r["kind"] == "checkpoint"] == [9]  # 5's checkpoint was never registered
    assert again.wandb.steps == [6, 7, 8, 9]
    events = [r for r in rows if r["kind"] == "event"]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 3)]
    assert events[1]["cause"].startswith("re-run") and events[1]["wandb_through"] == 5

    # The same driver again (Ray restarted the workers) from step 9, dropping nothing: no rewrite, no duplicates.
    restarted = recorder(run, restored=9, attempt="driver-2", start=9)
    assert restarted.rewrite is False
    restarted.commit({"step": 9, "epoch": 1})  # a preemption save right after the checkpoint: nothing new
    rows = rows_of(run)
    assert rows[-1]["cause"].startswith("worker restart") and rows[-1]["wandb_through"] == 9
    assert len([r for r in rows if r["kind"] == "train"]) == 9


def test_a_restart_before_any_checkpoint_and_a_divergence_are_on_record(tmp_path: Path) -> None:
    run = tmp_path / "run-x"
    first = recorder(run, restored=None, attempt="driver-1")
    train(first, range(1, 3))  # died before its first checkpoint: only its start event is written
    again = recorder(run, restored=None, attempt="driver-1")  # Ray restarted the workers, from the start
    train(again, range(1, 5))
    again.commit(None, events=[{"event": "diverged", "step": 4, "first_step": 3, "cause": "steps 3-4 ..."}])
    rows = rows_of(run)
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("event", 0), ("event", 0), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("event", 4)]
    assert rows[1]["cause"] == "worker restart (a worker or node was lost); no checkpoint had been saved, so from " \
        "the run's start"
    assert rows[-1]["event"] == "diverged" and rows[-1]["first_step"] == 3


def test_the_wandb_run_id_is_the_runs_own(tmp_path: Path) -> None:
    first = recorder(tmp_path / "run-x", restored=None, attempt="a")
    # A re-run before any checkpoint takes it from the start event; a resume from the checkpoint's copy.
    assert recorder(tmp_path / "run-x", restored=None, attempt="b").wandb_run_id == first.wandb_run_id
    assert recorder(tmp_path / "run-x", restored=6, attempt="c", start=6, wandb_id="from-ckpt").wandb_run_id \
        == "from-ckpt"
    # The same folder deleted and trained again is a new run: a new wandb run, not the old one continued.
    shutil.rmtree(tmp_path / "run-x")
    assert recorder(tmp_path / "run-x", restored=None, attempt="d").wandb_run_id != first.wandb_run_id


def test_speed_is_the_training_steps_own_and_leaves_out_validation_and_checkpoints(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "run", restored=None, attempt="a")
    assert rec.speed(world_size=2, accumulation=2) == {}  # no step timed yet

    def steps(first: int, last: int) -> None:
        for step in range(first, last + 1):
            time.sleep(0.02)
            rec.on_step(step, torch.tensor(1.0), 1e-3, data_wait_s=0.01 * step)  # 10 ms of each step waited

    steps(1, 6)
    speed = rec.speed(world_size=2, accumulation=2)
    assert 0.02 <= speed["step_time_s"] < 0.25  # generous: a loaded machine sleeps longer
    assert speed["samples_per_s"] == pytest.approx(CFG.batch_size * 2 * 2 / speed["step_time_s"])
    assert speed["tokens_per_s"] == pytest.approx(speed["samples_per_s"] * CFG.seq_len)
    assert 0 < speed["data_wait_fraction"] <= 0.5 and "mfu" not in speed  # no known peak on a CPU
    rec.commit({"step": 6, "epoch": 0, "val_loss": 0.5, **speed})
    time.sleep(1.0)  # validation and the checkpoint's save: not a training step
    steps(7, 9)
    assert rec.speed(world_size=2, accumulation=2)["step_time_s"] < 0.25  # with the pause: 0.35


def test_a_line_cut_off_by_a_kill_and_a_non_finite_value(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "run", restored=None, attempt="a")
    rec.commit({"step": 10, "epoch": 0, "val_loss": float("nan")})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 11, "train_')  # the process died mid-line
    rows = rows_of(tmp_path / "run")
    assert rows[-1] == {"kind": "checkpoint", "step": 10, "epoch": 0, "val_loss": None}  # NaN is written as null
    again = recorder(tmp_path / "run", restored=10, attempt="b", start=10)  # the cut line goes, the next is whole
    train(again, range(11, 13))
    again.commit({"step": 12, "epoch": 0})
    assert [(r["kind"], r["step"]) for r in rows_of(tmp_path / "run")][1:] == [
        ("checkpoint", 10), ("event", 10), ("train", 11), ("train", 12), ("checkpoint", 12)]


def test_mfu_counts_six_flops_per_parameter_and_attention(tmp_path: Path) -> None:
    assert flops_per_token(CFG, 1000) == 6 * 1000 + 12 * 2 * 16 * 8
    assert (peak_flops_of("NVIDIA H200"), peak_flops_of("NVIDIA L40"), peak_flops_of("NVIDIA L4")) == (
        989e12, 181e12, 121e12)
    assert peak_flops_of("Intel Xeon") is None
    rec = recorder(tmp_path / "run", restored=None, attempt="a")
    rec.peak = 1e9  # as a GPU with a known peak would set it
    for step in range(1, 4):
        time.sleep(0.01)
        rec.on_step(step, torch.tensor(1.0), 1e-3)
    speed = rec.speed(world_size=2, accumulation=1)
    assert speed["mfu"] == pytest.approx(speed["tokens_per_s"] / 2 * flops_per_token(CFG, 1000) / 1e9)


def test_a_wandb_that_cannot_start_costs_the_run_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    # Online with no API key anywhere: wandb.init itself refuses (a real failure, not a stand-in).
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # and nothing listening, should it try
    cfg = TrainConfig(**{**CFG.to_dict(), "use_wandb": True, "wandb_mode": "online"})
    rec = RunMetrics(cfg, parse_location(str(tmp_path / "run")), start_step=0, restored_step=None, attempt="a",
                     fork_of=None, num_params=1000, device=torch.device("cpu"))
    assert rec.wandb is None
    assert "⚠️  wandb could not start (" in capsys.readouterr().out
    train(rec, range(1, 4))
    rec.commit({"step": 3, "epoch": 0})
    rec.close()
    assert [r["step"] for r in read_rows(parse_location(str(tmp_path / "run" / "metrics.jsonl")))][1:] == [1, 2, 3, 3]


KEY, NETRC_KEY = "k" * 40, "a1" * 20


@pytest.mark.parametrize(("flag", "env", "netrc", "mode", "key"), [
    (None, {}, False, "offline", None),                              # no key anywhere
    (None, {"WANDB_API_KEY": KEY}, False, "online", KEY),
    (None, {}, True, "online", NETRC_KEY),                           # `wandb login` here: the key goes along
    (None, {"WANDB_MODE": "dryrun"}, True, "offline", None),         # the user's WANDB_MODE wins over the key
    ("disabled", {"WANDB_MODE": "online"}, True, "disabled", None),  # and --wandb-mode over both
])
def test_the_driver_decides_the_wandb_mode_for_every_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        flag: str | None, env: dict, netrc: bool, mode: str, key: str | None) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    if netrc:
        (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {NETRC_KEY}\n")
        (tmp_path / ".netrc").chmod(0o600)
    cfg = TrainConfig(**{**CFG.to_dict(), "use_wandb": True, "wandb_mode": flag})
    assert prepare_wandb(cfg, parse_location(str(tmp_path / "runs" / "run-x"))).wandb_mode == mode
    assert os.environ.get("WANDB_API_KEY") == key  # what the driver passes on to the workers
    assert capsys.readouterr().out == ""  # a local run keeps its offline files: no warning


def test_offline_files_of_a_run_on_a_bucket_are_warned_about(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = TrainConfig(**{**CFG.to_dict(), "use_wandb": True, "wandb_mode": "offline"})
    assert prepare_wandb(cfg, parse_location("s3://bucket/runs/run-x")).wandb_mode == "offline"
    assert "Set WANDB_DIR to a folder that lasts" in capsys.readouterr().out
