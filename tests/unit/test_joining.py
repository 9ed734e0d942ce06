"""Which cluster a command joins (`ray_adapter.joining`), decided in seconds against real sockets: a port nothing
listens on, a listener that never answers (a hung head or dashboard), and a server that is not a Ray head. The
real heads, hung, crashed or guarded by a token, are in tests/integration/test_joining_e2e.py."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from raytrain_app.core.errors import UserError
from raytrain_app.ray_adapter.joining import (
    ClusterUnreachable,
    Join,
    auth_token,
    check_job_api,
    connect_timeout,
    plan_join,
)
from raytrain_app.ray_adapter.ray_compat import address_record

RAYTRAIN_TIMEOUT = "RAYTRAIN_CONNECT_TIMEOUT_S"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections the kernel accepts and nobody answers: what a hung head or dashboard looks like."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def record(tmp_path: Path, address: str) -> dict[str, str]:
    """An environment whose Ray temp folder holds a `ray start` record of `address`."""
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
    return {"RAY_TMPDIR": str(tmp_path), "HOME": str(tmp_path)}


def refused(environ: dict[str, str], timeout_s: float | None = None) -> str:
    """The one line plan_join refuses `environ` with. How long it took is not checked: which refusal it is says
    whether it waited for the deadline ("no answer within ...") or was decided by what answered."""
    with pytest.raises(ClusterUnreachable) as error:
        plan_join(environ, timeout_s)
    [line] = str(error.value).splitlines()
    return line


def test_no_address_and_no_record_starts_a_private_instance(tmp_path: Path) -> None:
    assert plan_join({"RAY_TMPDIR": str(tmp_path)}) == Join("local")
    assert plan_join({"RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": "local"}).starts_local


@pytest.mark.parametrize("environ", [{"RAY_TMPDIR": "/a", "TMPDIR": "/b"}, {"TMPDIR": "/b"}, {}, {"RAY_TMPDIR": ""}])
def test_the_record_is_where_ray_start_writes_it(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._common.utils import get_ray_address_file  # Ray's own rule, which ray_compat copies

    for name in ("RAY_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert address_record(environ) == Path(get_ray_address_file(None))


def test_the_probe_speaks_rays_own_protocol() -> None:
    """The RPC the probe calls and the way it carries the token are Ray 2.60's (ray_compat copies them)."""
    import inspect

    import ray.core.generated.gcs_service_pb2_grpc as gcs_grpc
    from ray._private.authentication import authentication_constants as auth

    from raytrain_app.ray_adapter import ray_compat

    assert f"'{ray_compat.GCS_PROBE_METHOD}'" in inspect.getsource(gcs_grpc)
    assert (ray_compat.AUTH_METADATA_KEY, ray_compat.AUTH_BEARER_PREFIX) == (
        auth.AUTHORIZATION_HEADER_NAME, auth.AUTHORIZATION_BEARER_PREFIX)


def test_a_dead_record_gives_a_private_instance_with_a_note(tmp_path: Path) -> None:
    port = free_port()
    join = plan_join(record(tmp_path, f"127.0.0.1:{port}"))
    assert join.starts_local
    assert join.note == (f"note: the Ray cluster recorded in {tmp_path}/ray/ray_current_cluster (127.0.0.1:{port}) "
                         "is gone: nothing answers there (connection refused). It ended without `ray stop`, which "
                         "would have removed the record; starting a private local Ray instance instead.")
    # Asked for explicitly (RAY_ADDRESS=auto), the same record is refused: the user wanted that cluster.
    line = refused({**record(tmp_path, f"127.0.0.1:{port}"), "RAY_ADDRESS": "auto"})
    assert "(connection refused)" in line and "`ray stop --force`" in line


