"""Training and sweeps as Ray jobs that finish by themselves: `python -m raytrain_app.jobs submit ...`.

  submit [--address URL] [--retries N] [--runtime-env FILE] [--sweep] -- <raytrain_app.main or .tune flags>
      Submits through Ray's JobSubmissionClient, follows the logs, and when an attempt ends FAILED (driver killed,
      head restarted, node lost, training out of restarts) submits again, up to N more times. Every attempt has
      its own submission id and the same run name, so each one continues the run from its latest checkpoint.
      Not resubmitted: a success, a stop by a user (STOPPED: `stop` below or `ray job stop`), and a mistake in
      the command (exit 2), which another attempt would repeat.
  status RUN|ID      every attempt of a run (or one submission), with its status and exit code
  logs RUN|ID        the logs of a run's latest attempt (or one submission); --follow to keep following
  stop RUN|ID        stop a run's running attempt gracefully: the driver saves the current step first

The address is --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else a local cluster; Ray's token
authentication is used when the cluster has it (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token or
RAY_AUTH_TOKEN).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

from raytrain_app.cli.errors import EXIT_DIVERGED, EXIT_TRAINING_FAILED, EXIT_USER_ERROR, first_line, run_command
from raytrain_app.cli.flags import parse_config, parse_sweep_config
from raytrain_app.core.config import sweep_identity_hash
from raytrain_app.core.errors import UserError
from raytrain_app.observability.console import configure_console
from raytrain_app.ray_adapter.joining import ClusterUnreachable, check_job_api
from raytrain_app.storage.location import parse_location

DEFAULT_RUNTIME_ENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs",
                                   "runtime_env.yaml")
RUN_KEY, ATTEMPT_KEY = "raytrain_run", "raytrain_attempt"  # job metadata: which run, which attempt
POLL_S = 1.0
STOP_TIMEOUT_S = 900  # longer than any RAY_JOB_STOP_WAIT_TIME_S we set: Ray SIGKILLs the driver by then
# Failures another attempt would repeat: the runtime env (working_dir, pip) could not be set up.
NOT_RETRIED = ("RUNTIME_ENV_SETUP_FAILURE",)


class JobsError(UserError):
    """A mistake in a jobs command (exit code 2), or a cluster that stopped answering (exit code 1); one line."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Entry:
    """What every attempt runs: the module, its arguments with the run name pinned, and that name."""

    module: str
    args: list[str]
    run: str

    def entrypoint(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.args])


def plan_entry(training_args: list[str], sweep: bool) -> Entry:
    """Check the training command here, before any cluster time is spent, and pin its run (or sweep) name so
    that every attempt continues the same run."""
    if not training_args:
        raise JobsError("nothing to submit: give the training flags after --, e.g. "
                        "submit -- --data s3://bucket/data.pkl --save-dir s3://bucket/checkpoints")
    if sweep:
        sweep_cfg, cfg, _ = parse_sweep_config(training_args)
        name, flag = sweep_cfg.sweep_name or f"sweep-{sweep_identity_hash(sweep_cfg, cfg)}", "--sweep-name"
        pinned = sweep_cfg.sweep_name is not None
    else:
        cfg, _ = parse_config(training_args)
        name, flag, pinned = cfg.run_name or cfg.default_run_name(), "--run-name", cfg.run_name is not None
    save_dir = parse_location(cfg.save_dir, flag="--save-dir")
    if save_dir.is_local and not os.path.isabs(cfg.save_dir):
        raise JobsError(f"--save-dir {cfg.save_dir}: a job runs in a fresh copy of the working directory, so its "
                        "checkpoints must live elsewhere to survive it: give s3://bucket/prefix, gs://..., or an "
                        "absolute path on storage every node mounts")
    module = "raytrain_app.tune" if sweep else "raytrain_app.main"
    return Entry(module=module, args=[*training_args, *([] if pinned else [flag, name])], run=name)


