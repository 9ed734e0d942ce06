"""Which Ray cluster a command joins, decided in seconds, before `ray.init` is called.

`ray.init` waits as long as one lets it for a cluster that does not answer: a dead `RAY_ADDRESS`, a head that
hangs, a token it lacks, or the record `ray start` leaves in Ray's temp folder after that cluster died without
`ray stop` (a crash, an OOM kill, a lost container). So every command that connects first asks the head's GCS
one question (its cluster id, over gRPC with a deadline, with the token Ray would send) and decides:

- `RAY_ADDRESS` names a cluster that answers: join it; one that does not: one line naming the address and what
  to do, exit code 2.
- No `RAY_ADDRESS`, and a record of a local cluster that answers: join it (as `ray.init()` would).
- A record whose cluster is gone (nothing listens at its address any more): a note, and a private local instance,
  as on a machine where no cluster was ever started. A recorded cluster that is still there but does not answer
  (hung) is refused with the `ray stop --force` advice: a second instance beside it would only compete for the
  machine.
- Neither: a private local instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from raytrain_app.core.errors import UserError
from raytrain_app.ray_adapter.ray_compat import (
    AUTH_BEARER_PREFIX,
    AUTH_METADATA_KEY,
    GCS_PROBE_METHOD,
    address_record,
    client_auth_token,
)

# How long the head's GCS has to answer. A healthy one answers in milliseconds, even on a busy machine; a head
# far away over a slow link may need more: RAYTRAIN_CONNECT_TIMEOUT_S.
CONNECT_TIMEOUT_S = 10.0
TIMEOUT_ENV_VAR = "RAYTRAIN_CONNECT_TIMEOUT_S"


class ClusterUnreachable(UserError):
    """The cluster a command was told to join does not answer, or refuses it."""


@dataclass(frozen=True)
class Join:
    """What to pass to `ray.init(address=...)`: "local" starts a private instance, "auto" joins the recorded
    local cluster, anything else is the address to join. `note` is printed before joining."""

    address: str
    note: str | None = None

    @property
    def starts_local(self) -> bool:
        return self.address == "local"


@dataclass(frozen=True)
class Answer:
    """How a head answered the probe: `ok`, or `problem` (what went wrong, for the user) with `gone` when nothing
    listens at the address at all."""

    ok: bool
    problem: str = ""
    gone: bool = False
    auth: bool = False  # the problem is the token, and its text says what to do


def connect_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """The probe's deadline in seconds: RAYTRAIN_CONNECT_TIMEOUT_S, else CONNECT_TIMEOUT_S."""
    text = environ.get(TIMEOUT_ENV_VAR)
    if not text:
        return CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise UserError(f"{TIMEOUT_ENV_VAR}={text}: give the seconds a Ray head has to answer, a number above 0")
    return value


def auth_token(environ: Mapping[str, str], *, explicit_address: bool) -> tuple[str | None, str]:
    """The token Ray's client would send (`ray_compat.client_auth_token`); a RAY_AUTH_TOKEN_PATH that Ray would
    read and cannot is refused here, as Ray would refuse it."""
    token, source = client_auth_token(environ, explicit_address=explicit_address)
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if token is None and path and source == path:
        raise ClusterUnreachable(f"RAY_AUTH_TOKEN_PATH={path}: the file cannot be read or is empty; put the "
                                 "cluster's token in it")
    return token, source


def _no_answer(timeout_s: float) -> str:
    return f"no answer within {timeout_s:g} s (the head is hung, overloaded or unreachable)"


def _recorded_address(environ: Mapping[str, str]) -> tuple[Path, str]:
    """The `ray start` record and the address in it ("" when there is none)."""
    record = address_record(environ)
    try:
        return record, record.read_text().strip()
    except OSError:
        return record, ""


def uses_tls(environ: Mapping[str, str]) -> bool:
    """RAY_USE_TLS: the cluster's gRPC is TLS, which the probe does not speak; such a cluster is joined unprobed."""
    return environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true", "yes")


def probe(address: str, token: str | None, token_source: str = "",
          timeout_s: float = CONNECT_TIMEOUT_S, ray_client: bool = False) -> Answer:
    """Ask the Ray head at host:port for its cluster id. For a Ray Client address (`ray://`), any gRPC answer
    counts: its server is not a GCS."""
    import grpc

    channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
    try:
        ask = channel.unary_unary(GCS_PROBE_METHOD)  # no serializers: bytes in, bytes out
        metadata = [(AUTH_METADATA_KEY, AUTH_BEARER_PREFIX + token)] if token else None
        ask(b"", timeout=timeout_s, metadata=metadata)
        return Answer(ok=True)
    except grpc.RpcError as e:
        code, details = e.code(), (e.details() or "").strip().splitlines()[:1]
        detail = details[0][:160] if details else code.name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Answer(False, _no_answer(timeout_s))
        if code == grpc.StatusCode.UNAVAILABLE:
            if "connection refused" in detail.lower():  # nothing listens: the cluster is gone
                return Answer(False, "nothing answers there (connection refused)", gone=True)
            if "http/2" in detail.lower():
                return Answer(False, "what answers there is not a Ray head's GCS (it does not speak gRPC); "
                                     "RAY_ADDRESS takes the head's GCS address, host:6379")
            if "lookup" in detail.lower() or "resolv" in detail.lower():
                return Answer(False, "its host name does not resolve")
            return Answer(False, f"nothing answers there ({detail})")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if token is None:
                return Answer(False, "the cluster requires a token and this process sends none: set "
                                     "RAY_AUTH_MODE=token and give the cluster's token in ~/.ray/auth_token, "
                                     "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN", auth=True)
            return Answer(False, f"the cluster refused this process's token (from {token_source}): use the "
                                 "cluster's own token", auth=True)
        if ray_client:
            return Answer(ok=True)
        return Answer(False, f"what answers there is not a Ray head's GCS ({code.name}: {detail}); RAY_ADDRESS "
                             "takes the head's GCS address, host:6379")
    finally:
        channel.close()


