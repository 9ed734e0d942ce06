"""metrics.jsonl: every step written once across resumes, resume causes, speed figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from raytrain_app.config import TrainConfig
from raytrain_app.metrics import RunMetrics, flops_per_token, read_rows, wandb_run_id
from raytrain_app.storage import parse_location

CFG = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, num_workers=1,
                  batch_size=4)


def recorder(run: Path, *, restored: int | None, attempt: str, start: int = 0) -> RunMetrics:
    return RunMetrics(CFG, parse_location(str(run)), start_step=start, restored_step=restored, attempt=attempt,
                      fork_of=None, num_params=1000, device=torch.device("cpu"))


def train(rec: RunMetrics, steps: range) -> None:
    for step in steps:
        rec.on_step(step, torch.tensor(1.0 / step), 1e-3)


def test_a_step_is_written_once_however_the_run_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run-x"
    first = recorder(run, restored=None, attempt="driver-1")
    train(first, range(1, 6))
    first.commit({"step": 5, "epoch": 0, "val_loss": 0.9, **first.speed(1, 1)})
    train(first, range(6, 8))  # trained, then the process died before the next checkpoint

    # Ray restored the checkpoint at step 3 (the one at 5 had not been registered): steps 4-5 are retrained.
    again = recorder(run, restored=3, attempt="driver-2", start=3)
    train(again, range(4, 10))
    again.commit({"step": 9, "epoch": 1, "val_loss": 0.8})
    rows = read_rows(parse_location(str(run / "metrics.jsonl")))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 10))  # 4 and 5 once, 6-7 not lost
    assert [r["step"] for r in rows if r["kind"] == "checkpoint"] == [5, 9]
    events = [r for r in rows if r["kind"] == "event"]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 3)]
    assert events[1]["cause"].startswith("re-run")
    assert rows[1]["train_ema_loss"] == 1.0 and rows[1]["lr"] == 1e-3

    restarted = recorder(run, restored=9, attempt="driver-2", start=9)  # the same driver: Ray restarted workers
    restarted.commit({"step": 9, "epoch": 1})
    assert read_rows(parse_location(str(run / "metrics.jsonl")))[-1]["cause"].startswith("worker restart")


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
    rows = read_rows(parse_location(str(tmp_path / "run" / "metrics.jsonl")))
    assert rows[-1] == {"kind": "checkpoint", "step": 10, "epoch": 0, "val_loss": None}  # NaN is written as null
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])["step"] == 10


def test_mfu_counts_six_flops_per_parameter_and_attention(tmp_path: Path) -> None:
    assert flops_per_token(CFG, 1000) == 6 * 1000 + 12 * 2 * 16 * 8
    rec = recorder(tmp_path / "run", restored=None, attempt="a")
    rec.peak = 1e9  # as a GPU with a known peak would set it
    for step in range(1, 4):
        time.sleep(0.01)
        rec.on_step(step, torch.tensor(1.0), 1e-3)
    speed = rec.speed(world_size=2, accumulation=1)
    assert speed["mfu"] == pytest.approx(speed["tokens_per_s"] / 2 * flops_per_token(CFG, 1000) / 1e9)
    assert wandb_run_id("s3://b/runs/run-x") == wandb_run_id("s3://b/runs/run-x") != wandb_run_id("/runs/run-x")


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