def load_runtime_env(path: str) -> dict[str, Any]:
    """The job's runtime environment. A local working_dir is relative to this folder, as for `ray job submit`,
    and must hold this project: the job runs `python -m raytrain_app...` in it."""
    import yaml

    if not os.path.isfile(path):
        raise JobsError(f"--runtime-env {path} not found")
    with open(path) as f:
        env = yaml.safe_load(f) or {}
    if not isinstance(env, dict):
        raise JobsError(f"--runtime-env {path} must hold a mapping (working_dir, env_vars, ...)")
    working_dir = env.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        folder = os.path.abspath(working_dir)
        if not os.path.isdir(os.path.join(folder, "raytrain_app")):
            raise JobsError(f"the runtime env's working_dir {working_dir!r} is {folder}, which does not hold "
                            "raytrain_app/: run this command from the repository root")
        env["working_dir"] = folder
    return env


def connect(address: str | None) -> Any:
    if address:  # Ray's client prefers RAY_API_SERVER_ADDRESS and RAY_ADDRESS to its argument: --address wins here
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            os.environ.pop(name, None)
    try:
        check_job_api(address)  # in seconds: Ray's client may wait for minutes on a head that does not answer
    except ClusterUnreachable as e:
        raise JobsError(str(e)) from None
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - unreachable, refused, unauthorised: one line
        shown = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "auto"
        raise JobsError(f"cannot reach the Ray job API at {shown}: {first_line(e, type(e).__name__)} (start the "
                        "cluster, open its tunnel with `ray dashboard cluster.yaml`, or pass --address)") from None


def attempts_of(client: Any, run_or_id: str) -> list[Any]:
    """The submissions of a run, oldest first; or the one submission with that id."""
    every = client.list_jobs()
    jobs = ([j for j in every if (j.metadata or {}).get(RUN_KEY) == run_or_id]
            or [j for j in every if j.submission_id == run_or_id])
    if not jobs:
        raise JobsError(f"no job of run or submission id {run_or_id!r} on this cluster (see `ray job list`)")
    return sorted(jobs, key=lambda j: j.start_time or 0)


def describe(job: Any) -> str:
    code = "" if job.driver_exit_code is None else f", exit code {job.driver_exit_code}"
    why = (job.message or "").strip().splitlines()
    reason = f": {why[0][:160]}" if why and job.status.value in ("FAILED", "STOPPED") else ""
    return f"{job.status.value}{code}{reason}"


