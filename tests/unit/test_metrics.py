"""metrics.jsonl: every step written once across resumes, resume causes, speed figures."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer, loss_fn
from raytrain_app.observability import metrics
from raytrain_app.observability.metrics import RunMetrics, flops_per_token, peak_flops_of, prepare_wandb, read_rows
from raytrain_app.storage.location import parse_location

CFG = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, num_workers=1,
                  batch_size=4)
# Wide enough for the matmuls to dwarf the parameters no matmul uses (positions, biases, norms), as in real models.
FLOPS_CFG = TrainConfig(hidden_dim=64, num_layers=2, num_heads=4, feature_dim=8, seq_len=32, num_classes=4,
                        num_workers=2, batch_size=4, dropout=0.0)


def recorder(run: Path, *, restored: int | None, attempt: str, start: int = 0, wandb_id: str | None = None,
             cfg: TrainConfig = CFG) -> RunMetrics:
    return RunMetrics(cfg, parse_location(str(run)), start_step=start, restored_step=restored, attempt=attempt,
                      fork_of=None, num_params=1000, device=torch.device("cpu"), wandb_run_id=wandb_id)


def train(rec: RunMetrics, steps: range, value: float = 1.0) -> None:
    for step in steps:
        rec.on_step(step, torch.tensor(value / step), 1e-3)


def rows_of(run: Path) -> list[dict]:
    return read_rows(parse_location(str(run / "metrics.jsonl")))


class Clock:
    """The metrics module's `time`, under the test's control: each step takes exactly what the test says."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(metrics, "time", fake)
    return fake


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


def test_speed_is_the_training_steps_own_and_leaves_out_validation_and_checkpoints(tmp_path: Path,
                                                                                  clock: Clock) -> None:
    rec = recorder(tmp_path / "run", restored=None, attempt="a")
    assert rec.speed(world_size=2, accumulation=2) == {}  # no step timed yet

    def steps(first: int, last: int) -> None:
        for step in range(first, last + 1):
            clock.now += 0.02  # 20 ms a step, 5 ms of it waiting for data (data_wait_s: the running total)
            rec.on_step(step, torch.tensor(1.0), 1e-3, data_wait_s=0.005 * step)

    steps(1, 6)
    speed = rec.speed(world_size=2, accumulation=2)
    # 4 sequences x 2 micro-batches x 2 workers every 20 ms, 8 tokens each; no MFU without a known peak (a CPU).
    assert speed == pytest.approx({"step_time_s": 0.02, "samples_per_s": 800.0, "tokens_per_s": 6400.0,
                                   "data_wait_fraction": 0.25})
    rec.commit({"step": 6, "epoch": 0, "val_loss": 0.5, **speed})
    clock.now += 1.0  # validation and the checkpoint's save: not a training step
    steps(7, 9)
    assert rec.speed(world_size=2, accumulation=2)["step_time_s"] == pytest.approx(0.02)  # with the pause: 0.35


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


@functools.cache
def counted_flops() -> tuple[int, int, int]:
    """(all FLOPs, attention's, parameters) of one training step on one micro-batch of FLOPS_CFG's model, forward
    and backward, as torch's FlopCounterMode counts them. The math attention kernel runs attention as the batched
    matmuls the counter counts (it does not count the fused CPU kernel); no other op of the model is a bmm."""
    cfg = FLOPS_CFG
    torch.manual_seed(0)
    model = SequenceTransformer(cfg)
    x = torch.randn(cfg.batch_size, cfg.seq_len, cfg.feature_dim)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(x), y).backward()
    attention = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    return counter.get_total_flops(), attention, sum(p.numel() for p in model.parameters())


def test_the_flops_per_token_estimate_is_what_torch_counts_in_a_training_step() -> None:
    total, attention, num_params = counted_flops()
    tokens = FLOPS_CFG.batch_size * FLOPS_CFG.seq_len
    assert flops_per_token(FLOPS_CFG, 0) == attention / tokens  # attention's term alone, exactly
    # The whole step within 5% above the count: the estimate also counts 6 FLOPs for each parameter no matmul
    # uses (positions, biases, norms) and for the input projection's input gradient, which backward skips.
    assert total / tokens <= flops_per_token(FLOPS_CFG, num_params) <= 1.05 * total / tokens


def test_mfu_is_one_workers_counted_flops_per_second_over_its_peak(tmp_path: Path, clock: Clock) -> None:
    total, _, num_params = counted_flops()
    rec = RunMetrics(FLOPS_CFG, parse_location(str(tmp_path / "run")), start_step=0, restored_step=None,
                     attempt="a", fork_of=None, num_params=num_params, device=torch.device("cpu"))
    rec.peak = 1e12  # as a GPU with a known peak sets it
    for step in range(1, 5):
        clock.now += 0.5
        rec.on_step(step, torch.tensor(1.0), 1e-3)
    # Each of 2 workers runs 2 micro-batches (accumulation) per 0.5 s step.
    assert rec.speed(world_size=2, accumulation=2)["mfu"] == pytest.approx(2 * total / 0.5 / 1e12, rel=0.05)


def test_a_gpus_peak_is_its_longest_matching_name() -> None:
    assert (peak_flops_of("NVIDIA H200"), peak_flops_of("NVIDIA L40"), peak_flops_of("NVIDIA L4")) == (
        989e12, 181e12, 121e12)
    assert peak_flops_of("Intel Xeon") is None


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


def test_a_regression_runs_rows_report_and_wandb_keys_name_rmse_and_mae(tmp_path: Path, capsys) -> None:
    """A regression run's metrics.jsonl holds val_rmse and val_mae; its report names the best RMSE (the lowest)
    at its step and plots it; wandb gets them as val/rmse, val/best_rmse, val/mae, val/best_mae."""
    from raytrain_app.report import report

    run = tmp_path / "run-r"
    rec = recorder(run, restored=None, attempt="driver-1", cfg=CFG.replace(task="regression", num_classes=0))
    logged: dict[int, dict] = {}
    rec.wandb = type("Run", (), {"log": lambda self, row, step: logged.setdefault(step, {}).update(row)})()
    for step, loss, rmse in ((4, 0.5, 0.70), (8, 0.4, 0.60), (12, 0.45, 0.65)):
        train(rec, range(step - 3, step + 1))
        rec.commit({"step": step, "epoch": step // 4, "val_loss": loss, "val_rmse": rmse, "val_mae": rmse / 2,
                    "best_val_loss": min(loss, 0.4 if step > 8 else loss), "best_val_rmse": min(rmse, 0.6),
                    "best_val_mae": min(rmse, 0.6) / 2, "validated": True})
    assert [r["val_rmse"] for r in rows_of(run) if r["kind"] == "checkpoint"] == [0.7, 0.6, 0.65]
    assert logged[8]["val/rmse"] == 0.6 and logged[12]["val/best_rmse"] == 0.6
    assert logged[12]["val/mae"] == 0.325 and logged[12]["val/best_mae"] == 0.3
    assert not any(key.startswith("perf/val") or key.startswith("perf/best") for row in logged.values() for key in row)

    assert report(str(run), None) == 0
    out = capsys.readouterr().out
    assert "Best validation loss: 0.400000 at global step 8\n" in out
    assert "Best validation RMSE: 0.6000 at global step 8\n" in out and "accuracy" not in out
    assert (run / "loss.png").stat().st_size > 0
