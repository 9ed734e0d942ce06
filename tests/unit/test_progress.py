"""The driver's progress display (plain lines when not a terminal, a bar redrawn in place on one) and rank 0's
progress sender, without Ray: the control actor is replaced by what it returns."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import pytest
import torch

from raytrain_app.observability.progress import ProgressDisplay, ProgressSender

LINE = re.compile(r"^progress: epoch 2/3 step (\d+)/48 \((\d+)%\) train_ema_loss 0\.5000 best_val_loss 0\.4000 "
                  r"best_val_accuracy 0\.8125 samples/s 64\.0 ETA 0:00:(\d\d)$")


def progress(step: int) -> dict:
    return {"epoch": 2, "epochs": 3, "step": step, "total_steps": 48, "start_step": 10, "train_ema_loss": 0.5,
            "best_val_loss": 0.4, "best_val_accuracy": 0.8125, "samples_per_s": 64.0, "step_time_s": 0.5}


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)


def test_plain_lines_every_progress_every_seconds_with_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, out, latest = Clock(monkeypatch), io.StringIO(), {"p": None}
    display = ProgressDisplay(lambda timeout: latest["p"], every_s=10, out=out)
    clock.now = 995.0
    display()  # nothing reported yet: nothing printed
    # Read at most once a second; printed at most every 10 s; what was already seen is not printed again.
    for t, step in [(0, 20), (1, 22), (5, 30), (10, 36), (10.5, 37), (12, 36)]:
        clock.now, latest["p"] = 1000.0 + t, progress(step)
        display()
    lines = out.getvalue().splitlines()
    assert [LINE.match(line).groups() for line in lines] == [("20", "42", "14"), ("36", "75", "06")]
    display.close()
    assert out.getvalue().count("\n") == 2  # plain output needs no closing newline


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, out, latest = Clock(monkeypatch), Terminal(), {"p": None}
    display = ProgressDisplay(lambda timeout: latest["p"], every_s=10, out=out)
    for t, step in [(0, 12), (1, 24), (2, 48)]:
        clock.now, latest["p"] = 1000.0 + t, progress(step)
        display()
    display.close()
    frames = out.getvalue().split("\r\x1b[2K")
    assert frames[0] == "" and len(frames) == 4 and out.getvalue().endswith("\n")
    assert frames[1].startswith("[######" + "." * 18 + "] epoch 2/3 step 12/48 (25%)")
    assert frames[3].startswith("[" + "#" * 24 + "] epoch 2/3 step 48/48 (100%)")


def test_rank_0_sends_at_most_once_an_interval_with_its_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, sent = Clock(monkeypatch), []
    control = SimpleNamespace(report_progress=SimpleNamespace(remote=sent.append))
    sender = ProgressSender(control, epochs=3, start_step=10, progress_every=10, device=torch.device("cpu"))
    trainer = SimpleNamespace(global_step=10, epoch=1, batch_index=4, best_val_loss=float("inf"),
                              best_scores={"val_accuracy": 0.75},
                              cfg=SimpleNamespace(batch_size=8), grad_accum=2, world_size=2,
                              schedule=SimpleNamespace(total_steps=48), ema=torch.tensor(0.25))
    for step in range(11, 31):  # 20 steps, 0.1 s each
        clock.now += 0.1
        trainer.global_step = step
        sender(trainer)
    assert [p["step"] for p in sent] == [20, 30]  # once a second (PUSH_INTERVAL_S), --progress-every being longer
    assert sent[-1]["samples_per_s"] == pytest.approx(8 * 2 * 2 / 0.1)
    assert sent[-1]["best_val_loss"] is None and sent[-1]["best_val_accuracy"] == 0.75
    assert sent[-1]["epoch"] == 2 and sent[-1]["train_ema_loss"] == 0.25
