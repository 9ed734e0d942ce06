"""Shared fixtures: one real Ray cluster (`ray start --head` on 127.0.0.1) for the session, tiny datasets, and
helpers that run `python -m raytrain_app.main` as a real process."""

from __future__ import annotations

import json
import os
import secrets
import shlex
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
from raytrain_app.observability.console import configure_console

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

# The library's log lines reach the console as in a command (each command's main() does the same), so that a
# test calling a library function directly sees them with capsys.
configure_console()


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HERMETIC_DIR, ignore_errors=True)


# --- the two tiers ---------------------------------------------------------------------------------------------
# A test is `slow` when it uses, directly or through other fixtures, one of the fixtures registered here with
# `@slow_resource`: a Ray cluster, the S3 server, processes that train (the gloo harness, benchmarks, commands
# that start Ray). Nothing else marks a test: `make check` (-m "not slow") runs every other test, and a new test
# lands in its tier by what it asks for. `require_slow` makes the helpers that start such things refuse to run in
# a test that is not marked slow, so a test cannot reach them without the fixture and slip into the quick tier.
SLOW_FIXTURES: set[str] = set()


def slow_resource(fixture_function: Any) -> Any:
    """Register a fixture as a slow resource: put `@slow_resource` under its `@pytest.fixture(...)` line."""
    SLOW_FIXTURES.add(fixture_function.__name__)
    return fixture_function


_CURRENT: dict[str, pytest.Item] = {}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow tier (above). Then end-to-end tests first (a stable sort: files keep their order).
    pytest-xdist hands each worker a contiguous share and an idle worker takes tests from the end of another's, so
    with the short tests last the two workers finish together instead of one waiting for the other's last long
    end-to-end test."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is None, item.get_closest_marker("slow") is None))


def pytest_runtest_setup(item: pytest.Item) -> None:
    _CURRENT["item"] = item


def require_slow(what: str) -> None:
    """Fail a test that starts `what` (a Ray cluster, a training process, ...) without asking for a slow fixture."""
    item = _CURRENT.get("item")
    if item is not None and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} {what} but uses none of the slow fixtures ({', '.join(sorted(SLOW_FIXTURES))}):"
                    " ask for the one it needs, so that it runs in `make test` and not in `make check`",
                    pytrace=False)


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
        # No Ray metrics (nothing in the suite reads them): every Ray process of every run would record and export
        # its own, and Ray Train's controller and workers their training metrics (measured on the fork test, two
        # training commands: 51 CPU-seconds instead of 56).
        "RAY_enable_metrics_collection": "0",
        "RAY_TRAIN_METRICS_ENABLED": "0",
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


# The pids of S3 servers that outlive their pytest-xdist worker, in the folder the workers share.
S3_SERVERS = "s3-servers"


@pytest.fixture(scope="session")
@slow_resource
def s3_endpoint(shared_tmp: Path) -> str:
    """A real S3-protocol server (moto's standalone server) on 127.0.0.1 for the session; yields its URL.
    Under pytest-xdist it lives until the whole session ends, not just this worker's part: a run computed once on
    this worker's server (`computed_once`) is read from it by the other worker's tests, which may still be running
    when this worker is done. The controller stops it then (`pytest_sessionfinish`)."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The test process itself reads and writes the bucket too: give it the same credentials as the children
    # (unsigned requests are sent aws-chunked, which this server stores verbatim).
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    outlives_worker = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if outlives_worker:
        (shared_tmp / S3_SERVERS).mkdir(exist_ok=True)
        (shared_tmp / S3_SERVERS / str(proc.pid)).touch()
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        if not outlives_worker:
            _stop_s3_server(proc.pid)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stop_s3_server(pid: int) -> None:
    import psutil

    try:
        server = psutil.Process(pid)
        server.kill()  # it takes 15 s to honour SIGTERM
        server.wait(timeout=30)
    except psutil.NoSuchProcess:
        pass


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the pytest-xdist controller, once every worker is done: stop the workers' S3 servers."""
    if hasattr(session.config, "workerinput"):  # a worker: its server outlives it
        return
    folder = session.config._tmp_path_factory.getbasetemp() / S3_SERVERS  # the workers' shared folder
    for pid_file in sorted(folder.glob("*")) if folder.is_dir() else []:
        _stop_s3_server(int(pid_file.name))


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
@slow_resource
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
@slow_resource
def gloo_runs(shared_tmp: Path) -> Path:
    """The uninterrupted runs of the gloo harness (tests/distributed.py: processes that train, without Ray),
    trained once per test session."""
    from tests.distributed import runs_folder

    return runs_folder(shared_tmp)


