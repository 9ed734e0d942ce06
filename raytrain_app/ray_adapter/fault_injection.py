"""Fault injection for the test suite: a delay after every optimizer step, so that a test can stop, kill or
preempt a tiny run at a chosen step without making its data bigger.

`RAYTRAIN_TEST_STEP_DELAY_S=0.2` makes every Ray Train worker sleep 0.2 s after each optimizer step;
`RAYTRAIN_TEST_STEP_DELAY_S=@/path/to/file` reads the seconds from that file at every step instead, so that a test
can slow a run down until what it waits for has happened and then let it finish at full speed. The sleep is
outside the step, so nothing that is trained changes (a delayed run ends with the same bits as one without), only
when steps happen. The driver forwards the variable to its workers. Never set it for real work.
(docs/reliability.md, "Fault injection".)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

STEP_DELAY_ENV_VAR = "RAYTRAIN_TEST_STEP_DELAY_S"


def step_delay_s(environ: Mapping[str, str] = os.environ) -> float:
    """The delay asked for, in seconds; 0 when unset, negative, not a number, or a file that cannot be read."""
    text = environ.get(STEP_DELAY_ENV_VAR, "0")
    try:
        if text.startswith("@"):
            with open(text[1:]) as f:
                text = f.read()
        return max(0.0, float(text))
    except (OSError, ValueError):
        return 0.0


class StepDelay:
    """What a worker calls after each optimizer step: sleeps as `RAYTRAIN_TEST_STEP_DELAY_S` says (read once, or
    at every call when it names a file); does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.setting = {STEP_DELAY_ENV_VAR: environ.get(STEP_DELAY_ENV_VAR, "0")}  # the one variable it reads
        self.seconds = step_delay_s(self.setting)

    def __call__(self) -> None:
        if self.setting[STEP_DELAY_ENV_VAR].startswith("@"):
            self.seconds = step_delay_s(self.setting)
        if self.seconds:
            time.sleep(self.seconds)
