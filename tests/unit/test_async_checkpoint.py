"""The background checkpoint writer without Ray: what it writes is the state at the step it was asked for, one
checkpoint at most is in flight, a failed write reaches the training thread, and the loop reports a written
checkpoint at the next step boundary. The end-to-end tests (tests/integration/test_faults_e2e.py) kill real
workers during background writes."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from raytrain_app.checkpoint.format import load_state, save_checkpoint_dir
from raytrain_app.checkpoint.state import training_state, with_training_state
from raytrain_app.checkpoint.writer import CheckpointWriter
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.interrupts import CONTINUE, SAVE
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Trainer
from tests.helpers import synthetic

CFG = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, num_workers=1,
                  dropout=0.0, batch_size=8, eval_every=2, epochs=1)


def trainer() -> Trainer:
    seed_everything(0, 0)
    model = SequenceTransformer(CFG)
    return Trainer(CFG, model, model, torch.device("cpu"))


class Recorder:
    """The two functions the Ray adapter gives the writer, writing real checkpoint folders."""

    def __init__(self, tmp_path: Path, gate: threading.Event | None = None, delay_s: float = 0.0) -> None:
        self.tmp_path, self.gate, self.delay_s = tmp_path, gate, delay_s
        self.reports: list[tuple[int, str | None, str]] = []  # (global step, folder, dir name)
        self.urgent: list[bool] = []  # each report's `urgent`

    def write(self, snapshot: dict[str, Any], is_best: bool, dir_name: str) -> str:
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.delay_s)  # a slower disk
        folder = self.tmp_path / dir_name
        save_checkpoint_dir(str(folder), snapshot)
        return str(folder)

    def report(self, metrics: dict[str, Any], checkpoint: Any, dir_name: str, urgent: bool = False) -> None:
        self.reports.append((metrics["global_step"], checkpoint, dir_name))
        self.urgent.append(urgent)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal all the way down: every tensor bit for bit (torch.equal), everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_what_is_written_is_the_state_when_it_was_asked_for(tmp_path: Path) -> None:
    t = trainer()
    x, y = torch.randn(8, 8, 4), torch.randint(0, 3, (8,))
    t.train_step([(x, y)])
    expected = copy.deepcopy(training_state(t))  # weights, optimizer moments and step, scheduler, scaler, counters
    gate = threading.Event()
    recorder = Recorder(tmp_path, gate)
    writer = CheckpointWriter(recorder.write, recorder.report, rank=0)
    writer.submit({"global_step": 1}, training_state(t), False, "checkpoint_step=000001")
    for _ in range(3):  # training goes on while the write waits
        t.train_step([(x, y)])
    assert not writer.ready() and writer.pending()
    gate.set()
    writer.flush()
    written = load_state(str(tmp_path / "checkpoint_step=000001" / "state.pt"))
    assert written["global_step"] == 1
    for key, value in expected.items():
        assert_same(written[key], value, key)
    # It did train on meanwhile: every weight and both AdamW moments of every weight have moved since, three
    # optimizer steps on.
    live = training_state(t)
    weights = [name for name, _ in t.model.named_parameters()]
    assert not [name for name in weights if torch.equal(live["model_state_dict"][name],
                                                        expected["model_state_dict"][name])]
    now, then = live["optimizer_state_dict"]["state"], expected["optimizer_state_dict"]["state"]
    assert len(now) == len(then) == len(weights)
    for key in now:
        assert (now[key]["step"].item(), then[key]["step"].item()) == (4, 1)
        assert not torch.equal(now[key]["exp_avg"], then[key]["exp_avg"])
        assert not torch.equal(now[key]["exp_avg_sq"], then[key]["exp_avg_sq"])
    assert recorder.reports == [(1, str(tmp_path / "checkpoint_step=000001"), "checkpoint_step=000001")]


def test_one_checkpoint_in_flight_and_buffers_reused(tmp_path: Path) -> None:
    t = trainer()
    recorder = Recorder(tmp_path)
    writer = CheckpointWriter(recorder.write, recorder.report, rank=0)
    writer.submit({"global_step": 1}, training_state(t), False, "a")
    writer.submit({"global_step": 2}, training_state(t), False, "b")  # waits for "a" and reports it first
    assert [r[0] for r in recorder.reports] == [1] and writer.pending()
    writer.flush()
    assert [r[2] for r in recorder.reports] == ["a", "b"] and not writer.pending()
    buffers = dict(writer._buffers)
    writer.submit({"global_step": 3}, training_state(t), False, "c")
    writer.flush()
    assert all(writer._buffers[k] is v for k, v in buffers.items())  # no new host memory per checkpoint
    assert writer.checkpoints == 3 and writer.write_s > 0 and writer.blocked_s > 0


def test_a_failed_write_is_raised_on_the_training_thread_and_nothing_is_reported(tmp_path: Path) -> None:
    def fail(snapshot: dict, is_best: bool, dir_name: str) -> None:
        raise OSError("No space left on device")

    recorder = Recorder(tmp_path)
    writer = CheckpointWriter(fail, recorder.report, rank=0)
    writer.submit({"global_step": 1}, training_state(trainer()), False, "a")
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    assert recorder.reports == [] and not writer.pending()


def test_a_rank_with_nothing_to_write_reports_metrics_only_and_is_ready_at_once(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    writer = CheckpointWriter(recorder.write, recorder.report, rank=1)
    writer.submit({"global_step": 4}, None, False, "checkpoint_step=000004")
    assert writer.pending() and writer.ready()  # the loop's agreement waits for the ranks that do write
    writer.flush()
    assert recorder.reports == [(4, None, "checkpoint_step=000004")]


def test_synchronous_mode_writes_and_reports_before_returning(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    writer = CheckpointWriter(recorder.write, recorder.report, rank=0, asynchronous=False)
    writer.submit({"global_step": 1}, training_state(trainer()), False, "a")
    assert [r[0] for r in recorder.reports] == [1] and not writer.pending()
    assert not any(thread.name.startswith("checkpoint-") for thread in threading.enumerate())


def test_the_loop_reports_a_written_checkpoint_at_a_step_boundary_and_ends_bit_exact(tmp_path: Path) -> None:
    """A run whose checkpoints are written in the background ends with the same bits as one that writes them on
    the training path, and each checkpoint is reported at a step at or after its own, in order."""
    data = synthetic(num_train=64)
    finals = {}
    late_reports = {}
    for asynchronous in (True, False):
        t = trainer()
        recorder = Recorder(tmp_path / str(asynchronous), delay_s=0.05)
        writer = CheckpointWriter(recorder.write, recorder.report, rank=0, asynchronous=asynchronous)
        t.checkpoints = writer
        steps_at_report: list[int] = []

        def on_checkpoint(metrics: dict, state: dict | None, is_best: bool, w: CheckpointWriter = writer) -> None:
            w.submit(metrics, state, is_best, f"checkpoint_step={metrics['global_step']:06d}")

        original = recorder.report

        def report(metrics: dict, checkpoint: Any, dir_name: str, urgent: bool, t: Trainer = t,
                   original: Any = original, steps_at_report: list[int] = steps_at_report) -> None:
            steps_at_report.append(t.global_step)
            original(metrics, checkpoint, dir_name)

        writer.report = report
        assert t.fit(data, with_training_state(t, on_checkpoint))
        writer.flush()
        assert [r[0] for r in recorder.reports] == [2, 4, 6, 8]  # every checkpoint, in order
        assert all(at >= step for at, (step, _, _) in zip(steps_at_report, recorder.reports, strict=True))
        late_reports[asynchronous] = sum(at > step for at, (step, _, _) in zip(steps_at_report, recorder.reports,
                                                                              strict=True))
        folder = tmp_path / str(asynchronous)
        finals[asynchronous] = [load_state(str(folder / f"checkpoint_step={step:06d}" / "state.pt"))
                                for step in (2, 4, 6, 8)]
    assert late_reports[True] > 0 and late_reports[False] == 0  # training went on while a write was running
    # Every checkpoint, not only the last (written after training ended), holds the same state both ways.
    for background, on_path in zip(finals[True], finals[False], strict=True):
        assert_same(background, on_path, f"step {on_path['global_step']}")


def test_a_preemption_at_a_step_whose_checkpoint_is_written_uploads_it_before_going_on(tmp_path: Path) -> None:
    """A validation checkpoint of this very step, already written when the notice is read, is the one the notice
    saves: it is reported urgent (uploaded before training goes on), not left to a background upload."""
    t = trainer()
    recorder = Recorder(tmp_path)
    writer = CheckpointWriter(recorder.write, recorder.report, rank=0)
    t.checkpoints = writer

    def on_checkpoint(metrics: dict, state: dict | None, is_best: bool) -> None:
        writer.submit(metrics, state, is_best, f"checkpoint_step={metrics['global_step']:06d}")
        writer.in_flight.thread.join()  # written before the step boundary's interrupt poll

    notices = []

    def interrupt() -> int:  # the notice arrives at step 2, right after its validation checkpoint
        if t.global_step == 2 and not notices:
            notices.append(t.global_step)
            return SAVE
        return CONTINUE

    assert t.fit(synthetic(num_train=64), with_training_state(t, on_checkpoint), interrupt)
    writer.flush()
    assert [r[0] for r in recorder.reports] == [2, 4, 6, 8]  # the notice saved no second copy of step 2
    assert recorder.urgent == [True, False, False, False]


def test_waiting_for_a_slow_write_is_counted_as_blocked(tmp_path: Path) -> None:
    """The training thread's blocked time is what it waited, measured against its own calls: not the write
    behind submit, but the wait for that write in flush."""
    gate = threading.Event()
    writer = CheckpointWriter(Recorder(tmp_path, gate).write, Recorder(tmp_path).report, rank=0)
    state = training_state(trainer())
    started = time.perf_counter()
    writer.submit({"global_step": 1}, state, False, "a")
    submit_returned = time.perf_counter()
    assert not writer.ready()  # submit returned with the write still held: it runs in the background
    copied_s = writer.blocked_s
    assert copied_s <= submit_returned - started
    opened = []
    threading.Timer(0.3, lambda: (opened.append(time.perf_counter()), gate.set())).start()
    flush_started = time.perf_counter()
    writer.flush()
    flush_s = time.perf_counter() - flush_started
    assert opened  # flush returned only once the write was let through
    # Counted: all of flush's call but the few statements around the wait, so more than half of it.
    assert flush_s >= writer.blocked_s - copied_s > flush_s / 2
    assert writer.write_s >= opened[0] - submit_returned  # the write, from its start in submit to the gate


def test_the_copy_keeps_the_state_dicts_types_and_metadata() -> None:
    t = trainer()
    live = training_state(t)
    copied = CheckpointWriter(lambda *a: None, lambda *a: None, rank=0).snapshot(live)
    assert type(copied["model_state_dict"]) is type(live["model_state_dict"])  # an OrderedDict
    assert copied["model_state_dict"]._metadata == live["model_state_dict"]._metadata  # module versions
    assert all(a is not b and torch.equal(a, b) for a, b in zip(copied["model_state_dict"].values(),
                                                                 live["model_state_dict"].values(), strict=True))


def test_the_next_write_waits_until_the_previous_upload_has_left_this_machine(tmp_path: Path) -> None:
    recorder, gone, waited_s = Recorder(tmp_path), threading.Event(), []

    def wait_uploaded(timeout_s: float) -> None:  # what the Ray adapter gives: returns once Ray has uploaded it
        started = time.perf_counter()
        assert gone.wait(timeout_s)
        waited_s.append(time.perf_counter() - started)

    writer = CheckpointWriter(recorder.write, recorder.report, rank=0, wait_uploaded=wait_uploaded)
    writer.submit({"global_step": 1}, training_state(trainer()), False, "a")
    writer.flush()  # reported: Ray uploads it in the background
    assert waited_s == []  # the first write had nothing to wait for
    blocked_before, state = writer.blocked_s, training_state(trainer())
    threading.Timer(0.3, gone.set).start()
    started = time.perf_counter()
    writer.submit({"global_step": 2}, state, False, "b")
    submit_s = time.perf_counter() - started
    assert len(waited_s) == 1 and gone.is_set()  # submit returned only once the upload had gone
    assert waited_s[0] <= writer.blocked_s - blocked_before <= submit_s  # and that wait is counted as blocked
    writer.flush()
    assert [r[2] for r in recorder.reports] == ["a", "b"]


def test_a_synchronous_write_is_counted_once_as_blocked(tmp_path: Path) -> None:
    writer = CheckpointWriter(Recorder(tmp_path, delay_s=0.3).write, Recorder(tmp_path).report, rank=0,
                              asynchronous=False)
    state = training_state(trainer())
    started = time.perf_counter()
    writer.submit({"global_step": 1}, state, False, "a")
    submit_s = time.perf_counter() - started
    # On the training path: blocked for the write and within the call; counted twice, it would be submit_s plus
    # the write again.
    assert writer.write_s <= writer.blocked_s <= submit_s
