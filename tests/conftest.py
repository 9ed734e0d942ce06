"""Shared fixtures: one real Ray cluster (`ray start --head` on 127.0.0.1) for the session, tiny datasets, and
helpers that run `python -m raytrain_app.main` as a real process."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from raytrain_app.datasets.formats import make_synthetic, write_pickle_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")


# Hermetic: every process the suite starts (Ray, moto, the commands under test, wandb) gets a HOME, caches and a
# Ray auth token of its own, in a folder made for this test process, so nothing is read from or written to the
# user's ~/.ray, ~/.netrc, wandb settings or caches, and a machine where nothing ran before passes the same way.
_HERMETIC_DIR = Path(tempfile.mkdtemp(prefix="rt-home-"))
_RAY_TOKEN_PATH = _HERMETIC_DIR / "ray_auth_token"
_RAY_TOKEN_PATH.write_text(secrets.token_hex(32))
_RAY_TOKEN_PATH.chmod(0o600)
HERMETIC_ENV = {
    "HOME": str(_HERMETIC_DIR),
    "XDG_CACHE_HOME": str(_HERMETIC_DIR / ".cache"),
    "XDG_CONFIG_HOME": str(_HERMETIC_DIR / ".config"),
    "WANDB_CONFIG_DIR": str(_HERMETIC_DIR / ".config" / "wandb"),
    "WANDB_CACHE_DIR": str(_HERMETIC_DIR / ".cache" / "wandb"),
    "RAY_AUTH_TOKEN_PATH": str(_RAY_TOKEN_PATH),
}
for _name in ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "NETRC"):
    os.environ.pop(_name, None)
os.environ.update(HERMETIC_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HERMETIC_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests first (a stable sort: files keep their order). pytest-xdist hands each worker a contiguous
    share and an idle worker takes tests from the end of another's, so with the short tests last the two workers
    finish together instead of one waiting for the other's last long end-to-end test."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep every Ray process on 127.0.0.1
        "RAY_AUTH_MODE": "token",  # the test cluster uses Ray's default token auth
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train's controller polls workers every 0.05 s instead of the driver's default 0.2 s: each report
        # waits about one poll, and the suite reports hundreds of tiny checkpoints (README, "Precision and speed").
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05",
        # No preemption watcher (one more Ray process, about a second of CPU, at every worker-group start): the
        # session's single-node cluster is never drained. The elastic tests' two-node cluster keeps it and drains.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "PYTHONPATH": str(REPO_ROOT),
        # `python` on the test cluster is this environment's, as it is the image's on a real cluster: jobs run
        # the documented `python -m raytrain_app...` commands.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        # Credentials for the local S3 server (moto accepts any); the driver forwards them to the workers.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    })
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)  # tests name their endpoint in the URI
    return env


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3-protocol server (moto's standalone server) on 127.0.0.1 for the session; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The test process itself reads and writes the bucket too: give it the same credentials as the children
    # (unsigned requests are sent aws-chunked, which this server stores verbatim).
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()  # it takes 15 s to honour SIGTERM
        proc.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(endpoint: str, name: str) -> str:
    """Create a bucket on the test server; returns the s3:// URI prefix with the endpoint in it."""
    import pyarrow.fs as pafs

    host = endpoint.split("://", 1)[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", access_key="testing",
                      secret_key="testing", allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def s3_uri(bucket_uri: str, key: str, endpoint: str) -> str:
    return f"{bucket_uri}/{key}?endpoint_override={endpoint}"


_CLUSTER: dict[str, str] = {}  # the session cluster's job API URL, set with the cluster


def _stop_cluster(temp_dir: str, gcs_address: str) -> None:
    """Stop one local cluster: its processes (found by its temp dir or GCS address) and all their children.
    `ray stop` would stop every cluster on the machine, including the other test workers' ones."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
             and any(temp_dir in arg or gcs_address in arg for arg in p.info["cmdline"] or [])]
    procs = set(roots)
    for root in roots:
        try:
            procs.update(root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:  # as `ray stop --force`: nothing of a finished test session is worth waiting for
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


@pytest.fixture(scope="session")
def ray_address() -> str:
    """A real local Ray cluster shared by every test that trains; its own temp dir, so a user's or the demo's
    cluster is never touched. Each pytest-xdist worker starts its own, so every port is its own too (Ray's
    defaults for the client server and the dashboard agent are fixed ports)."""
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard_port, client_port, agent_port = (_free_port() for _ in range(4))
    env = base_env()
    cmd = [str(RAY_BIN), "start", "--head", "--num-cpus", "4", "--port", str(port), "--temp-dir", temp_dir,
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
           "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    # Every process of the cluster, Ray's own actors included, inherits this: Ray Train's placement-group cleaner
    # finds its cluster's state API by RAY_ADDRESS or, without it, by picking "the latest" of the clusters running
    # on the machine, which with one cluster per pytest worker is often the other one. It then takes a live run's
    # controller for dead and removes the run's placement group.
    env["RAY_ADDRESS"] = address
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        _CLUSTER.update(job_api=f"http://127.0.0.1:{dashboard_port}")
        yield address
    finally:
        _stop_cluster(temp_dir, address)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def job_api(ray_address: str) -> str:
    """The session cluster's job API (the dashboard's HTTP address), as `ray job submit --address` takes it."""
    return _CLUSTER["job_api"]


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder all pytest-xdist workers of this session share (each worker's own basetemp is inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def computed_once(shared_tmp: Path, key: str, compute: Any) -> Any:
    """`compute(folder)` run once per test session across all pytest-xdist workers (the others wait for it and
    reuse its JSON-able result): an expensive reference run is trained once, not once per worker."""
    from filelock import FileLock

    with FileLock(str(shared_tmp / f"{key}.lock")):
        done = shared_tmp / f"{key}.json"
        if done.exists():
            return json.loads(done.read_text())
        result = compute(shared_tmp / key)
        done.write_text(json.dumps(result))
        return result


def write_dataset(path: Path, **overrides: object) -> Path:
    sizes = {"num_train": 256, "num_val": 64, "seq_len": 8, "feature_dim": 4, "num_classes": 3,
             "per_step": False, "seed": 0}
    sizes.update(overrides)
    write_pickle_atomic(make_synthetic(**sizes), str(path))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny.pkl")


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """The session's pickle dataset converted to Parquet (train.parquet, val.parquet)."""
    out = tmp_path_factory.mktemp("parquet") / "tiny"
    result = subprocess.run([sys.executable, "-m", "raytrain_app.data", "convert", str(dataset), str(out)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def uninterrupted(shared_tmp: Path, dataset: Path, ray_address: str):  # noqa: ANN201
    """The final state.pt of an uninterrupted run of `tests.helpers.train_args` from the pickle, per worker count
    (trained once per test session, on first use, whichever pytest worker needs it first): what the resume, fault
    and storage tests' interrupted runs must end with, bit for bit. A Parquet copy of the data is read in the same
    order, so its runs must end with the same bits too."""
    # Here, not at the top: this file makes the environment hermetic before torch (tests.helpers imports it) loads.
    from tests.helpers import LAST_STEP, assert_kept_checkpoints, ckpt, run_name_of, train_args

    def final_state(workers: int) -> Path:
        def train(save_dir: Path) -> str:
            result = run_main(train_args(dataset, save_dir, workers), ray_address)
            assert result.returncode == 0, result.stdout + result.stderr
            run_dir = save_dir / run_name_of(result.stdout)
            assert_kept_checkpoints(result.stdout, run_dir, keep=2)
            return str(ckpt(run_dir, LAST_STEP) / "state.pt")

        return Path(computed_once(shared_tmp, f"uninterrupted-{workers}", train))

    return final_state


def main_command(*args: str, module: str = "raytrain_app.main") -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_main(args: list[str], ray_address: str | None = None, timeout: float = 300,
             cwd: Path | None = None, module: str = "raytrain_app.main") -> subprocess.CompletedProcess:
    env = base_env()
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(main_command(*args, module=module), env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO_ROOT)


def run_tune(args: list[str], ray_address: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_main(args, ray_address, timeout=timeout, module="raytrain_app.tune")


def run_jobs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m raytrain_app.jobs ...` (the job API address is given with --address)."""
    return run_main(list(args), timeout=120, cwd=cwd, module="raytrain_app.jobs")


def run_benchmark(script: str, *args: str, ray_address: str | None = None, timeout: float = 600) -> dict:
    """`python benchmarks/<script> ...` (on the cluster at `ray_address` if given); the JSON object it prints."""
    env = base_env()
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def latest_checkpoint_step(run_dir: Path | str) -> int | None:
    """The step of the run's latest checkpoint as Ray Train registered it (what a restart would load).
    `run_dir` is a local folder or a storage URI."""
    from raytrain_app.storage.location import StorageError, parse_location

    snapshot_file = parse_location(str(run_dir)).join("checkpoint_manager_snapshot.json")
    try:
        snapshot = json.loads(snapshot_file.read_bytes())
    except (FileNotFoundError, StorageError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"].split("=")[1]) if latest else None


def start_process(args: list[str], ray_address: str, module: str = "raytrain_app.main",
                  extra_env: dict[str, str] | None = None,
                  log_path: Path | None = None) -> tuple[subprocess.Popen, Any]:
    """Start a command as a real process in its own session (so the test can kill all of it); its output goes
    to the returned file: a temporary one, or `log_path` (which a test may read while the process runs)."""
    env = {**base_env(), "RAY_ADDRESS": ray_address, **(extra_env or {})}
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    proc = subprocess.Popen(main_command(*args, module=module), env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO_ROOT, start_new_session=True)
    return proc, log


def finish_process(proc: subprocess.Popen, log: Any, timeout: float = 240) -> str:
    """Wait for a process from `start_process` (SIGKILL its session if it outlives `timeout`); its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.seek(0)
    return log.read()


def run_until_checkpoint(args: list[str], ray_address: str, run_dir: Path | str, kill_at_steps: set[int],
                         timeout: float = 240) -> str:
    """Start training as a real process and SIGKILL it once the run's latest registered checkpoint is one of
    `kill_at_steps`. Returns its output."""
    proc, log = start_process(args, ray_address)
    deadline = time.monotonic() + timeout
    try:
        while latest_checkpoint_step(run_dir) not in kill_at_steps:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"training ended (rc {proc.returncode}) before a checkpoint at "
                                     f"{sorted(kill_at_steps)} was registered:\n{log.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint at {sorted(kill_at_steps)} in {run_dir} within {timeout} s")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: the way a lost node or OOM kill ends it
    finally:
        output = finish_process(proc, log, timeout=30)
    return output