def test_a_silent_record_or_address_is_refused_at_the_deadline(tmp_path: Path, silent_port: int) -> None:
    address = f"127.0.0.1:{silent_port}"
    line = refused(record(tmp_path, address), timeout_s=1)
    assert line == (f"the Ray cluster recorded in {tmp_path}/ray/ray_current_cluster ({address}): no answer within "
                    "1 s (the head is hung, overloaded or unreachable). If it is hung, `ray stop --force` stops it "
                    "and removes the record; RAY_ADDRESS=local runs on a private local instance beside it")
    line = refused({"RAY_ADDRESS": address, RAYTRAIN_TIMEOUT: "1"})
    assert line == (f"RAY_ADDRESS={address}: no answer within 1 s (the head is hung, overloaded or unreachable). "
                    "Start that cluster or correct the address, or unset RAY_ADDRESS to run on a private local "
                    "instance")



@pytest.mark.parametrize(("address", "problem"), [
    ("http://127.0.0.1:8265", "is a job API (dashboard) address: a command joins a cluster by its head's GCS "
                              "address, host:6379"),
    ("no such host:6379", "its host name does not resolve"),  # no host name has a space: refused unresolved
    ("auto", "RAY_ADDRESS=auto, but no Ray cluster was started on this machine"),
])
def test_an_address_that_cannot_be_a_cluster_is_one_line(tmp_path: Path, address: str, problem: str) -> None:
    assert problem in refused({"RAY_ADDRESS": address, "RAY_TMPDIR": str(tmp_path)})


def test_a_server_that_is_not_a_ray_head_is_named(http_port: int) -> None:
    line = refused({"RAY_ADDRESS": f"127.0.0.1:{http_port}"})
    assert "what answers there is not a Ray head's GCS (it does not speak gRPC)" in line


def test_the_job_api_check_never_waits_past_the_deadline(tmp_path: Path, silent_port: int, http_port: int) -> None:
    with pytest.raises(ClusterUnreachable, match=f"cannot reach the Ray job API at http://127.0.0.1:{silent_port}: "
                                                 "no answer within 1 s"):  # the deadline's refusal, no other
        check_job_api(f"http://127.0.0.1:{silent_port}", {}, 1)  # a dashboard that accepts and never replies
    check_job_api(f"http://127.0.0.1:{http_port}", {}, 1)  # any HTTP answer (here 501) is left to Ray's client
    with pytest.raises(ClusterUnreachable, match="no Ray job API to talk to: pass --address"):
        check_job_api(None, {"RAY_TMPDIR": str(tmp_path)}, 1)
    with pytest.raises(ClusterUnreachable, match=r"\(connection refused\); start the cluster"):
        check_job_api(f"127.0.0.1:{free_port()}", {}, 1)


def test_the_token_is_the_one_ray_would_send(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    token_mode = {"RAY_AUTH_MODE": "token", "HOME": str(home)}
    assert auth_token({**token_mode, "RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(token_file)},
                      explicit_address=True) == ("env", "RAY_AUTH_TOKEN")
    assert auth_token({**token_mode, "RAY_AUTH_TOKEN_PATH": str(token_file)}, explicit_address=True) == (
        "abc", str(token_file))
    assert auth_token(token_mode, explicit_address=True) == ("from-home", str(home / ".ray" / "auth_token"))
    # Without RAY_AUTH_MODE, Ray sends a token only to a local cluster it found by itself.
    assert auth_token({"HOME": str(home)}, explicit_address=True)[0] is None
    assert auth_token({"HOME": str(home)}, explicit_address=False)[0] == "from-home"
    assert auth_token({"HOME": str(home), "RAY_AUTH_MODE": "disabled"}, explicit_address=False)[0] is None
    # A token file Ray would read and cannot: named, as Ray would refuse it.
    with pytest.raises(ClusterUnreachable, match=f"RAY_AUTH_TOKEN_PATH={tmp_path}/missing: the file cannot be read"):
        auth_token({**token_mode, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, explicit_address=True)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_connect_timeout_is_refused(value: str) -> None:
    with pytest.raises(UserError, match=f"RAYTRAIN_CONNECT_TIMEOUT_S={value}: give the seconds"):
        connect_timeout({RAYTRAIN_TIMEOUT: value})
    assert connect_timeout({RAYTRAIN_TIMEOUT: "2.5"}) == 2.5 and connect_timeout({}) == 10.0

