"""Resolve a storage path or URI once to a pyarrow filesystem and a path on it.

Everything else takes ``(fs, path)``: the same code for a local folder and a gs:// bucket.
Nothing outside this module builds storage paths by string concatenation; use ``join``.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

GCS_RETRY_SECONDS = 10.0  # pyarrow retries GCS for 15 minutes by default: fail fast instead


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


def gcs_filesystem() -> pafs.GcsFileSystem:
    """A GcsFileSystem honouring STORAGE_EMULATOR_HOST, the standard emulator variable."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(
            anonymous=True,
            endpoint_override=parsed.netloc,
            scheme=parsed.scheme or "http",
            retry_time_limit=GCS_RETRY_SECONDS,
        )
    return pafs.GcsFileSystem(retry_time_limit=GCS_RETRY_SECONDS)


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
