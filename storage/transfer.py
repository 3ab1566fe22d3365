"""Moving checkpoints: upload (metadata.json last, create-only), fetch (verified), delete.

Atomicity is the commit marker: a checkpoint counts once its metadata.json exists
(storage/manifest.py), so an upload writes every data file first and metadata.json last,
and a delete removes metadata.json first. A crash at any point leaves a folder that reads as
incomplete, never one that passes for whole. metadata.json is created only where none is (a
hard link on local disk, ``if_generation_match=0`` on GCS, where a rename is not atomic), so a
checkpoint is never overwritten, not even by a second writer racing the first.

Two launches can write the same checkpoint name before either commits (a killed or taken-over
launch and its successor): see storage/marker.py for the claim that makes the loser unable to
commit, and ``not_written_by`` for the commit's check that every listed file in storage is the
very object its rank wrote (GCS generation and MD5 from one listing, no download; locally inode
and mtime; elsewhere sha256).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import nullcontext

import pyarrow.fs as pafs

from storage import gcs
from storage.location import Location, exists, join
from storage.manifest import CHUNK, METADATA, CheckpointError, check, rel_name_problem, sha256_file
from storage.marker import Fence, claim, commit, link_create_only, lock_path, locked, read_marker


def upload(local_dir: str, dest: Location) -> None:
    """Copy a finished local checkpoint to dest: every data file first, metadata.json last.

    Refuses to replace a checkpoint that already has a metadata.json: a checkpoint is never
    overwritten. metadata.json is created only where none is (a hard link on local disk,
    ``if_generation_match=0`` on GCS), so of two writers that both got past the first look,
    the second fails loudly at its commit instead of replacing the first's.
    """
    writer = uuid.uuid4().hex
    stored = upload_files(local_dir, dest, writer)
    with open(os.path.join(local_dir, METADATA), "rb") as f:
        metadata = f.read()
    files = json.loads(metadata)["files"]
    changed = not_written_by(dest, files, stored)
    if changed:
        raise CheckpointError(f"{dest.uri}/{changed[0]} is not the file this writer uploaded")
    commit(dest, metadata, writer)


def _fenced(fence: Fence | None):
    return fence() if fence is not None else nullcontext()


def upload_files(local_dir: str, dest: Location, writer: str | None = None,
                 fence: Fence | None = None) -> dict[str, dict | None]:
    """Copy every file of local_dir but metadata.json into dest (one rank's part of a checkpoint;
    the commit comes after every rank's). Refused where dest is already committed, and no file
    is ever written over another's (_put_create_only). writer: this launch's id (its claims);
    fence: checked before anything is written (a launch that lost the run's lease writes
    nothing) and held for every removal of another writer's file.

    Returns {rel: identity} of the objects now holding this writer's bytes, which the commit
    checks (not_written_by)."""
    writer = writer or uuid.uuid4().hex
    with _fenced(fence):
        if read_marker(dest).kind == "commit":
            raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri}")
    dest.fs.create_dir(dest.path, recursive=True)
    rels = []
    for root, _, names in os.walk(local_dir):
        for name in names:
            rels.append(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"))
    stored = {}
    for rel in sorted(r for r in rels if r != METADATA):
        if "/" in rel:
            dest.fs.create_dir(join(dest.path, rel.rsplit("/", 1)[0]), recursive=True)
        stored[rel] = _put_create_only(os.path.join(local_dir, rel), dest, rel, writer, fence)
    return stored


def _put_create_only(source: str, dest: Location, rel: str, writer: str,
                     fence: Fence | None) -> dict | None:
    """source's bytes at dest/rel, never replacing a file of a committed checkpoint; the
    identity of the object that holds them.

    Created only where nothing is, or the same bytes are (this writer's retry). A different
    file was left by another writer of this name (a killed or taken-over launch): this writer
    claims the folder (claim: refused if it is committed, or claimed by a launch that may still
    commit), removes that file, the version seen only, and creates its own once more; losing
    again means a writer is still at work there, and this one stops (CheckpointError).
    """
    target = join(dest.path, rel)
    for attempt in range(2):
        try:
            return _create(source, dest, target)
        except FileExistsError:
            if attempt == 1:
                raise CheckpointError(f"{dest.uri}/{rel} is being written by another writer of this "
                                      "checkpoint; this one writes nothing over it") from None
            claim(dest, writer, fence)
            seen = _identity(dest, target)
            if seen is not None:
                with _fenced(fence):
                    _delete_seen(dest, target, seen)
    raise AssertionError("unreachable")


def _create(source: str, dest: Location, target: str) -> dict | None:
    if dest.is_gcs:
        return gcs.upload_create_only(target, source)
    if dest.is_local:
        return _copy_create_only(source, target)
    if exists(dest.fs, target):  # no create-only primitive in pyarrow's generic API: look, then copy
        raise FileExistsError(target)
    pafs.copy_files(source, target, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.fs, chunk_size=CHUNK)
    return None


def _local_identity(st: os.stat_result) -> dict:
    return {"inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _identity(dest: Location, path: str) -> dict | None:
    """The identity of the object at path now (None: nothing there, or no identity here)."""
    if dest.is_gcs:
        return gcs.stat(path)
    if dest.is_local:
        try:
            return _local_identity(os.stat(path))
        except FileNotFoundError:
            return None
    return {} if exists(dest.fs, path) else None


def _delete_seen(dest: Location, path: str, seen: dict) -> None:
    """Delete path only if it is still the object seen (a newer write is kept)."""
    if dest.is_gcs:
        gcs.delete_generation(path, seen["generation"])
    elif dest.is_local:
        with locked(lock_path(dest)):  # every removal here takes it; a link never replaces
            if _identity(dest, path) == seen:
                os.unlink(path)
    else:
        dest.fs.delete_file(path)


def _copy_create_only(source: str, target: str) -> dict:
    """source's bytes appear at target whole (a temp file, then a hard link), only where nothing
    is or the same bytes are; FileExistsError otherwise. The identity of the file now there."""
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(source, tmp)
    try:
        link_create_only(tmp, target)
        return _local_identity(os.stat(tmp))  # the same inode as target's
    except FileExistsError:
        there = os.stat(target)
        if there.st_size != os.path.getsize(source) or sha256_file(target) != sha256_file(source):
            raise
        return _local_identity(there)
    finally:
        os.unlink(tmp)


def missing_or_wrong_size(dest: Location, files: dict) -> list[str]:
    """Which of files ({rel: {size, ...}}) are not in dest with their size: one listing."""
    found = {}
    for info in dest.fs.get_file_info(pafs.FileSelector(dest.path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            found[info.path[len(dest.path.rstrip("/")) + 1:]] = info.size
    return sorted(rel for rel, entry in files.items() if found.get(rel) != entry["size"])


def not_written_by(dest: Location, files: dict, stored: dict[str, dict | None]) -> list[str]:
    """Which of files ({rel: {size, sha256, md5}}) in dest are not the objects their writers
    uploaded (stored: {rel: identity} as upload_files returned them): missing, replaced, or
    other bytes. GCS: generation and MD5 from one listing, no download; locally inode, mtime and
    size; where there is no identity, the sha256 of what is there (a read)."""
    bad = set(missing_or_wrong_size(dest, files))
    there = gcs.identities(dest.path) if dest.is_gcs else {}
    for rel, entry in files.items():
        if rel in bad:
            continue
        mine = stored.get(rel)
        if dest.is_gcs and mine:
            now = there.get(rel)
            ok = bool(now) and now["generation"] == mine["generation"] and now["md5"] == entry.get("md5", now["md5"])
        elif dest.is_local and mine:
            ok = _identity(dest, join(dest.path, rel)) == mine
        else:
            with dest.fs.open_input_stream(join(dest.path, rel)) as f:
                import hashlib

                digest = hashlib.sha256()
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            ok = digest.hexdigest() == entry["sha256"]
        if not ok:
            bad.add(rel)
    return sorted(bad)


def delete(loc: Location) -> None:
    """Remove a checkpoint: metadata.json first (it stops counting at once), then the rest
    object by object (GCS has no directories to remove; see DESIGN.md)."""
    meta = join(loc.path, METADATA)
    if exists(loc.fs, meta):
        loc.fs.delete_file(meta)
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            loc.fs.delete_file(info.path)
    if loc.is_local and exists(loc.fs, loc.path):
        loc.fs.delete_dir(loc.path)


def fetch(loc: Location, scratch_dir: str, wanted: Callable[[str], bool] = lambda _: True,
          verify: bool = True) -> str:
    """Make the checkpoint readable on local disk, verifying each wanted file's size and sha256
    (verify=False: a local checkpoint whose hashes the caller has already checked).

    A local checkpoint is read in place; of a remote one only the wanted files are
    downloaded, to scratch_dir. Returns the local folder. Raises CheckpointError naming the file.
    """
    result = check(loc)
    if not result.ok:
        raise CheckpointError(f"checkpoint {loc.uri} is {result.status.value}: {result.reason}")
    manifest = result.metadata["files"]
    local = loc.path if loc.is_local else scratch_dir
    fetch_files(loc, local, sorted(rel for rel in manifest if wanted(rel)), manifest, verify)
    if not loc.is_local:
        fetch_files(loc, local, [METADATA], {}, verify=False)
    return local


def fetch_files(loc: Location, local: str, rels: list[str], manifest: dict, verify: bool = True) -> None:
    """Bring rels of the checkpoint at loc into local (a download, unless loc is local and read in
    place) and check each one's sha256 against manifest (verify). What a sharded resume calls
    once it knows which shard files this rank's part of the state lives in."""
    if not loc.is_local:
        os.makedirs(local, exist_ok=True)
        for rel in rels:
            target = _inside(local, rel, loc)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with loc.fs.open_input_stream(join(loc.path, rel)) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    for rel in rels if verify else []:
        actual = sha256_file(os.path.join(local, rel))
        if actual != manifest[rel]["sha256"]:
            raise CheckpointError(
                f"checkpoint {loc.uri} is corrupt: {rel} has sha256 {actual[:12]}..., "
                f"metadata.json says {manifest[rel]['sha256'][:12]}...; resume from another checkpoint"
            )


def _inside(folder: str, rel: str, loc: Location) -> str:
    """folder/rel, refused unless it stays inside folder (links resolved): whatever a listing or
    a manifest says, a download never writes anywhere else."""
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, rel))
    if rel_name_problem(rel) not in (None, "metadata.json listing itself") or (
            os.path.commonpath([root, target]) != root or target == root):
        raise CheckpointError(f"checkpoint {loc.uri} is corrupt: its file list names {rel!r}, "
                              f"which is not inside the checkpoint; resume from another checkpoint")
    return target