def plan_join(environ: Mapping[str, str] = os.environ, timeout_s: float | None = None) -> Join:
    """Decide, within `timeout_s` (default: `connect_timeout()`), which cluster to join (module docstring); raise
    ClusterUnreachable if the one named cannot be joined."""
    timeout_s = connect_timeout(environ) if timeout_s is None else timeout_s
    address = (environ.get("RAY_ADDRESS") or "").strip()
    if address == "local":
        return Join("local")
    if uses_tls(environ):
        return Join(address or "auto") if address or address_record(environ).exists() else Join("local")
    if address and address != "auto":
        if address.startswith(("http://", "https://")):
            raise ClusterUnreachable(
                f"RAY_ADDRESS={address} is a job API (dashboard) address: a command joins a cluster by its head's "
                "GCS address, host:6379; or submit it as a job (python -m raytrain_app.jobs submit)")
        ray_client = address.startswith("ray://")
        token, source = auth_token(environ, explicit_address=True)
        answer = probe(address.removeprefix("ray://"), token, source, timeout_s, ray_client=ray_client)
        if not answer.ok:
            fix = "" if answer.auth else (". Start that cluster or correct the address, or unset RAY_ADDRESS to run "
                                          "on a private local instance")
            raise ClusterUnreachable(f"RAY_ADDRESS={address}: {answer.problem}{fix}")
        return Join(address)

    record, recorded = _recorded_address(environ)
    if not recorded:
        if address == "auto":
            raise ClusterUnreachable(f"RAY_ADDRESS=auto, but no Ray cluster was started on this machine ({record} "
                                     "does not exist): start one with `ray start --head`, or unset RAY_ADDRESS to "
                                     "run on a private local instance")
        return Join("local")
    token, source = auth_token(environ, explicit_address=False)
    answer = probe(recorded, token, source, timeout_s)
    if answer.ok:
        return Join("auto")
    where = f"the Ray cluster recorded in {record} ({recorded})"
    if answer.gone and address != "auto":
        return Join("local", note=f"note: {where} is gone: {answer.problem}. It ended without `ray stop`, which "
                                  "would have removed the record; starting a private local Ray instance instead.")
    if answer.auth:
        raise ClusterUnreachable(f"{where}: {answer.problem}")
    raise ClusterUnreachable(f"{where}: {answer.problem}. If it is hung, `ray stop --force` stops it and removes "
                             "the record; RAY_ADDRESS=local runs on a private local instance beside it")


def check_job_api(address: str | None, environ: Mapping[str, str] = os.environ,
                  timeout_s: float | None = None) -> None:
    """Raise ClusterUnreachable within `timeout_s` unless the job API a `JobSubmissionClient(address)` would use
    answers: Ray's client waits 40 s on a GCS address that does not answer, and forever on a dashboard that
    accepts the connection but never replies (its HTTP requests have no timeout)."""
    timeout_s = connect_timeout(environ) if timeout_s is None else timeout_s
    given = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or "auto"
    fix = "start the cluster, open its tunnel with `ray dashboard cluster.yaml`, or pass --address"
    if given.startswith(("http://", "https://")):
        problem = _http_problem(given.rstrip("/") + "/api/version", timeout_s)
        if problem:
            raise ClusterUnreachable(f"cannot reach the Ray job API at {given}: {problem}; {fix}")
        return
    # A GCS address (or the recorded local cluster): Ray's client asks that head where its job API is.
    if uses_tls(environ):
        return
    if given == "auto":
        record, target = _recorded_address(environ)
        if not target:
            raise ClusterUnreachable("no Ray job API to talk to: pass --address (http://127.0.0.1:8265 through "
                                     "the tunnel `ray dashboard cluster.yaml` opens) or set RAY_API_SERVER_ADDRESS")
        where = f"the Ray cluster recorded in {record} ({target})"
    else:
        target, where = given.removeprefix("ray://"), f"the Ray cluster at {given}"
    # The job client sends a token only with RAY_AUTH_MODE=token, however it found the cluster.
    token, source = auth_token(environ, explicit_address=True)
    answer = probe(target, token, source, timeout_s, ray_client=given.startswith("ray://"))
    if not answer.ok:
        raise ClusterUnreachable(f"cannot reach the Ray job API of {where}: {answer.problem}"
                                 + ("" if answer.auth else f"; {fix}"))


def _http_problem(url: str, timeout_s: float) -> str | None:
    """None when something answers HTTP at `url` (an error status such as 401 is an answer: Ray's client then
    says what is wrong), else what happened."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except OSError as e:  # URLError, TimeoutError and connection errors are all OSErrors
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        return _no_answer(timeout_s) if isinstance(reason, TimeoutError) else f"nothing answers there ({reason})"
