"""Resolve a storage path or URI once to a pyarrow filesystem and a path on it.

Everything else takes ``(fs, path)``: the same code for a local folder and a gs:// bucket.
Nothing outside this module builds storage paths by string concatenation; use ``join``.
"""

from __future__ import annotations

import os
import posixpath
from datetime import timedelta
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

GCS_RETRY = timedelta(seconds=10)  # pyarrow retries GCS for 15 minutes by default: fail fast


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # a path on fs: "/abs/dir" locally, "bucket/prefix" on GCS
    uri: str  # what a user would type to reach the same place

    @property
    def is_remote(self) -> bool:
        return self.uri.startswith("gs://")

    def child(self, *parts: str) -> "Location":
        return Location(self.fs, join(self.path, *parts), join(self.uri, *parts))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *(p.strip("/") for p in parts)) if parts else base


def gcs_filesystem(retry: timedelta = GCS_RETRY) -> pafs.GcsFileSystem:
    """A GcsFileSystem honouring STORAGE_EMULATOR_HOST, the standard emulator variable."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(
            anonymous=True,
            endpoint_override=parsed.netloc,
            scheme=parsed.scheme or "http",
            retry_time_limit=retry,
        )
    return pafs.GcsFileSystem(retry_time_limit=retry)


def resolve(uri_or_path: str) -> Location:
    """``gs://bucket/prefix`` or a local path (relative paths become absolute)."""
    if uri_or_path.startswith("gs://"):
        bucket_and_prefix = uri_or_path[len("gs://"):].strip("/")
        if not bucket_and_prefix:
            raise ValueError(f"'{uri_or_path}' names no bucket: expected gs://BUCKET/PREFIX")
        return Location(gcs_filesystem(), bucket_and_prefix, f"gs://{bucket_and_prefix}")
    if "://" in uri_or_path:
        raise ValueError(
            f"'{uri_or_path}' has an unsupported scheme: use a local path or gs://BUCKET/PREFIX"
        )
    path = os.path.abspath(os.path.expanduser(uri_or_path))
    return Location(pafs.LocalFileSystem(), path, path)


class StorageUnreachable(Exception):
    """The storage cannot be used: no bucket, no credentials, no answer. Message is for people."""


def probe(loc: Location, timeout: float = 6.0) -> None:
    """Fail in seconds, not after minutes of retries, when loc cannot be reached.

    Locally nothing is checked (a missing folder is created on first write). On GCS the bucket
    must exist and answer within timeout: a fresh filesystem with a short retry window, in a
    thread, so that a server that accepts and never answers cannot hang the caller.
    """
    if not loc.is_remote:
        return
    import threading

    bucket = loc.path.split("/", 1)[0]
    hint = ("check STORAGE_EMULATOR_HOST" if os.environ.get("STORAGE_EMULATOR_HOST")
            else "check the bucket name and the machine's credentials (gcloud auth "
                 "application-default login, or the node's service account)")

    def look() -> pafs.FileInfo:
        if not os.environ.get("STORAGE_EMULATOR_HOST"):
            _require_credentials()  # before any request: no credentials must not cost a timeout
        fs = gcs_filesystem(retry=timedelta(seconds=max(1.0, timeout / 2)))
        return fs.get_file_info(bucket)

    # A daemon thread, not an executor: a request stuck in a silent socket must not keep the
    # process alive at exit (executor threads are joined then).
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["info"] = look()
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise StorageUnreachable(f"{loc.uri}: GCS did not answer within {timeout:.0f}s; {hint}")
    error = outcome.get("error")
    if isinstance(error, StorageUnreachable):
        raise StorageUnreachable(f"{loc.uri}: {error}; {hint}")
    if error is not None:  # pyarrow raises OSError with the HTTP status inside
        first = str(error).splitlines()[0][:200]
        raise StorageUnreachable(f"{loc.uri}: cannot reach bucket '{bucket}' ({first}); {hint}")
    info = outcome["info"]
    if info.type == pafs.FileType.NotFound:
        raise StorageUnreachable(f"{loc.uri}: bucket '{bucket}' does not exist; {hint}")


def _require_credentials() -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise StorageUnreachable("no Google Cloud credentials found") from None