@pytest.fixture
@slow_resource
def inductor() -> Any:
    """`torch.compile` (Inductor): its first compile of a model in a new checkout generates C++ and builds it with
    the system compiler in worker processes, 10 to 15 s here."""
    import torch

    return torch.compile


@pytest.fixture
@slow_resource
def gloo() -> Any:
    """tests.distributed.train_all, for a test that trains on 1 or 2 gloo processes of its own."""
    from tests.distributed import train_all

    return train_all


@pytest.fixture
@slow_resource
def pip() -> Any:
    """`python -m pip ARGS...` in this environment, checked (a build or an install: tens of seconds)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, timeout=300)

    return run


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
def regression_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tabular rows of 6 features with a float target each, as many as `dataset` (the same run geometry)."""
    sizes = {"num_train": 256, "num_val": 64, "per_step": False, "seed": 0, "task": "regression", "input_shape": (6,)}
    path = tmp_path_factory.mktemp("data") / "rows.pkl"
    write_pickle_atomic(make_synthetic(**sizes), str(path))
    return path


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """The session's pickle dataset converted to Parquet (train.parquet, val.parquet)."""
    out = tmp_path_factory.mktemp("parquet") / "tiny"
    result = subprocess.run([sys.executable, "-m", "raytrain_app.data", "convert", str(dataset), str(out)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
@slow_resource
def uninterrupted(shared_tmp: Path, dataset: Path, regression_dataset: Path):
    """The final state.pt of an uninterrupted run of `tests.helpers.train_args` from the pickle, per worker count
    (trained once per test session, on first use, whichever pytest worker needs it first): what the resume, fault,
    jobs and storage tests' interrupted Ray runs must end with, bit for bit. It is trained by the same loop without
    Ray, on as many gloo processes (`tests.distributed.train_all`): a Ray run, killed and resumed any way, must end
    exactly as the plain PyTorch loop does. A Parquet copy of the data is read in the same order, so its runs must
    end with the same bits too. Every checkpoint of the run is in the folder of the returned file's parent: the fork
    and the diverging fine-tune start from them. `regression=True`: the regression model on the rows
    (`tests.helpers.REGRESSION_MODEL`, `regression_dataset`)."""
    # Here, not at the top: this file makes the environment hermetic before torch (tests.helpers imports it) loads.
    from raytrain_app.main import prepare
    from tests.distributed import train_all
    from tests.helpers import LAST_STEP, PLUGIN_MODEL, REGRESSION_MODEL, ckpt, train_args

    def final_state(workers: int, regression: bool = False) -> Path:
        def train(folder: Path) -> dict[str, str]:
            # Both models' runs in the same gloo processes (starting them costs more than training): the configs
            # exactly as the driver makes them from the commands (data shapes, locations).
            runs = {name: {"config": prepare(train_args(data, folder / f"save-dir-{name}", workers,
                                                        model=model)).cfg.to_dict()}
                    for name, data, model in (("run", dataset, PLUGIN_MODEL),
                                              ("regression", regression_dataset, REGRESSION_MODEL))}
            train_all(folder, runs, world_size=workers)
            finals = {}
            for name in runs:
                run_dir = folder / name
                assert sorted(p.name for p in run_dir.glob("checkpoint_step=*"))[-1] == ckpt(run_dir, LAST_STEP).name
                finals[name] = str(ckpt(run_dir, LAST_STEP) / "state.pt")
            return finals

        return Path(computed_once(shared_tmp, f"uninterrupted-{workers}", train)["regression" if regression
                                                                                else "run"])

    return final_state


def main_command(*args: str, module: str = "raytrain_app.main") -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_main(args: list[str], ray_address: str | None = None, timeout: float = 300,
             cwd: Path | None = None, module: str = "raytrain_app.main",
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**base_env(), **(extra_env or {})}
    if ray_address:
        require_slow(f"runs python -m {module} on a Ray cluster")
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(main_command(*args, module=module), env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO_ROOT)


def run_api(call: str, ray_address: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, Any]:
    """A Python API call (`call`: an expression over `rt`, the package) in a script of its own on the cluster at
    `ray_address`, as a user's script or notebook runs it; (the process, what the call returned, as JSON)."""
    require_slow("runs the Python API on a Ray cluster")
    script = ("import dataclasses, json, raytrain_app as rt\n"
              f"result = {call}\n"
              "print('API-RESULT ' + json.dumps(dataclasses.asdict(result) if dataclasses.is_dataclass(result) "
              "else result))\n")
    env = {**base_env(), "RAY_ADDRESS": ray_address}
    process = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             timeout=timeout, cwd=REPO_ROOT)
    lines = [line for line in process.stdout.splitlines() if line.startswith("API-RESULT ")]
    return process, json.loads(lines[-1].removeprefix("API-RESULT ")) if lines else None


def run_tune(args: list[str], ray_address: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_main(args, ray_address, timeout=timeout, module="raytrain_app.tune")


def run_jobs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m raytrain_app.jobs ...` (the job API address is given with --address)."""
    return run_main(list(args), timeout=120, cwd=cwd, module="raytrain_app.jobs")


@pytest.fixture
@slow_resource
def benchmark() -> Any:
    """`run_benchmark`, for a test that runs a benchmark script (a process that trains or times for seconds)."""
    return run_benchmark


def run_benchmark(script: str, *args: str, ray_address: str | None = None, timeout: float = 600) -> dict:
    """`python benchmarks/<script> ...` (on the cluster at `ray_address` if given); the JSON object it prints."""
    require_slow(f"runs benchmarks/{script}")
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
                  extra_env: dict[str, str] | None = None, log_path: Path | None = None,
                  command: list[str] | None = None) -> tuple[subprocess.Popen, Any]:
    """Start a command as a real process in its own session (so the test can kill all of it); its output goes
    to the returned file: a temporary one, or `log_path` (which a test may read while the process runs).
    `command`: a whole command line as a user would paste it (one this tool printed), instead of `args`."""
    require_slow(f"starts python -m {module} on a Ray cluster")
    env = {**base_env(), "RAY_ADDRESS": ray_address, **(extra_env or {})}
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command or main_command(*args, module=module), env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
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


# Waits poll a real condition no faster than this: the processes waited for need the two cores more than the test.
POLL_S = 0.1


def output_so_far(log: Any) -> str:
    """What a process from `start_process` has written so far (its log file object or path), read without moving
    the offset the process writes at."""
    if log is None:
        return ""
    if isinstance(log, Path):
        return log.read_text(errors="replace") if log.exists() else ""
    return os.pread(log.fileno(), 1 << 24, 0).decode(errors="replace")


def wait_until(condition: Any, what: str, *, timeout: float = 120, proc: subprocess.Popen | None = None,
               log: Any = None, every: float = POLL_S) -> Any:
    """Poll `condition()` every `every` seconds until it returns something true, and return that. Fail, naming
    `what` and showing the output so far, if `proc` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}:\n{output_so_far(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{output_so_far(log)}")
        time.sleep(every)
    return value


def ray_train_processes(ray_address: str, *titles: str) -> list[int]:
    """Pids of the processes titled `titles` (by default Ray Train's controllers and workers and Tune's trial
    actors) running on the cluster at `ray_address` (its raylet's children; other clusters on this machine are
    left alone)."""
    import psutil

    titles = titles or ("ray::TrainController", "ray::RayTrainWorker", "ray::ImplicitFunc")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if not cmdline.startswith(titles):
            continue
        try:
            if f"--gcs-address={ray_address}" in " ".join(proc.parent().cmdline()):
                found.append(proc.pid)
        except (psutil.Error, AttributeError):  # gone meanwhile, or no parent any more
            continue
    return found


def wait_for_run_to_end(ray_address: str, timeout: float = 120) -> None:
    """Once a driver is killed, Ray ends its run: its controller and workers exit, and nothing more is registered
    in the run's record. Wait for that (a test reads or damages the record's latest checkpoint next)."""
    wait_until(lambda: not ray_train_processes(ray_address), "the killed run's Ray Train processes to exit",
               timeout=timeout)


def run_until_checkpoint(args: list[str], ray_address: str, run_dir: Path | str, kill_at_steps: set[int],
                         timeout: float = 240, extra_env: dict[str, str] | None = None) -> str:
    """Start training as a real process and SIGKILL it once the run's latest registered checkpoint is one of
    `kill_at_steps`. Returns its output."""
    proc, log = start_process(args, ray_address, extra_env=extra_env)
    try:
        wait_until(lambda: latest_checkpoint_step(run_dir) in kill_at_steps,
                   f"a registered checkpoint at {sorted(kill_at_steps)} in {run_dir}", timeout=timeout, proc=proc,
                   log=log)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: the way a lost node or OOM kill ends it
    finally:
        output = finish_process(proc, log, timeout=30)
    return output


# --- the suite's one interrupted run ----------------------------------------------------------------------------
# Each step of the interrupted run waits this long (the workers' fault-injection delay, ray_adapter/fault_injection):
# 48 steps become seconds, so every stop and kill lands where the test wants it without more data.
STEP_DELAY = {"RAYTRAIN_TEST_STEP_DELAY_S": "0.1"}


@pytest.fixture(scope="session")
def interrupted_run(shared_tmp: Path, dataset: Path, ray_address: str) -> dict:
    """The run of `tests.helpers.train_args` (2 workers, the pickle, wandb offline, progress lines every 0.5 s),
    interrupted both ways a run is, then finished (computed once per test session; the resume and observability
    tests read it):
      1. SIGTERM to the driver once a checkpoint is registered in epoch 1 (as a job system or `kill` stops it):
         it saves the step it is at and prints the command that continues;
      2. that printed command, run as printed, SIGKILLed with its whole session (a lost node, an OOM kill) once
         a checkpoint inside epoch 2 is registered and wandb has logged steps of epoch 2;
      3. the same command again, to the end.
    Returns each attempt's output and exit code, what was seen at each interruption, and the folders."""
    from tests.helpers import PROGRESS, ckpt, offline_runs, run_name_of, train_args

    def logged_steps(wandb_dir: Path) -> list[int]:
        try:
            return [s for run in offline_runs(wandb_dir) for s in run["steps"]]
        except Exception:  # noqa: BLE001 - wandb's file caught mid-write (any parse error): read it again
            return []

    def compute(folder: Path) -> dict:
        wandb_dir = folder / "wandb-files"
        wandb_dir.mkdir(parents=True)
        env = {**STEP_DELAY, "WANDB_DIR": str(wandb_dir)}  # the driver forwards WANDB_* to the workers
        args = train_args(dataset, folder / "runs", 2, "--use-wandb", "--wandb-mode", "offline",
                          "--progress-every", "0.5")
        out: dict[str, Any] = {"args": args, "wandb_dir": str(wandb_dir)}

        # 1. SIGTERM, to the driver alone, once Ray has registered a checkpoint and progress has been shown.
        log_path = folder / "1-stopped.log"
        proc, log = start_process(args, ray_address, extra_env=env, log_path=log_path)
        run_dir = None
        try:
            run_dir = folder / "runs" / run_name_of(wait_until(
                lambda: "Run: " in output_so_far(log) and output_so_far(log), "the run's name", proc=proc, log=log))
            wait_until(lambda: (latest_checkpoint_step(run_dir) or 0) >= 3 and PROGRESS.search(output_so_far(log)),
                       "a registered checkpoint and a progress line", proc=proc, log=log)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            out["stopped"] = finish_process(proc, log, timeout=30)
        out["stopped_rc"], out["run_dir"] = proc.returncode, str(run_dir)
        stop_step = latest_checkpoint_step(run_dir)
        out["latest_after_stop"] = stop_step
        out["stop_meta"] = json.loads((ckpt(run_dir, stop_step) / "meta.json").read_text())

        # 2. The command it printed, as printed; SIGKILLed in epoch 2 once wandb holds steps past a checkpoint.
        printed = [line.split("Continue (the same command): ", 1)[1] for line in out["stopped"].splitlines()
                   if "Continue (the same command): " in line]
        out["printed_continue"] = printed
        proc, log = start_process([], ray_address, extra_env=env, log_path=folder / "2-killed.log",
                                  command=shlex.split(printed[-1]) if printed else main_command(*args))

        def killable() -> int | None:
            latest = latest_checkpoint_step(run_dir) or 0
            ok = latest > 16 and latest % 16 and max(logged_steps(wandb_dir), default=0) > 16
            return latest if ok else None

        try:
            out["killed_at_least"] = wait_until(killable, "a checkpoint in epoch 2, and wandb steps of epoch 2",
                                                proc=proc, log=log)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            out["killed"] = finish_process(proc, log, timeout=30)
        wait_for_run_to_end(ray_address)  # its workers go on for a moment after the driver: until they are gone
        out["wandb_steps_at_kill"] = max(logged_steps(wandb_dir))

        # 3. The same command again, to the end.
        resumed = run_main(args, ray_address, extra_env=env)
        out.update(resumed=resumed.stdout, resumed_err=resumed.stderr, resumed_rc=resumed.returncode)
        return out

    return computed_once(shared_tmp, "interrupted-run", compute)


@pytest.fixture(scope="session")
def killed_fsdp_run(shared_tmp: Path, dataset: Path, ray_address: str, s3_endpoint: str) -> dict:
    """Everything on the S3 server: the session's dataset converted to Parquet there by the data command, a
    2-worker FSDP run reading it with --save-dir there, killed after a mid-epoch checkpoint; then one byte of
    worker 1's shard of the latest checkpoint is flipped on the server, and the same command is run again.
    (Computed once per test session: the storage tests read this run too.)"""

    from raytrain_app.cli.flags import parse_config
    from raytrain_app.data import main as data_main
    from raytrain_app.storage.location import parse_location
    from tests.helpers import flip_a_byte, run_in_process, train_args

    def compute(folder: Path) -> dict:
        bucket = make_bucket(s3_endpoint, "sharded")
        prefix = f"runs-{secrets.token_hex(3)}"
        data = s3_uri(bucket, f"{prefix}-data", s3_endpoint)
        converted = run_in_process(data_main, ["convert", str(dataset), data])
        assert converted.returncode == 0, converted.stdout + converted.stderr
        save_dir = parse_location(s3_uri(bucket, prefix, s3_endpoint))
        args = train_args(Path("/unused"), Path("/unused"), 2, "--strategy", "fsdp")
        args[args.index("--data") + 1] = data
        args[args.index("--save-dir") + 1] = save_dir.uri
        args[args.index("--keep-checkpoints") + 1] = "100"
        # Half as many checkpoints as the reference run (validation changes nothing that is trained): 6, 12, 16,
        # 18, 24, 30, 32, ...; killed at 24 or 30, so the one before the damaged one is inside epoch 2 too.
        args[args.index("--eval-every") + 1] = "6"
        run_dir = save_dir.join(parse_config(args)[0].default_run_name())
        killed = run_until_checkpoint(args, ray_address, run_dir.uri, {24, 30}, extra_env=STEP_DELAY)
        wait_for_run_to_end(ray_address)  # Ray registers no more checkpoints of the killed run after this
        latest = latest_checkpoint_step(run_dir.uri)
        record = json.loads(run_dir.join("checkpoint_manager_snapshot.json").read_bytes())
        recorded = [int(r["checkpoint_dir_name"].split("=")[1]) for r in record["checkpoint_results"]]
        shard = run_dir.join(f"checkpoint_step={latest:06d}", "shards", "__1_0.distcp")
        local = folder / "shard"
        folder.mkdir(parents=True, exist_ok=True)
        local.write_bytes(shard.read_bytes())
        flip_a_byte(local)
        shard.write_bytes(local.read_bytes())
        resumed = run_main(args, ray_address)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        return {"run_dir": run_dir.uri, "save_dir": save_dir.uri, "damaged": latest, "killed": killed,
                "fallback": max(step for step in recorded if step < latest), "output": resumed.stdout,
                "data": data, "run_name": run_dir.name, "endpoint": s3_endpoint}

    run = computed_once(shared_tmp, "killed-fsdp-run", compute)
    return {**run, "run_dir": parse_location(run["run_dir"]), "save_dir": parse_location(run["save_dir"])}
