"""Resolve a storage path or URI once to a pyarrow filesystem and a path on it.

Everything else takes ``(fs, path)``: the same code for a local folder and a gs:// bucket.
Nothing outside this module builds storage paths by string concatenation; use ``join``.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import pyarrow.fs as pafs

from storage import gcs

GCS_RETRY = timedelta(seconds=10)  # pyarrow retries GCS for 15 minutes by default: fail fast


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # a path on fs: "/abs/dir" locally, "bucket/prefix" on GCS
    uri: str  # what a user would type to reach the same place

    @property
    def is_gcs(self) -> bool:
        """On GCS: google-cloud-storage (storage/gcs.py) does what pyarrow cannot."""
        return self.fs.type_name == "gcs"

    @property
    def is_local(self) -> bool:
        """On this machine's disk: read in place, hard links, real directories."""
        return self.fs.type_name == "local"

    def child(self, *parts: str) -> Location:
        return Location(self.fs, join(self.path, *parts), join(self.uri, *parts))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *(p.strip("/") for p in parts)) if parts else base


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def gcs_filesystem(retry: timedelta = GCS_RETRY) -> pafs.GcsFileSystem:
    """A GcsFileSystem honouring STORAGE_EMULATOR_HOST, the standard emulator variable."""
    emulator = gcs.emulator_host()
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


def probe(loc: Location, timeout: float = 6.0, writable: bool = False) -> None:
    """Fail in seconds, not after minutes of retries, when loc cannot be reached (or, with
    writable, written).

    On GCS the bucket must exist and answer within timeout: a fresh filesystem with a short
    retry window, in a thread, so that a server that accepts and never answers cannot hang the
    caller; writable creates and deletes one uniquely named object under loc. Locally, writable
    asks the file system (a file in the way, read-only, no permission, full) without writing:
    a write would change the folder, and the run's lease (storage/lease.py) is the first real
    write, still before Ray starts. A missing local folder is made on first write.
    """
    if not loc.is_gcs:
        problem = local_write_problem(loc.path) if writable else None
        if problem is not None:
            raise StorageUnreachable(f"{loc.uri}: {problem}")
        return
    import threading

    bucket = loc.path.split("/", 1)[0]
    emulator = gcs.emulator_host()
    hint = (f"check {gcs.EMULATOR_HOST}" if emulator
            else "check the bucket name and the machine's credentials (gcloud auth "
                 "application-default login, or the node's service account)")

    def look() -> pafs.FileInfo:
        if not emulator:
            _require_credentials()  # before any request: no credentials must not cost a timeout
        fs = gcs_filesystem(retry=timedelta(seconds=max(1.0, timeout / 2)))
        info = fs.get_file_info(bucket)
        if writable and info.type != pafs.FileType.NotFound:
            import uuid

            probe_path = join(loc.path, f".write-probe-{uuid.uuid4().hex}")
            try:
                with fs.open_output_stream(probe_path) as out:
                    out.write(b"probe")
            except OSError as e:
                raise StorageUnreachable(f"cannot write to it ({str(e).splitlines()[0][:200]})") from None
            try:
                fs.delete_file(probe_path)
            except OSError:  # e.g. a retried delete that had landed (404): the write is what counts
                pass
        return info

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


MIN_FREE_BYTES = 16 << 20  # below this a checkpoint of even the test model cannot land


def local_write_problem(path: str, statvfs=os.statvfs, access=os.access) -> str | None:
    """Why a run could not write under the local folder path (None if it could).

    Looks at path or, when it does not exist yet, the nearest folder above it (where it would
    be made). statvfs and access are injectable for tests.
    """
    existing = path
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under a file ({existing})"
        return f"{where}, not a folder; give a folder for checkpoints"
    st = statvfs(existing)
    if st.f_flag & os.ST_RDONLY:
        return f"is on a read-only file system ({existing}); give a writable folder for checkpoints"
    if not access(existing, os.W_OK | os.X_OK):
        return f"is not writable by this user ({existing}); give a writable folder for checkpoints"
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        return (f"is on a full file system ({free >> 20} MiB free at {existing}); free some space "
                "or give another folder for checkpoints")
    return None


def _require_credentials() -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise StorageUnreachable("no Google Cloud credentials found") from None
