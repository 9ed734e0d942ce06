"""What the package's log lines look like on a console: the one place that decides it.

Library modules log through `logging.getLogger(__name__)`, under the `raytrain_app` logger, and never print. Every
process that says something to the user (each command's driver, each Ray Train worker, each sweep trial) calls
`configure_console()` once before its first line: then an INFO line goes to stdout and a WARNING or worse to
stderr, each as the bare message, flushed at once, as `print(..., flush=True)` would. Ray forwards a worker's
stdout and stderr to the driver's console, so a worker's lines look the same as the driver's.
"""

from __future__ import annotations

import logging
import sys

ROOT_LOGGER = "raytrain_app"


class _ConsoleHandler(logging.Handler):
    """Writes to sys.stdout or sys.stderr as they are when the record is emitted, not when the handler was made:
    redirect_stdout, pytest's capture and Ray's worker log files replace them after the process started."""

    def __init__(self, stream_name: str, level: int) -> None:
        super().__init__(level)
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report the failure, never raise it
            self.handleError(record)


def configure_console(verbose: bool = False) -> logging.Logger:
    """Send the `raytrain_app` logger's records to the console: below WARNING to stdout, WARNING and above to
    stderr, the message alone. `verbose` lets DEBUG records through too. The root logger is left alone (Ray's and
    other libraries' logging is not ours to change). Calling it again changes only the level."""
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        out = _ConsoleHandler("stdout", logging.DEBUG)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        logger.addHandler(out)
        logger.addHandler(_ConsoleHandler("stderr", logging.WARNING))
    return logger
