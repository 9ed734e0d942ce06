"""The plain-PyTorch loop, without Ray: schedule, learning, AMP, and exact resume in one process."""

from __future__ import annotations

import io
import math

import pytest
import torch

from raytrain_app.checkpoint.state import restore_training_state, training_state, with_training_state
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.schedule import lr_at
from raytrain_app.core.trainer import Trainer
from raytrain_app.datasets.dataset import Dataset
from tests.helpers import synthetic


def config(**overrides: object) -> TrainConfig:
    values = dict(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3, epochs=2,
                  batch_size=16, eval_every=5, warmup_steps=4, dropout=0.1, aug_noise_std=0.05, num_workers=1)
    values.update(overrides)
    return TrainConfig(**values)


def build(cfg: TrainConfig) -> Trainer:
    seed_everything(cfg.seed, 0)
    model = SequenceTransformer(cfg)
    return Trainer(cfg, model, model, torch.device("cpu"))


class Interrupt(Exception):
    pass


def copy_state(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run(cfg: TrainConfig, data: Dataset, *, stop_at_step: int | None = None, start: dict | None = None):
    """Fit; return (trainer, checkpoints by step). With stop_at_step, stop right after that checkpoint."""
    trainer = build(cfg)
    if start is not None:
        restore_training_state(trainer, start)
    saved: dict[int, dict] = {}

    def on_checkpoint(metrics: dict, state: dict | None, is_best: bool) -> None:
        saved[metrics["global_step"]] = copy_state(state)
        if metrics["global_step"] == stop_at_step:
            raise Interrupt

    try:
        trainer.fit(data, with_training_state(trainer, on_checkpoint))
    except Interrupt:
        pass
    return trainer, saved


def assert_states_equal(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["val_loss"] == b["val_loss"] and a["train_ema_loss"] == b["train_ema_loss"]
    for name, tensor in a["model_state_dict"].items():
        assert torch.equal(tensor, b["model_state_dict"][name]), name
    for pid, moments in a["optimizer_state_dict"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(tensor, b["optimizer_state_dict"]["state"][pid][key]), (pid, key)
    assert a["scaler_state_dict"] == b["scaler_state_dict"]


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    lrs = [lr_at(s, peak_lr=1.0, warmup_steps=10, total_steps=110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[110] == pytest.approx(0.1)


def test_the_loop_learns_well_below_chance() -> None:
    cfg = config(epochs=6, lr=3e-3, dropout=0.0, aug_noise_std=0.0, eval_every=1000)
    trainer, saved = run(cfg, synthetic(1024))
    assert trainer.best_val_loss < 0.6 * math.log(3)
    assert sorted(saved) == [64 * e for e in range(1, 7)]  # one checkpoint per epoch end


@pytest.mark.parametrize("overrides", [
    {},
    {"grad_accum_steps": 3},  # an epoch of 16 micro-batches ends with a short accumulation group
    {"use_amp": True, "amp_dtype": "bf16"},
    {"use_amp": True, "amp_dtype": "fp16"},  # GradScaler state goes through the checkpoint
], ids=["fp32", "accum", "bf16", "fp16"])
def test_mid_epoch_resume_is_bit_exact(overrides: dict) -> None:
    cfg = config(**overrides)
    data = synthetic()
    reference, ref_saved = run(cfg, data)
    mid_epoch = [step for step, s in ref_saved.items() if s["data_position"]["batch_index"] > 0 and s["epoch"] == 1]
    stop = mid_epoch[0]
    _, saved = run(cfg, data, stop_at_step=stop)
    resumed, resumed_saved = run(cfg, data, start=saved[stop])
    last = max(ref_saved)
    assert_states_equal(ref_saved[last], resumed_saved[last])
    if cfg.use_amp and cfg.amp_dtype == "fp16":
        assert ref_saved[last]["scaler_state_dict"]["scale"] > 0


def test_fork_applies_new_hyperparameters_after_restoring() -> None:
    data = synthetic()
    _, saved = run(config(), data)
    state = saved[16]
    fork = build(config(lr=5e-5, weight_decay=0.3, epochs=4))
    restore_training_state(fork, state)
    assert (fork.epoch, fork.global_step, fork.batch_index) == (1, 16, 0)
    assert fork.best_val_loss == state["val_loss"]
    fork.schedule.total_steps = 64
    fork.train_step([(data.train.x[:16], data.train.y[:16])])
    group = fork.optimizer.param_groups[0]
    assert group["lr"] == lr_at(16, peak_lr=5e-5, warmup_steps=4, total_steps=64)
    assert group["weight_decay"] == 0.3
    assert torch.equal(fork.optimizer.state_dict()["state"][0]["step"], torch.tensor(17.0))  # moments continued


def test_resume_with_another_batch_size_continues_after_the_same_samples() -> None:
    data = synthetic()
    _, saved = run(config(), data, stop_at_step=5)
    assert saved[5]["data_position"]["batch_index"] == 5  # 5 batches of 16 = 80 samples into epoch 0
    trainer = build(config(batch_size=8))
    restore_training_state(trainer, saved[5])
    assert trainer.batch_index == 10


def test_compiled_model_checkpoints_plain_weights_and_resumes(inductor) -> None:
    cfg = config(compile=True, epochs=1, eval_every=1000, dropout=0.0)
    data = synthetic(64)
    seed_everything(cfg.seed, 0)
    model = SequenceTransformer(cfg)
    trainer = Trainer(cfg, model, inductor(model), torch.device("cpu"))
    saved: list[dict] = []
    trainer.fit(data, with_training_state(trainer, lambda metrics, state, is_best: saved.append(copy_state(state))))
    keys = set(saved[-1]["model_state_dict"])
    assert keys == set(SequenceTransformer(cfg).state_dict())  # no "_orig_mod." prefix from torch.compile
    fresh = SequenceTransformer(cfg)
    restore_training_state(Trainer(cfg, fresh, inductor(fresh), torch.device("cpu")), saved[-1])
    assert all(torch.equal(p, saved[-1]["model_state_dict"][k]) for k, p in fresh.state_dict().items())


def test_fork_options_reset_optimizer_restart_schedule_and_own_best() -> None:
    data = synthetic()
    _, saved = run(config(), data)
    state = saved[16]
    fork = build(config(lr=1e-3, epochs=4, reset_optimizer=True, restart_schedule=True))
    report = restore_training_state(fork, state, fork=True, fork_keeps_best=False)
    assert report.reset and not report.optimizer
    assert fork.global_step == 16 and fork.best_val_loss == math.inf  # counters kept, best tracked anew
    fork.schedule.total_steps = 64
    fork.train_step([(data.train.x[:16], data.train.y[:16])])
    assert fork.global_step == 17
    assert torch.equal(fork.optimizer.state_dict()["state"][0]["step"], torch.tensor(1.0))  # fresh moments
    # The schedule starts over at the fork: warmup step 0 of 48 remaining steps.
    assert fork.optimizer.param_groups[0]["lr"] == lr_at(0, peak_lr=1e-3, warmup_steps=4, total_steps=48)
    assert training_state(fork)["scheduler_state_dict"]["start_step"] == 16


def test_fork_flags_apply_only_to_forks_and_lineage_follows_the_run() -> None:
    data = synthetic()
    _, saved = run(config(), data)
    forked = build(config(reset_optimizer=True, restart_schedule=True))
    forked.lineage = {"base_checkpoint": "base.pt", "base_global_step": 16}
    restore_training_state(forked, saved[16], fork=True)
    after_fork = copy_state(training_state(forked))
    assert after_fork["lineage"]["base_checkpoint"] == "base.pt"
    # The fork's own checkpoint, resumed (a restart): optimizer and schedule are kept, lineage comes from it.
    own = build(config(reset_optimizer=True, restart_schedule=True))
    report = restore_training_state(own, after_fork)
    assert report.optimizer and not report.reset
    assert own.schedule.start_step == 16 and own.lineage == after_fork["lineage"]
    assert own.best_val_loss == saved[16]["val_loss"]  # a fork keeps the base's best unless told otherwise


def test_stop_saves_the_current_step_unvalidated_and_resuming_ends_bit_exact() -> None:
    """An interrupt's STOP at step 7 (between validations at 5 and 10): the loop saves step 7 without validating
    (validated False, best untouched) and returns False; resuming from it ends exactly as the uninterrupted run."""
    from raytrain_app.core.interrupts import CONTINUE, SAVE, STOP

    cfg, data = config(), synthetic()
    full, full_saved = run(cfg, data)

    trainer, saved, seen = build(cfg), {}, []

    def on_checkpoint(metrics: dict, state: dict | None, is_best: bool) -> None:
        seen.append((metrics["global_step"], not metrics["validated"], is_best))
        assert math.isfinite(metrics["val_loss"])  # Ray's run snapshot cannot hold NaN or inf
        saved[metrics["global_step"]] = copy_state(state)

    codes = {3: SAVE, 7: STOP}  # polled once per optimizer step, after it (steps 3 and 7)
    polls: list[int] = []

    def interrupt() -> int:
        polls.append(trainer.global_step)
        return codes.get(trainer.global_step, CONTINUE)

    assert trainer.fit(data, with_training_state(trainer, on_checkpoint), interrupt) is False
    assert trainer.global_step == 7
    assert seen == [(3, True, False), (5, False, True), (7, True, False)]
    assert polls[0] == 0  # polled before the first step too
    assert saved[7]["eval_val_loss"] is None and saved[7]["val_loss"] == saved[5]["val_loss"]
    assert_states_equal(saved[5], full_saved[5])

    resumed, _ = run(cfg, data, start=saved[7])
    assert_states_equal(training_state(resumed), training_state(full))
    # A stop asked for before the first step returns at once with nothing to save.
    again = build(cfg)
    restore_training_state(again, saved[7])
    assert again.fit(data, lambda *a: pytest.fail("saved"), lambda: STOP) is False and again.global_step == 7


def test_elastic_run_keeps_its_effective_batch_with_fewer_workers() -> None:
    """--num-workers 1-2 with one worker: twice the accumulation, so the same steps per epoch as with two."""
    cfg = config(num_workers="1-2", grad_accum_steps=2)
    assert (cfg.min_workers, cfg.num_workers) == (1, 2)
    trainer = build(cfg)  # a single process: world size 1
    assert trainer.grad_accum == 4
    assert trainer.steps_per_epoch(synthetic()) == 256 // 16 // 4 == trainer.schedule_steps_per_epoch(synthetic())
    elastic = build(config(num_workers="2-4"))  # a world of 1 here: the schedule still counts 4 workers
    assert elastic.schedule_steps_per_epoch(synthetic()) == 256 // 4 // 16
    assert config(num_workers=2, grad_accum_steps=2).grad_accum_for(1) == 2  # a fixed run accumulates as told
    assert config(num_workers="2-4").grad_accum_for(3) == 2  # rounds the effective batch up: 3 x 2 >= 4


def batches(data: Dataset, n: int = 2, nan_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data.train.read_rows(0, 16 * n)
    micro = [(x[i * 16:(i + 1) * 16].clone(), y[i * 16:(i + 1) * 16]) for i in range(n)]
    if nan_at is not None:
        micro[nan_at][0][0, 0, 0] = float("nan")  # one feature of one sequence: its loss and gradients go NaN
    return micro


@pytest.mark.parametrize("precision", [{"use_amp": False}, {"use_amp": True, "amp_dtype": "bf16"},
                                       {"use_amp": True, "amp_dtype": "fp16"}])
def test_a_step_with_a_non_finite_loss_is_skipped_and_counted(precision: dict) -> None:
    """fp32, bf16 and fp16 alike: the weights, AdamW moments and step count and the EMA are untouched by a step
    whose gradients are not finite; the global step (the data) moves on and the skip is counted."""
    cfg, data = config(**precision), synthetic()
    trainer = build(cfg)
    trainer.train_step(batches(data))
    before = copy_state(training_state(trainer))
    trainer.train_step(batches(data, nan_at=1))
    after = copy_state(training_state(trainer))
    for name, tensor in before["model_state_dict"].items():
        assert torch.equal(tensor, after["model_state_dict"][name]), name
    for pid, moments in before["optimizer_state_dict"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(tensor, after["optimizer_state_dict"]["state"][pid][key]), (pid, key)
    assert after["train_ema_loss"] == before["train_ema_loss"] and math.isfinite(after["train_ema_loss"])
    assert (after["global_step"], after["skipped_steps"], after["skip_streak"]) == (2, 1, 1)
    trainer.train_step(batches(data))  # a finite step trains again and ends the streak
    final = training_state(trainer)
    assert not torch.equal(final["model_state_dict"]["head.weight"], after["model_state_dict"]["head.weight"])
    assert (final["skipped_steps"], final["skip_streak"]) == (1, 0)


def test_too_many_skipped_steps_in_a_row_stop_training_without_saving() -> None:
    """An absurd learning rate: the first step makes the weights overflow, every later step is non-finite and
    skipped; after --max-skipped-steps of them the loop stops, unsaved, naming the steps. The skip counters are
    part of the state, so a resumed run stops at the same step."""
    cfg, data = config(lr=1e30, max_skipped_steps=3, eval_every=1), synthetic()
    trainer, saved = build(cfg), {}
    on_checkpoint = with_training_state(trainer, lambda m, s, b: saved.update({m["global_step"]: copy_state(s)}))
    assert trainer.fit(data, on_checkpoint) is False
    assert (trainer.diverged.first_step, trainer.diverged.last_step) == (2, 4)
    assert sorted(saved) == [1, 2, 3, 4]  # validated at every step (--eval-every 1), nothing after the stop
    assert (saved[3]["skipped_steps"], saved[3]["skip_streak"]) == (2, 2)
    resumed = build(cfg)
    restore_training_state(resumed, saved[3])
    assert resumed.fit(data, lambda *a: None) is False and resumed.diverged.last_step == 4
    forked = build(cfg.replace(lr=1e-3))  # a fork with a sane rate starts a streak of its own
    restore_training_state(forked, saved[3], fork=True)
    assert (int(forked.skip_streak), int(forked.skipped_steps)) == (0, 2)
    never = build(cfg.replace(max_skipped_steps=0, epochs=1, eval_every=1000))  # 0: never stop
    assert never.fit(data, lambda *a: None) is True and never.diverged is None
    assert int(never.skipped_steps) == never.global_step - 1  # every step after the first was skipped


def test_the_skip_streak_reaches_the_host_without_waiting_for_the_device() -> None:
    """The CUDA path's logic on CPU, with an event whose completion the test decides: a value is read only once
    its copy has finished, and a copy in flight is not replaced (so a value is never read half-copied)."""
    from raytrain_app.core.distributed import LazyHostValue

    class Event:
        done = False

        def record(self) -> None:
            pass

        def query(self) -> bool:
            return Event.done

    reader = LazyHostValue(torch.device("cpu"))
    reader.asynchronous, reader.new_event = True, Event
    assert reader.read() is None
    reader.push(torch.tensor(1))
    assert reader.read() is None  # the copy has not finished
    reader.push(torch.tensor(2))  # still in flight: skipped
    Event.done = True
    assert reader.read() == 1
    reader.push(torch.tensor(3))
    assert reader.read() == 3
    Event.done = False
    reader.push(torch.tensor(4))
    assert reader.read() == 3  # lags until the device catches up
