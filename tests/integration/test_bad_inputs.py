"""The mistakes with `python -m raytrain_app.main` that only the cluster can tell (what it can ever offer), made for
real as processes against the session's cluster: one line on stderr naming the input and the cause, exit 2, no
traceback of ours, and no file written or changed. The mistakes found before Ray: tests/unit/test_bad_inputs.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_main, write_dataset
from tests.helpers import TINY_MODEL, tree

# Each case: (the flags, what the message says); --data is a good dataset, --save-dir a folder of the test's.
Case = tuple[Callable[[Path], list[str]], str]
# Found by asking the cluster what it can ever offer: real processes against the session's cluster.
CLUSTER_CASES: dict[str, Case] = {
    "--use-gpu without a GPU": (lambda d: ["--use-gpu"],
                                r"--use-gpu: this cluster has no GPU \(CPU 4\); drop --use-gpu"),
    "more workers than the cluster can place": (
        lambda d: ["--num-workers", "9", "--batch-size", "4"],
        r"--num-workers 9: each worker needs CPU 1 and this cluster has CPU 4, so at most 4 worker\(s\) can ever be "
        r"placed; lower --num-workers"),
}


@pytest.mark.parametrize("case", CLUSTER_CASES)
def test_a_bad_input_gets_one_line_a_non_zero_exit_and_writes_nothing(
        case: str, tmp_path: Path, ray_address: str) -> None:
    setup, message = CLUSTER_CASES[case]
    flags = setup(tmp_path)
    argv = [*TINY_MODEL, "--num-workers", "1", "--epochs", "2", *flags,
            "--data", str(write_dataset(tmp_path / "good.pkl")), "--save-dir", str(tmp_path / "runs")]
    before = tree(tmp_path)
    result = run_main(argv, ray_address, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), output
    assert result.stderr.strip().splitlines()[-1] == errors[0], output  # the last word is ours
    # No traceback of ours (Ray's actors log theirs on lines that name their pid).
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line]
    assert tree(tmp_path) == before  # nothing written or changed: no run folder, no best_model.pt
    assert not (tmp_path / "runs").exists()
