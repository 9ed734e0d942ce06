"""The environment settings the driver reads for its workers and Ray Train: the fault-injection delay (tests only)
and how often an elastic run looks for more workers."""

from __future__ import annotations

import pytest

from raytrain_app.core.config import ConfigError
from raytrain_app.ray_adapter.driver import DEFAULT_RESIZE_INTERVAL_S, resize_interval_s
from raytrain_app.ray_adapter.fault_injection import STEP_DELAY_ENV_VAR, step_delay_s


@pytest.mark.parametrize(("value", "delay"), [(None, 0.0), ("0.25", 0.25), ("0", 0.0), ("-1", 0.0), ("soon", 0.0)])
def test_the_step_delay_is_what_the_variable_says_or_none(value: str | None, delay: float) -> None:
    environ = {} if value is None else {STEP_DELAY_ENV_VAR: value}
    assert step_delay_s(environ) == delay


def test_a_delay_read_from_a_file_follows_the_file(tmp_path) -> None:
    delay = tmp_path / "delay"
    environ = {STEP_DELAY_ENV_VAR: f"@{delay}"}
    assert step_delay_s(environ) == 0.0  # no file yet
    delay.write_text("0.7")
    assert step_delay_s(environ) == 0.7
    delay.write_text("0")
    assert step_delay_s(environ) == 0.0


def test_the_resize_interval_is_rays_default_unless_set() -> None:
    assert resize_interval_s({}) == DEFAULT_RESIZE_INTERVAL_S == 60.0
    assert resize_interval_s({"RAYTRAIN_ELASTIC_RESIZE_INTERVAL_S": "2.5"}) == 2.5


@pytest.mark.parametrize("value", ["0", "-3", "often", ""])
def test_a_bad_resize_interval_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resize_interval_s({"RAYTRAIN_ELASTIC_RESIZE_INTERVAL_S": value})
    assert str(raised.value) == (f"RAYTRAIN_ELASTIC_RESIZE_INTERVAL_S={value}: give a number of seconds above 0 "
                                 "(default 60)")
