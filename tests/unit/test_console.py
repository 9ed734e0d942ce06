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
