"""A checkpoint's commit marker, metadata.json, and the claim that goes before it when two
writers meet in one folder.

metadata.json is created once, create-only (a hard link on local disk, ``if_generation_match=0``
on GCS, where a rename is not atomic): its existence makes the checkpoint count
(storage/manifest.py), and a checkpoint is never overwritten.

Two launches can write the same checkpoint name before either commits (a killed or taken-over
launch and its successor). A writer that finds another's file removes it only after it has
*claimed* the folder: metadata.json created (create-only, like a commit) holding just
``{"claimed_by": launch}``, which manifest.check reads as incomplete. From then on the other
writer cannot commit: its create-only commit finds something there, and a claim of its own was
replaced generation-matched, so its commit (a replace matched against its claim's version)
fails. A writer takes over another launch's claim only under the run's lease (the fence,
storage/lease.py): a killed launch's claim never blocks its successor, and a launch that lost
the lease takes none. Deletes of another's file are matched against the version seen (GCS
generation; locally inode and mtime, under the run's ``.commit.lock``), and the commit checks
that every listed file in storage is the very object its rank wrote (GCS generation and MD5
from one listing, no download; locally inode and mtime; elsewhere sha256), so of two racing
writers the loser never leaves a complete checkpoint that fails its hashes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from contextlib import contextmanager

from storage import gcs
from storage.location import Location, exists, join
from storage.manifest import METADATA, CheckpointError

Fence = Callable[[], object]  # a context manager: entered, the run's lease is this launch's


class Marker:
    """What a checkpoint's metadata.json is now: kind "absent", "claim" (by launch) or "commit";
    version: what a compare-and-swap matches (GCS generation; locally the bytes)."""

    def __init__(self, kind: str, launch: str | None = None, version: object = None):
        self.kind, self.launch, self.version = kind, launch, version


def lock_path(dest: Location) -> str:
    return os.path.join(posixpath.dirname(dest.path.rstrip("/")), ".commit.lock")


@contextmanager
def locked(path: str):
    """An exclusive flock on path (created if need be); the kernel drops it if the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # per open file: threads of one process exclude too
        yield
    finally:
        os.close(fd)


def read_marker(dest: Location) -> Marker:
    final = join(dest.path, METADATA)
    if dest.is_gcs:
        got = gcs.read(final)
        if got is None:
            return Marker("absent")
        raw, version = got
    else:
        try:
            with dest.fs.open_input_stream(final) as f:
                raw = f.read()
        except (FileNotFoundError, OSError):
            if exists(dest.fs, final):
                raise
            return Marker("absent")
        version = raw
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "claimed_by" in parsed and "files" not in parsed:
        return Marker("claim", str(parsed["claimed_by"]), version)
    return Marker("commit", None, version)


def _create_marker(dest: Location, data: bytes) -> None:
    """metadata.json = data, only where nothing is: FileExistsError otherwise."""
    final = join(dest.path, METADATA)
    if dest.is_gcs:
        gcs.write_create_only(final, data)
        return
    # Never a fixed temp name: two writers of one checkpoint must not share (or move) it.
    tmp = join(dest.path, f"{METADATA}.{uuid.uuid4().hex}.tmp")
    with dest.fs.open_output_stream(tmp) as out:
        out.write(data)
    try:
        if dest.is_local:
            link_create_only(tmp, final)
        else:  # no create-only primitive in pyarrow's generic API: check, then rename
            if exists(dest.fs, final):
                raise FileExistsError(final)
            dest.fs.move(tmp, final)
    finally:
        if exists(dest.fs, tmp):
            dest.fs.delete_file(tmp)


def _replace_marker(dest: Location, data: bytes, version: object) -> None:
    """metadata.json = data, only if it is still the version seen: FileExistsError otherwise."""
    final = join(dest.path, METADATA)
    if dest.is_gcs:
        gcs.replace_generation(final, data, int(version))
        return
    if not dest.is_local:  # no compare-and-swap in pyarrow's generic API: look, then write
        if read_marker(dest).version != version:
            raise FileExistsError(final)
        with dest.fs.open_output_stream(final) as out:
            out.write(data)
        return
    tmp = f"{final}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as out:
        out.write(data)
    try:
        with locked(lock_path(dest)):
            if read_marker(dest).version != version:
                raise FileExistsError(final)
            os.replace(tmp, final)  # atomic; never absent in between, so no create slips in
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def claim(dest: Location, writer: str, fence: Fence | None = None) -> None:
    """Make dest's metadata.json this writer's claim, or raise CheckpointError: it is committed,
    or claimed by another launch and this writer holds no fence (the run's lease) to take the
    claim over with. A takeover is matched against the version seen."""
    for _ in range(5):
        marker = read_marker(dest)
        if marker.kind == "commit":
            raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri} "
                                  "(another writer committed it while this one uploaded)")
        if marker.kind == "claim" and marker.launch == writer:
            return
        data = json.dumps({"claimed_by": writer, "claim_id": uuid.uuid4().hex}).encode()
        try:
            if marker.kind == "absent":
                _create_marker(dest, data)
                return
            if fence is None:
                raise CheckpointError(f"{dest.uri} is being written by launch {marker.launch[:12]}, which "
                                      "may still commit it; this writer writes nothing over it")
            with fence():
                _replace_marker(dest, data, marker.version)
            return
        except FileExistsError:
            continue  # another writer moved first: look again
    raise CheckpointError(f"{dest.uri}: its metadata.json kept changing while being claimed")


def commit(dest: Location, metadata_json: bytes, writer: str | None = None,
           take_over: bool = False) -> None:
    """Write dest's metadata.json, the commit marker: create-only, or in place of this writer's
    own claim (matched against its version), or of another launch's claim if take_over (the
    caller holds the run's lease, so that launch lost it). CheckpointError if it is committed
    already (a checkpoint is never overwritten) or another launch claimed it since (its writer
    may be removing this one's files)."""
    marker = read_marker(dest)
    try:
        if marker.kind == "absent":
            _create_marker(dest, metadata_json)
            return
        if marker.kind == "claim" and (marker.launch == writer or take_over):
            _replace_marker(dest, metadata_json, marker.version)
            return
    except FileExistsError:
        marker = read_marker(dest)
    if marker.kind == "claim":
        raise CheckpointError(f"refusing to commit {dest.uri}: launch {marker.launch[:12]} claimed it "
                              "(a writer of the same name that found this one's files)")
    raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri}")


def link_create_only(tmp: str, final: str) -> None:
    """Make the whole file tmp appear at final, only if nothing is there (FileExistsError).

    A hard link is atomic and never replaces (a rename would): of two writers, one loses loudly
    and the winner's metadata.json stays. Where links are not supported, an O_EXCL create.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        with open(tmp, "rb") as f:
            data = f.read()
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
