"""One way for every command to end: a mistake in the user's input is one line on stderr and exit code 2 with
nothing written; anything unforeseen is one line and exit code 1 (`--debug`: with the traceback)."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from raytrain_app.checkpoint.format import CheckpointError
from raytrain_app.core.config import ConfigError
from raytrain_app.core.errors import UserError
from raytrain_app.datasets.dataset import DataError
from raytrain_app.storage.location import StorageError

# Exit codes of every command: a mistake in its input (nothing was written), training that did not finish, or
# training that diverged (it stopped itself: running the same command again would diverge again).
EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

USER_ERRORS = (UserError, ConfigError, DataError, CheckpointError, StorageError)


def first_line(e: BaseException, default: str = "") -> str:
    """The first line of an error's message (`default` when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else default


def unforeseen(e: BaseException) -> str:
    """The one line for an error nobody foresaw."""
    first = first_line(e)
    return f"{type(e).__name__}{': ' + first if first else ''} (run with --debug for the traceback)"


def run_command(body: Callable[[], int], *, debug: bool = False, interrupted: str | None = None,
                describe: Callable[[Exception], str] = unforeseen) -> int:
    """`body()`'s exit code, with every error turned into one line on stderr and its exit code: USER_ERRORS
    exit 2 (or their `exit_code`), Ctrl-C exits 130 after the `interrupted` line (None: Python's own
    KeyboardInterrupt), anything else exits 1 with `describe(e)`. `debug`: the traceback too."""
    try:
        return body()
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a failure we did not foresee: still one line, unless --debug
        if debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