def _wait_for_api(client: Any, timeout: float) -> None:
    """Wait for the job API to answer again (a head node restarting), up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_jobs()
            return
        except Exception:  # noqa: BLE001 - still down
            if time.monotonic() > deadline:
                raise JobsError(f"the Ray job API did not answer for {timeout:.0f} s; the job may still be "
                                "running: see `python -m raytrain_app.jobs status RUN` once the cluster answers",
                                exit_code=EXIT_TRAINING_FAILED) from None
            time.sleep(5)


async def _follow(client: Any, submission_id: str, reconnect_timeout: float) -> Any | None:
    """Print the job's logs as they come until it ends; its final details, or None when the cluster lost it
    (the head restarted and forgot its jobs)."""
    printed = 0  # characters already shown: a reconnect re-reads the log from the start
    while True:
        try:
            seen = 0
            async for chunk in client.tail_job_logs(submission_id):
                new = chunk[max(0, printed - seen):]
                seen += len(chunk)
                if new:
                    sys.stdout.write(new)
                    sys.stdout.flush()
                    printed += len(new)
            info = client.get_job_info(submission_id)
            if info.status.is_terminal():
                return info
            await asyncio.sleep(POLL_S)
        except Exception as e:  # noqa: BLE001 - connection lost or the job unknown: find out which
            if "does not exist" in str(e):
                return None
            print(f"\n[jobs] lost contact with the cluster ({type(e).__name__}); waiting up to "
                  f"{reconnect_timeout:.0f} s for it", flush=True)
            _wait_for_api(client, reconnect_timeout)
            try:
                client.get_job_info(submission_id)
            except Exception as again:  # noqa: BLE001 - lost again: the next round finds out which
                if "does not exist" in str(again):  # the restarted head does not know the job
                    return None


def submit(args: argparse.Namespace) -> int:
    entry = plan_entry(args.training_args, args.sweep)
    runtime_env = load_runtime_env(args.runtime_env)
    client = connect(args.address)
    running = [j.submission_id for j in client.list_jobs()
               if (j.metadata or {}).get(RUN_KEY) == entry.run and not j.status.is_terminal()]
    if running:  # two drivers on one run would train it twice over
        raise JobsError(f"run {entry.run} has an attempt still running ({running[0]}): follow it with "
                        f"`python -m raytrain_app.jobs logs --follow {entry.run}` or stop it with "
                        f"`python -m raytrain_app.jobs stop {entry.run}`")
    total = args.retries + 1
    history: list[str] = []
    print(f"[jobs] run {entry.run}: {entry.entrypoint()}", flush=True)
    for attempt in range(1, total + 1):
        submission_id = f"{entry.run}-{attempt}-{secrets.token_hex(3)}"
        _submit(client, entry, submission_id, runtime_env, attempt, args.reconnect_timeout)
        print(f"[jobs] attempt {attempt}/{total}: submitted {submission_id}", flush=True)
        if args.no_follow:
            print(f"[jobs] not following (--no-follow): python -m raytrain_app.jobs logs --follow {entry.run}")
            return 0
        info = asyncio.run(_follow(client, submission_id, args.reconnect_timeout))
        outcome = "LOST (the cluster no longer knows this job)" if info is None else describe(info)
        history.append(f"attempt {attempt}: {submission_id} {outcome}")
        print(f"\n[jobs] attempt {attempt}/{total} ({submission_id}) ended {outcome}", flush=True)
        if (final := _final_outcome(info, entry.run)) is not None:
            message, code = final
            if message:
                print(message)
            _print_history(history)
            return code
        if attempt < total:
            print(f"[jobs] resubmitting: attempt {attempt + 1} continues run {entry.run} from its latest "
                  "checkpoint", flush=True)
    print(f"[jobs] run {entry.run} did not finish in {total} attempt(s); submit again to continue it.")
    _print_history(history)
    return EXIT_TRAINING_FAILED


def _final_outcome(info: Any | None, run: str) -> tuple[str, int] | None:
    """(what to say, exit code) when an attempt's end must not be retried; None to resubmit."""
    if info is None:
        return None  # lost with the head: resubmit
    if info.status.value == "SUCCEEDED":
        return "", 0
    if info.status.value == "STOPPED":
        return (f"[jobs] stopped by a user: not resubmitting. Continue it with the same command, which resumes run "
                f"{run} from its latest checkpoint.", EXIT_TRAINING_FAILED)
    if info.driver_exit_code == EXIT_USER_ERROR:
        return ("[jobs] the command was refused (exit 2, see the line above): another attempt would repeat it.",
                EXIT_USER_ERROR)
    if info.driver_exit_code == EXIT_DIVERGED:
        return ("[jobs] training diverged (exit 3, see the lines above): another attempt would diverge again. "
                "Submit the printed command, which forks from the last good checkpoint with a lower --lr.",
                EXIT_DIVERGED)
    if info.error_type in NOT_RETRIED:
        return f"[jobs] the job could not start ({info.error_type}): another attempt would repeat it.", EXIT_USER_ERROR
    return None


def _submit(client: Any, entry: Entry, submission_id: str, runtime_env: dict[str, Any], attempt: int,
            reconnect_timeout: float) -> None:
    """Submit one attempt; a head that does not answer (restarting) is waited for once."""
    for last_try in (False, True):
        try:
            client.submit_job(entrypoint=entry.entrypoint(), submission_id=submission_id, runtime_env=runtime_env,
                              metadata={RUN_KEY: entry.run, ATTEMPT_KEY: str(attempt)})
            return
        except Exception as e:  # noqa: BLE001 - refused (bad runtime env, auth) or unreachable: one line
            reason = first_line(e, type(e).__name__)
            if last_try or not _is_connection_error(e):
                raise JobsError(f"submitting {submission_id} failed: {reason}") from None
            print(f"[jobs] the job API did not answer ({reason}); waiting up to {reconnect_timeout:.0f} s",
                  flush=True)
            _wait_for_api(client, reconnect_timeout)


