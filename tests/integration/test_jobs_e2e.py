"""Training as Ray jobs on the session's real cluster (token auth, loopback): the submit helper bringing a run
whose driver is SIGKILLed back by itself, a graceful `ray job stop` that saves the current step, and a
resubmission with `ray job submit` that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from raytrain_app.cli.flags import parse_config
from tests.conftest import (
    RAY_BIN,
    REPO_ROOT,
    base_env,
    finish_process,
    latest_checkpoint_step,
    output_so_far,
    run_jobs,
    wait_until,
)
from tests.helpers import LAST_STEP, STEPS_PER_EPOCH, assert_same_training_state, ckpt, train_args

pytestmark = pytest.mark.e2e

# A fault-injection delay after each step (longer than the other runs': `ray job stop` starts a CLI process, and
# the stop must land before the 48 steps are done).
JOB_STEP_DELAY_S = "0.15"


def ray_job(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The `ray job` CLI as a user runs it, from the repository root (the runtime env's working_dir)."""
    return subprocess.run([str(RAY_BIN), "job", *args], env=base_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def job_status(job_api: str, submission_id: str) -> str:
    """The status `python -m raytrain_app.jobs status` reports (it finds plain `ray job submit` jobs by id)."""
    result = run_jobs("status", "--address", job_api, submission_id)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = result.stdout.strip().splitlines()
    return re.match(rf"{submission_id}  attempt -  ([A-Z]+)\b", line).group(1)


def job_drivers(save_dir: Path) -> list[psutil.Process]:
    """The driver processes of jobs training into `save_dir` (children of Ray's job supervisor)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "raytrain_app.main" in cmdline and str(save_dir) in cmdline and "raytrain_app.jobs" not in cmdline:
            found.append(proc)
    return found


def test_a_job_survives_a_killed_driver_and_a_stop_and_the_resubmitted_job_ends_bit_exact(
        tmp_path: Path, dataset: Path, job_api: str, uninterrupted) -> None:
    """One run, submitted as Ray jobs three times, as its users do:
      1. the submit helper submits it; its driver is SIGKILLed (an OOM kill, a lost head node: nothing saved),
         and the helper submits attempt 2, which continues from the latest checkpoint;
      2. `ray job stop` stops attempt 2 gracefully (jobs/runtime_env.yaml's RAY_JOB_STOP_SIGNAL): the driver
         saves the step it is at before it exits, and the helper does not resubmit a job a user stopped;
      3. `ray job submit` of the same command continues from that step to the end,
    and the run ends with the bits of the session's uninterrupted run of the same command."""
    reference = uninterrupted(2)
    save_dir = tmp_path / "ckpt"
    args = train_args(dataset, save_dir, 2)
    run_name = parse_config(args)[0].default_run_name()
    run_dir = save_dir / run_name
    # The repository's runtime env plus storage credentials, which the driver also forwards to its workers:
    # Ray refuses a driver runtime env that repeats a job's variable, so the driver must leave them to the job.
    runtime_env = yaml.safe_load((REPO_ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(AWS_ACCESS_KEY_ID="testing", RAYTRAIN_TEST_STEP_DELAY_S=JOB_STEP_DELAY_S)
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))

    log = open(tmp_path / "helper.log", "w+")
    helper = subprocess.Popen([sys.executable, "-m", "raytrain_app.jobs", "submit", "--address", job_api,
                               "--retries", "2", "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--", *args],
                              env=base_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                              start_new_session=True)
    try:
        killed_at = wait_until(lambda: latest_checkpoint_step(run_dir), "the first attempt's first checkpoint",
                               timeout=180, proc=helper, log=log)
        [driver] = wait_until(lambda: job_drivers(save_dir), "the job's driver process", proc=helper, log=log)
        driver.send_signal(signal.SIGKILL)  # as an OOM kill or a lost head node would end it: no saving
        second = wait_until(lambda: re.search(r"\[jobs\] attempt 2/3: submitted (\S+)", output_so_far(log)),
                            "the helper's second attempt", proc=helper, log=log).group(1)
        wait_until(lambda: (latest_checkpoint_step(run_dir) or 0) > killed_at,
                   "a checkpoint of the second attempt", timeout=180, proc=helper, log=log)
        stopped = ray_job("stop", "--address", job_api, second)  # waits until the job has stopped
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    finally:
        output = finish_process(helper, log, timeout=120)

    # 1. The helper resubmitted the killed attempt, and did not resubmit the stopped one.
    assert f"[jobs] run {run_name}: python -m raytrain_app.main" in output
    assert "[jobs] attempt 1/3: submitted" in output
    assert re.search(r"attempt 1/3 \(\S+\) ended FAILED, exit code (-9|137)", output), output
    assert f"resubmitting: attempt 2 continues run {run_name} from its latest checkpoint" in output
    assert int(re.search(r"Resuming from global step (\d+)", output).group(1)) >= killed_at
    assert re.search(rf"attempt 2/3 \({second}\) ended STOPPED", output), output
    assert f"[jobs] stopped by a user: not resubmitting. Continue it with the same command, which resumes run " \
        f"{run_name} from its latest checkpoint." in output
    assert "attempt 3/3" not in output and helper.returncode == 1, output
    # 2. The driver's own line: it exits only after the workers saved the step it stopped at, the run's latest
    #    checkpoint, saved without a validation when it fell between two.
    #    (The helper follows each attempt's logs: the driver's lines are in its output.)
    saved = re.search(r"Stopped by SIGINT at epoch (\d+), global step (\d+): that step is checkpointed", output)
    assert saved, output
    stop_step = int(saved.group(2))
    assert stop_step < LAST_STEP, "the job finished before it was stopped"
    assert latest_checkpoint_step(run_dir) == stop_step
    meta = json.loads((ckpt(run_dir, stop_step) / "meta.json").read_text())
    validated = stop_step % 3 == 0 or stop_step % STEPS_PER_EPOCH == 0
    assert (meta["eval_val_loss"] is not None) == validated, (stop_step, meta)

    # 3. `ray job submit` of the same command, followed to the end.
    resubmit_id = f"resubmit-{tmp_path.name}"  # unique per session
    last = ray_job("submit", "--address", job_api, "--runtime-env", str(tmp_path / "runtime_env.yaml"),
                   "--submission-id", resubmit_id, "--", "python", "-m", "raytrain_app.main", *args, timeout=300)
    assert last.returncode == 0, last.stdout + last.stderr
    assert job_status(job_api, resubmit_id) == "SUCCEEDED"
    assert f"Run {run_name} has checkpoints: continuing it from its latest one" in last.stdout
    assert f"Resuming from global step {stop_step}" in last.stdout, last.stdout
    assert_same_training_state(reference, ckpt(run_dir, LAST_STEP) / "state.pt")

    # The helper's record of the run: its two attempts.
    status = run_jobs("status", "--address", job_api, run_name)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["1", "2"]  # "<id>  attempt N  STATUS..."
    assert "FAILED" in lines[0] and "STOPPED" in lines[1]
