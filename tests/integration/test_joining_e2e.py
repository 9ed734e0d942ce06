"""Joining a cluster never hangs: a dead `RAY_ADDRESS`, a head that stops answering, a missing or wrong token, and
the record a crashed `ray start` cluster leaves behind, each decided within seconds by every command that connects,
against real `ray start --head` clusters of their own (a private RAY_TMPDIR each, so the record is theirs)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from raytrain_app.ray_adapter.joining import Join, plan_join
from tests.conftest import (
    RAY_BIN,
    REPO_ROOT,
    _free_port,
    _stop_cluster,
    base_env,
    main_command,
    require_slow,
    slow_resource,
)
from tests.helpers import TINY_MODEL

# The probe's deadline, shortened from its default 10 s: a head on this machine answers in milliseconds.
DEADLINE_S = 3
# Every refusal comes within a command's start (Python, torch and pyarrow imports, reading its data: measured in
# each test as `startup_s`, a refusal that needs no answer at all) plus, for a head that does not answer, that
# deadline; `ray.init` alone waited over 90 s.


@dataclass
class Head:
    address: str
    tmpdir: str  # RAY_TMPDIR: Ray's temp folder, and so the record `ray/ray_current_cluster`, are inside it
    env: dict[str, str]

    @property
    def record(self) -> Path:
        return Path(self.tmpdir) / "ray" / "ray_current_cluster"

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"])
                if any(self.tmpdir in arg or self.address in arg for arg in p.info["cmdline"] or [])]

    def gcs(self) -> psutil.Process:
        [gcs] = [p for p in self.processes() if p.name() == "gcs_server"]
        return gcs


def start_head() -> Head:
    """`ray start --head` as a user runs it (token authentication on, as the session cluster), with every port its
    own so it runs beside the session's clusters."""
    require_slow("starts a Ray cluster of its own")
    tmpdir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, client_port, agent_port = (_free_port() for _ in range(3))
    env = {**base_env(), "RAY_TMPDIR": tmpdir, "RAYTRAIN_CONNECT_TIMEOUT_S": str(DEADLINE_S)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(RAY_BIN), "start", "--head", "--num-cpus", "1", "--port", str(port),
                    "--include-dashboard=false", "--ray-client-server-port", str(client_port),
                    "--dashboard-agent-listen-port", str(agent_port), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    return Head(f"127.0.0.1:{port}", tmpdir, env)


def stop_head(head: Head) -> None:
    for proc in head.processes():  # a stopped process cannot die of SIGKILL until it runs again
        try:
            proc.resume()
        except psutil.NoSuchProcess:
            pass
    _stop_cluster(head.tmpdir, head.address)
    shutil.rmtree(head.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
@slow_resource
def head() -> Iterator[Head]:
    head = start_head()
    try:
        yield head
    finally:
        stop_head(head)


def run(module: str, args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
    start = time.monotonic()
    result = subprocess.run(main_command(*args, module=module), env=env, capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=timeout)
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
@slow_resource
def startup_s(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long `python -m raytrain_app.main` takes here to refuse an address where nothing listens (refused at
    the first connection, no waiting): a command's start, measured now, on this machine as loaded as it is."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, took = run("raytrain_app.main", train_args(dataset, tmp_path_factory.mktemp("baseline")),
                       {**base_env(), "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_refused(result, took, f"RAY_ADDRESS=127.0.0.1:{port}: nothing answers there (connection refused)")
    return took


def assert_refused(result: subprocess.CompletedProcess, took: float, *expected: str,
                   within: float | None = None) -> str:
    """Exit code 2 (within `within` seconds if given), and exactly one line on stderr holding every `expected`
    text."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert within is None or took < within, f"took {took:.1f} s, more than {within:.1f} s"
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and all(text in line for text in expected), line
    return line


def train_args(dataset: Path, save_dir: Path) -> list[str]:
    return ["--data", str(dataset), "--save-dir", str(save_dir), "--num-workers", "1", "--epochs", "1",
            "--batch-size", "64", *TINY_MODEL]


@pytest.mark.e2e
def test_a_head_that_stops_answering_is_refused_in_seconds_whichever_way_it_is_named(
        head: Head, dataset: Path, tmp_path: Path, startup_s: float) -> None:
    # A command start and the deadline, with as much again for a machine whose load changes between two runs.
    within = startup_s + 2 * DEADLINE_S
    gcs = head.gcs()
    gcs.suspend()  # SIGSTOP: the port still accepts connections, nothing answers on them
    try:
        by_address = {**head.env, "RAY_ADDRESS": head.address}
        result, took = run("raytrain_app.main", train_args(dataset, tmp_path / "a"), by_address)
        assert_refused(result, took, f"RAY_ADDRESS={head.address}", f"no answer within {DEADLINE_S} s",
                       "unset RAY_ADDRESS", within=within)
        assert took >= DEADLINE_S  # it did wait for the answer, for the deadline only
        # The head this machine's `ray start` recorded, no RAY_ADDRESS: refused too, not replaced by a second
        # instance beside a cluster that is still there.
        result, took = run("raytrain_app.main", train_args(dataset, tmp_path / "b"), head.env)
        assert_refused(result, took, f"the Ray cluster recorded in {head.record} ({head.address})",
                       "no answer within", "`ray stop --force`", within=within)
        # The jobs helper asks the same head where its job API is: Ray's client waited 40 s there.
        result, took = run("raytrain_app.jobs", ["status", "some-run"], by_address, timeout=120)
        assert_refused(result, took, f"cannot reach the Ray job API of the Ray cluster at {head.address}",
                       "no answer within", within=within)
    finally:
        gcs.resume()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written
    # Answering again, the same head is joined, named either way: the probe refused it for hanging, nothing else.
    assert plan_join(by_address) == Join(head.address)
    assert plan_join(head.env) == Join("auto")


@pytest.mark.e2e
def test_a_missing_or_wrong_token_is_named_instead_of_retried(head: Head, dataset: Path, tmp_path: Path,
                                                              startup_s: float) -> None:
    within = startup_s + DEADLINE_S  # refused at the head's first answer, never waiting for a deadline
    env = {**head.env, "RAY_ADDRESS": head.address}
    env.pop("RAY_AUTH_MODE")  # an explicit address sends Ray's token only with RAY_AUTH_MODE=token
    result, took = run("raytrain_app.main", train_args(dataset, tmp_path / "a"), env)
    assert_refused(result, took, f"RAY_ADDRESS={head.address}: the cluster requires a token and this process "
                                 "sends none: set RAY_AUTH_MODE=token", within=within)
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env = {**head.env, "RAY_ADDRESS": head.address, "RAY_AUTH_TOKEN_PATH": str(wrong)}
    result, took = run("raytrain_app.main", train_args(dataset, tmp_path / "b"), env)
    assert_refused(result, took, f"the cluster refused this process's token (from {wrong})", within=within)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.e2e
def test_a_crashed_clusters_record_gives_a_private_instance_and_dead_addresses_are_refused(
        dataset: Path, tmp_path: Path, startup_s: float) -> None:
    crashed = start_head()
    try:
        for proc in crashed.processes():  # a crash: no `ray stop`, so the record stays
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(crashed.processes(), timeout=15)
        assert crashed.record.read_text().strip() == crashed.address
        save = tmp_path / "ckpt"
        result, _ = run("raytrain_app.main", train_args(dataset, save), crashed.env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert (f"note: the Ray cluster recorded in {crashed.record} ({crashed.address}) is gone: nothing answers "
                "there (connection refused)") in result.stdout
        assert "starting a private local Ray instance instead" in result.stdout
        assert (save / "best_model.pt").is_file()  # it trained, on the private instance
    finally:
        stop_head(crashed)

    # A RAY_ADDRESS where nothing listens: every command that connects refuses it at once, nothing written. The
    # crashed head's port is free again.
    dead = {**base_env(), "RAY_ADDRESS": crashed.address}
    best = str(save / "best_model.pt")
    commands = {
        "raytrain_app.main": train_args(dataset, tmp_path / "main"),
        "raytrain_app.tune": ["--base-checkpoint", best, "--data", str(dataset), "--save-dir",
                              str(tmp_path / "tune"), "--lr-grid", "1e-4,1e-3", "--epochs", "2"],
        "raytrain_app.predict": ["--checkpoint", best, "--data", str(dataset), "--split", "val", "--out",
                                 str(tmp_path / "predict")],
    }
    for module, args in commands.items():
        result, took = run(module, args, dead)
        assert_refused(result, took, f"RAY_ADDRESS={crashed.address}: nothing answers there (connection refused)",
                       within=startup_s + DEADLINE_S)
    assert not any((tmp_path / name).exists() for name in ("main", "tune", "predict", "predict.partial"))


def test_the_jobs_helpers_address_flag_wins_over_the_environment(job_api: str) -> None:
    """Ray's job client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given; the helper's
    --address (here the session cluster's job API) must win, as documented, with dead addresses in both. A process
    of its own: Ray's token loader caches what it read in a process."""
    env = {**base_env(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{_free_port()}",
           "RAY_ADDRESS": f"127.0.0.1:{_free_port()}"}
    result = subprocess.run(main_command("status", "no-such-run", "--address", job_api, module="raytrain_app.jobs"),
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == "error: no job of run or submission id 'no-such-run' on this cluster (see `ray job list`)", line
