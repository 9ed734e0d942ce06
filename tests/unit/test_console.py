"""observability.console: the `raytrain_app` logger's records on the console, as the commands printed them."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest

from raytrain_app.observability.console import configure_console


def test_info_goes_to_stdout_and_warnings_to_stderr_as_the_bare_message_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("raytrain_app")
    monkeypatch.setattr(logger, "handlers", [])  # as a fresh process has it (the suite's conftest configured it)
    root_handlers = list(logging.getLogger().handlers)
    configure_console()
    configure_console()  # idempotent: nothing added the second time
    assert len(logger.handlers) == 2 and logger.propagate is False
    assert logging.getLogger().handlers == root_handlers  # Ray's and other libraries' logging is left alone

    log = logging.getLogger("raytrain_app.checkpoint.resolve")
    log.info("⚠️  WARNING: checkpoint x is not whole: 50% of it. Passing over it.")
    log.debug("not shown unless verbose")
    log.warning("\nSIGINT again: stopping now")
    log.error("error: one line")
    assert capsys.readouterr() == ("⚠️  WARNING: checkpoint x is not whole: 50% of it. Passing over it.\n",
                                   "\nSIGINT again: stopping now\nerror: one line\n")
    logging.getLogger("elsewhere").warning("not ours")
    assert "not ours" not in capsys.readouterr().out


def test_the_stream_is_looked_up_when_a_line_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """redirect_stdout after configuring (as tests and Ray's workers replace sys.stdout) still gets the lines."""
    logger = logging.getLogger("raytrain_app")
    monkeypatch.setattr(logger, "handlers", [])
    configure_console()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        logging.getLogger("raytrain_app.ray_adapter.worker").info("epoch 1/2 step 4")
        logging.getLogger("raytrain_app.ray_adapter.ray_compat").error("error: raytrain_app supports Ray")
    assert (out.getvalue(), err.getvalue()) == ("epoch 1/2 step 4\n", "error: raytrain_app supports Ray\n")


def test_verbose_lets_debug_lines_through_to_stdout(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("raytrain_app")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    configure_console(verbose=True)
    logging.getLogger("raytrain_app.core.trainer").debug("a detail")
    assert capsys.readouterr() == ("a detail\n", "")


def checkpoint_metrics(**scores: float) -> dict:
    """The metrics Trainer._checkpoint reports at a validation (epoch 2 of 5, mid-epoch), with the task's scores."""
    return {"epoch": 1, "global_step": 64, "batch_index": 3, "skipped_steps": 0, "val_loss": 0.446439,
            "validated": True, "val_loss_finite": True, "best_val_loss": 0.446439, "train_ema_loss": 0.8769,
            "lr": 8.06e-4, **scores, **{f"best_{name}": value for name, value in scores.items()}}


def test_the_validation_line_shows_the_tasks_scores() -> None:
    """Classification's line is the one docs/observability.md shows; regression's has RMSE and MAE in its place,
    and the best RMSE; a save before any validation shows no best score."""
    import sys

    from raytrain_app.core.trainer import UNVALIDATED_LOSS, unvalidated
    from raytrain_app.ray_adapter.worker import validation_line

    assert validation_line(checkpoint_metrics(val_accuracy=0.8359), 5) == (
        "epoch 2/5 step 64 train_ema_loss 0.8769 val_loss 0.446439 val_accuracy 0.8359 best 0.446439 "
        "best_accuracy 0.8359 lr 8.06e-04")
    assert validation_line(checkpoint_metrics(val_rmse=0.6682, val_mae=0.512), 5) == (
        "epoch 2/5 step 64 train_ema_loss 0.8769 val_loss 0.446439 val_rmse 0.6682 val_mae 0.5120 best 0.446439 "
        "best_rmse 0.6682 lr 8.06e-04")
    unsaved = {**checkpoint_metrics(val_rmse=0.0, val_mae=0.0), "validated": False, "val_loss": UNVALIDATED_LOSS,
               "best_val_loss": UNVALIDATED_LOSS, "val_rmse": unvalidated("val_rmse"),
               "best_val_rmse": sys.float_info.max, "val_mae": unvalidated("val_mae"),
               "best_val_mae": unvalidated("val_mae")}
    assert validation_line(unsaved, 5) == ("epoch 2/5 step 64 train_ema_loss 0.8769 saved on request (not "
                                           "validated) lr 8.06e-04")
