"""Where things live: local paths, file://, s3:// and gs:// locations, all read and written through pyarrow.fs.

An S3-compatible endpoint (MinIO, Ceph, R2, a test server) comes from `?endpoint_override=http://host:port` in
the URI, or from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. `Location.uri` is the canonical form with the endpoint
written into it, so a location passed to Ray workers means the same bucket there as on the driver.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

SCHEMES = ("file", "s3", "gs", "gcs")


# Credentials and endpoints the driver forwards to every Ray worker (see ray_adapter.driver.connect_ray).
FORWARDED_ENV_VARS = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
)


# A wrong endpoint must fail in seconds, not after pyarrow's default minutes of retries.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 20.0


class StorageError(ValueError):
    """A location that cannot be used; the message names it and the cause."""


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # the filesystem's own path: "/abs/dir" locally, "bucket/prefix" on object stores
    uri: str  # what to show users and pass to workers; parse_location(uri) gives this location back

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        if self.is_local:
            return Location(self.fs, path, path)
        base, _, query = self.uri.partition("?")
        return Location(self.fs, path, posixpath.join(base, *parts) + (f"?{query}" if query else ""))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def info(self) -> pafs.FileInfo:
        return _guarded(lambda: self.fs.get_file_info(self.path), self.uri)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def list(self) -> list[pafs.FileInfo]:
        """Entries directly inside this directory, sorted by name."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(_guarded(lambda: self.fs.get_file_info(selector), self.uri), key=lambda i: i.path)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        return _guarded(read, self.uri)

    def write_bytes(self, data: bytes) -> None:
        def write() -> None:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        _guarded(write, self.uri)

    def remove(self) -> None:
        """Delete this file if it exists."""
        if self.is_file():
            _guarded(lambda: self.fs.delete_file(self.path), self.uri)

    def chunks(self, size: int = 8 << 20) -> Iterator[bytes]:
        """The file's bytes, streamed in pieces of `size`."""
        with self.fs.open_input_stream(self.path) as f:
            while chunk := f.read(size):
                yield chunk

    def sha256(self) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            for chunk in self.chunks():
                h.update(chunk)
            return h.hexdigest()
        return _guarded(digest, self.uri)

    @contextmanager
    def local_copy(self) -> Iterator[str]:
        """A local path to this file: the file itself, or a temporary download of it."""
        if self.is_local:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="raytrain-dl-") as tmp:
            local = os.path.join(tmp, self.name)
            _guarded(lambda: pafs.copy_files(self.path, local, source_filesystem=self.fs,
                                             destination_filesystem=pafs.LocalFileSystem()), self.uri)
            yield local

    def __str__(self) -> str:
        return self.uri


def is_uri(location: str) -> bool:
    return "://" in location


def parse_location(location: str, *, flag: str = "location") -> Location:
    """A local path or URI as a Location. Raises StorageError for schemes we cannot serve."""
    if not is_uri(location):
        path = os.path.abspath(os.path.expanduser(location))
        return Location(pafs.LocalFileSystem(), path, path)
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{flag} {location}: unknown URI scheme '{scheme}://'; use a local path, file://, "
                           "s3:// or gs://")
    if scheme == "file":
        return parse_location(parts.path, flag=flag)
    bucket, key = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise StorageError(f"{flag} {location}: the URI names no bucket ({scheme}://BUCKET/PREFIX)")
    path = f"{bucket}/{key}" if key else bucket
    options = dict(parse_qsl(parts.query))
    if scheme == "s3":
        fs, options = _s3_filesystem(options, location, flag)
    else:
        fs = _guarded(lambda: pafs.GcsFileSystem(**_gcs_options(options)), location)
    query = f"?{urlencode(options, safe=':/')}" if options else ""
    return Location(fs, path, f"{scheme}://{path}{query}")


def _s3_filesystem(options: dict[str, str], location: str, flag: str) -> tuple[pafs.S3FileSystem, dict[str, str]]:
    known = {"endpoint_override", "scheme", "region"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StorageError(f"{flag} {location}: unsupported URI option(s) {', '.join(unknown)} "
                           f"(supported: {', '.join(sorted(known))})")
    options = dict(options)
    endpoint = options.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    if endpoint:
        if "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
            options.setdefault("scheme", scheme)
        options["endpoint_override"] = endpoint.rstrip("/")
        # Compatible servers have no region lookup; without one pyarrow asks AWS over the network.
        options.setdefault("region", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                           or "us-east-1")
    fs = pafs.S3FileSystem(
        endpoint_override=options.get("endpoint_override"), scheme=options.get("scheme"),
        region=options.get("region"), connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )
    return fs, options


def _gcs_options(options: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    if "endpoint_override" in options:
        out["endpoint_override"] = options["endpoint_override"]
    if "scheme" in options:
        out["scheme"] = options["scheme"]
    return out


def _guarded(action, uri: str):  # turns pyarrow errors into one line
    try:
        return action()
    except (FileNotFoundError, StorageError):
        raise
    except OSError as e:
        raise StorageError(f"{uri}: {_cause(e)}") from None


def _cause(error: OSError) -> str:
    text = " ".join(str(error).split())
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "no such bucket" in lowered:
        return "the bucket does not exist"
    denied = ("access_denied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", "403")
    if any(word in lowered for word in denied):
        return f"access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) ({text[:160]})"
    if "curl" in lowered or "connect" in lowered or "timeout" in lowered or "timed out" in lowered:
        return f"the storage endpoint cannot be reached ({text[:160]})"
    return text[:240]


def check_bucket(location: Location) -> None:
    """Fail fast, naming the location, when the bucket is missing, unreachable or forbidden."""
    if location.is_local:
        return
    bucket = location.path.split("/", 1)[0]
    info = _guarded(lambda: location.fs.get_file_info(bucket), location.uri)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location.uri}: the bucket '{bucket}' does not exist")