def _is_connection_error(e: Exception) -> bool:
    import requests

    return isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError))


def _print_history(history: list[str]) -> None:
    print("[jobs] attempts:")
    for line in history:
        print(f"  {line}")


def status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    for job in attempts_of(client, args.run):
        meta = job.metadata or {}
        print(f"{job.submission_id}  attempt {meta.get(ATTEMPT_KEY, '-')}  {describe(job)}")
    return 0


def logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    job = attempts_of(client, args.run)[-1]
    if args.follow:
        asyncio.run(_follow(client, job.submission_id, args.reconnect_timeout))
    else:
        sys.stdout.write(client.get_job_logs(job.submission_id))
    return 0


def stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    running = [j for j in attempts_of(client, args.run) if not j.status.is_terminal()]
    if not running:
        print(f"nothing to stop: no attempt of {args.run} is running")
        return 0
    for job in running:
        client.stop_job(job.submission_id)
        print(f"stopping {job.submission_id}: the driver saves the current step, then exits", flush=True)
        if not args.no_wait:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while not (info := client.get_job_info(job.submission_id)).status.is_terminal():
                if time.monotonic() > deadline:
                    raise JobsError(f"{job.submission_id} has not stopped after {STOP_TIMEOUT_S} s",
                                    exit_code=EXIT_TRAINING_FAILED)
                time.sleep(POLL_S)
            print(f"{job.submission_id}: {describe(info)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raytrain_app.jobs",
                                     description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--address", help="Ray job API address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS).")
        p.add_argument("--reconnect-timeout", type=float, default=600.0,
                       help="Seconds to wait for a head node that stops answering (default: 600).")
        return p

    p = add("submit", "submit training (or a sweep) and resubmit it until it finishes")
    p.add_argument("--retries", type=int, default=3, help="Resubmissions after an attempt fails (default: 3).")
    p.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV, help="Runtime environment YAML "
                   "(default: jobs/runtime_env.yaml: this folder as working_dir, graceful stop settings).")
    p.add_argument("--sweep", action="store_true", help="Submit `raytrain_app.tune` instead of `raytrain_app.main`.")
    p.add_argument("--no-follow", action="store_true", help="Submit one attempt and return (no logs, no retries).")
    p.add_argument("training_args", nargs=argparse.REMAINDER, help="-- then the training (or sweep) flags")
    p.set_defaults(func=submit)
    for name, func, help_text in (("status", status, "every attempt of a run"),
                                  ("logs", logs, "logs of a run's latest attempt"),
                                  ("stop", stop, "stop a run gracefully (the current step is saved)")):
        p = add(name, help_text)
        p.add_argument("run", metavar="RUN|ID", help="run name (see `submit`'s first line) or submission id")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="Keep printing until the attempt ends.")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="Return without waiting for the job to end.")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_console()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "submit":
        args.training_args = args.training_args[1:] if args.training_args[:1] == ["--"] else args.training_args
        if args.retries < 0:
            print("error: --retries must not be negative", file=sys.stderr)
            return EXIT_USER_ERROR
    # A JobsError carries its own exit code; an error from the job API (auth, a lost head) is one line.
    return run_command(lambda: args.func(args), describe=lambda e: f"the Ray job API failed: {type(e).__name__}: "
                                                                   f"{first_line(e, type(e).__name__)}",
                       interrupted="\n[jobs] stopped following; the job keeps running. Follow it again with "
                                   "`python -m raytrain_app.jobs logs --follow RUN`, stop it with `... jobs stop RUN`.")


if __name__ == "__main__":
    sys.exit(main())
