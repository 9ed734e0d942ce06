"""Training as Ray jobs on the session's real cluster (token auth, loopback): `ray job submit`, a graceful
`ray job stop` that saves the current step, resubmission that ends bit-identical to an uninterrupted run, and
the submit helper bringing a run whose driver is SIGKILLed to completion by itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from raytrain_app.cli.flags import parse_config
from tests.conftest import (
    RAY_BIN,
    REPO_ROOT,
    base_env,
    computed_once,
    finish_process,
    latest_checkpoint_step,
    run_jobs,
    run_main,
    write_dataset,
)
from tests.helpers import TINY_MODEL, assert_same_training_state, ckpt

pytestmark = pytest.mark.e2e

EPOCHS, STEPS_PER_EPOCH = 4, 128  # 2048 sequences / batch 16, one worker: about 5 s of training here
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
# Validations (and checkpoints) at steps 50, 100, 128, 178, ...: training steps take most of the time between
# them, so a stop usually lands between two and saves a step of its own.
EVAL_EVERY = 50


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("jobs-data") / "train.pkl", num_train=2048)


def train_args(dataset: Path, save_dir: Path) -> list[str]:
    return ["--data", str(dataset), "--save-dir", str(save_dir), "--num-workers", "1", "--batch-size", "16",
            "--epochs", str(EPOCHS), "--eval-every", str(EVAL_EVERY), "--dropout", "0.1", "--aug-noise-std", "0.05",
            *TINY_MODEL]


def ray_job(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The `ray job` CLI as a user runs it, from the repository root (the runtime env's working_dir)."""
    return subprocess.run([str(RAY_BIN), "job", *args], env=base_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def wait_for(condition, what: str, timeout: float = 180, every: float = 0.05):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_status(job_api: str, submission_id: str) -> str:
    """The status `python -m raytrain_app.jobs status` reports (it finds plain `ray job submit` jobs by id)."""
    result = run_jobs("status", "--address", job_api, submission_id)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = result.stdout.strip().splitlines()
    return re.match(rf"{submission_id}  attempt -  ([A-Z]+)\b", line).group(1)


@pytest.fixture(scope="module")
def reference(shared_tmp: Path, dataset: Path, ray_address: str) -> Path:
    """The final state.pt of the same command run without interruption (trained once per test session)."""

    def train(save_dir: Path) -> str:
        args = train_args(dataset, save_dir)
        result = run_main(args, ray_address)
        assert result.returncode == 0, result.stdout + result.stderr
        return str(ckpt(save_dir / parse_config(args)[0].default_run_name(), LAST_STEP) / "state.pt")

    return Path(computed_once(shared_tmp, "jobs-uninterrupted", train))


def test_ray_job_stop_saves_the_current_step_and_the_resubmitted_job_ends_bit_exact(
        tmp_path: Path, dataset: Path, job_api: str, reference: Path) -> None:
    args = train_args(dataset, tmp_path / "ckpt")
    run_dir = tmp_path / "ckpt" / parse_config(args)[0].default_run_name()
    submit = ["submit", "--address", job_api, "--runtime-env", "jobs/runtime_env.yaml"]
    entrypoint = ["--", "python", "-m", "raytrain_app.main", *args]

    stop_id, resubmit_id = f"stop-{tmp_path.name}", f"resubmit-{tmp_path.name}"  # unique per session
    first = ray_job(*submit, "--submission-id", stop_id, "--no-wait", *entrypoint)
    assert first.returncode == 0, first.stdout + first.stderr
    wait_for(lambda: latest_checkpoint_step(run_dir), "the job's first checkpoint")
    stopped = ray_job("stop", "--address", job_api, stop_id)  # waits until the job has stopped
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert job_status(job_api, stop_id) == "STOPPED"
    logs = ray_job("logs", "--address", job_api, stop_id).stdout
    saved = re.search(r"Stopped by SIGINT at epoch (\d+), global step (\d+): that step is checkpointed", logs)
    assert saved, logs  # the driver's own line: it exits only after the workers saved
    stop_step = int(saved.group(2))
    assert stop_step < LAST_STEP, "the job finished before it was stopped"
    # The step it stopped at is the run's latest checkpoint, saved without a validation when it fell between two.
    assert latest_checkpoint_step(run_dir) == stop_step
    meta = json.loads((ckpt(run_dir, stop_step) / "meta.json").read_text())
    validated = stop_step % EVAL_EVERY == 0 or stop_step % STEPS_PER_EPOCH == 0
    assert (meta["eval_val_loss"] is not None) == validated, (stop_step, meta)

    second = ray_job(*submit, "--submission-id", resubmit_id, *entrypoint, timeout=300)  # follows to the end
    assert second.returncode == 0, second.stdout + second.stderr
    assert job_status(job_api, resubmit_id) == "SUCCEEDED"
    assert "has checkpoints: continuing it from its latest one" in second.stdout
    assert f"Resuming from global step {stop_step}" in second.stdout, second.stdout
    assert_same_training_state(reference, ckpt(run_dir, LAST_STEP) / "state.pt", LAST_STEP, EPOCHS)


def job_drivers(save_dir: Path) -> list[psutil.Process]:
    """The driver processes of jobs training into `save_dir` (children of Ray's job supervisor)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "raytrain_app.main" in cmdline and str(save_dir) in cmdline and "raytrain_app.jobs" not in cmdline:
            found.append(proc)
    return found


def test_submit_helper_resubmits_after_the_driver_is_killed_and_the_run_finishes_bit_exact(
        tmp_path: Path, dataset: Path, job_api: str, reference: Path) -> None:
    save_dir = tmp_path / "ckpt"
    args = train_args(dataset, save_dir)
    run_name = parse_config(args)[0].default_run_name()
    run_dir = save_dir / run_name
    log = open(tmp_path / "helper.log", "w+")  # noqa: SIM115 - read back by finish_process
    # The repository's runtime env plus storage credentials, which the driver also forwards to its workers:
    # Ray refuses a driver runtime env that repeats a job's variable, so the driver must leave them to the job.
    runtime_env = yaml.safe_load((REPO_ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] = "testing"
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    helper = subprocess.Popen([sys.executable, "-m", "raytrain_app.jobs", "submit", "--address", job_api,
                               "--retries", "2", "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--", *args],
                              env=base_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                              start_new_session=True)
    try:
        killed_at = wait_for(lambda: latest_checkpoint_step(run_dir), "the first attempt's first checkpoint")
        [driver] = wait_for(lambda: job_drivers(save_dir), "the job's driver process")
        driver.send_signal(signal.SIGKILL)  # as an OOM kill or a lost head node would end it: no saving
    finally:
        output = finish_process(helper, log, timeout=300)
    assert helper.returncode == 0, output
    assert f"[jobs] run {run_name}: python -m raytrain_app.main" in output
    assert "[jobs] attempt 1/3: submitted" in output and "[jobs] attempt 2/3: submitted" in output
    assert re.search(r"attempt 1/3 \(\S+\) ended FAILED, exit code (-9|137)", output), output
    assert f"resubmitting: attempt 2 continues run {run_name} from its latest checkpoint" in output
    assert re.search(r"attempt 2/3 \(\S+\) ended SUCCEEDED", output), output
    assert "attempt 3/3" not in output
    resumed = int(re.search(r"Resuming from global step (\d+)", output).group(1))
    assert resumed >= killed_at
    assert_same_training_state(reference, ckpt(run_dir, LAST_STEP) / "state.pt", LAST_STEP, EPOCHS)

    status = run_jobs("status", "--address", job_api, run_name)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["1", "2"]  # "<id>  attempt N  STATUS..."
    assert "FAILED" in lines[0] and "SUCCEEDED" in lines[1]
    assert os.path.exists(ckpt(run_dir, LAST_STEP))
