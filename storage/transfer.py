"""Moving checkpoints: upload (metadata.json last, create-only), fetch (verified), delete.

Atomicity is the commit marker: a checkpoint counts once its metadata.json exists
(storage/manifest.py), so an upload writes every data file first and metadata.json last,
and a delete removes metadata.json first. A crash at any point leaves a folder that reads as
incomplete, never one that passes for whole. metadata.json is created only where none is (a
hard link on local disk, ``if_generation_match=0`` on GCS, where a rename is not atomic), so a
checkpoint is never overwritten, not even by a second writer racing the first.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable

import pyarrow.fs as pafs

from storage import gcs
from storage.location import Location, exists, join
from storage.manifest import CHUNK, METADATA, CheckpointError, check, rel_name_problem, sha256_file


def upload(local_dir: str, dest: Location) -> None:
    """Copy a finished local checkpoint to dest: every data file first, metadata.json last.

    Refuses to replace a checkpoint that already has a metadata.json: a checkpoint is never
    overwritten. metadata.json is created only where none is (a hard link on local disk,
    ``if_generation_match=0`` on GCS), so of two writers that both got past the first look,
    the second fails loudly at its commit instead of replacing the first's.
    """
    upload_files(local_dir, dest)
    with open(os.path.join(local_dir, METADATA), "rb") as f:
        commit(dest, f.read())


def upload_files(local_dir: str, dest: Location) -> None:
    """Copy every file of local_dir but metadata.json into dest (one rank's part of a checkpoint;
    the commit comes after every rank's). Refused where dest is already committed, and no file
    is ever written over another's (_put_create_only): a second launch writing the same name (one
    whose lease was taken over while its workers still upload) cannot change a checkpoint the
    other committed."""
    if exists(dest.fs, join(dest.path, METADATA)):
        raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri}")
    dest.fs.create_dir(dest.path, recursive=True)
    rels = []
    for root, _, names in os.walk(local_dir):
        for name in names:
            rels.append(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"))
    for rel in sorted(r for r in rels if r != METADATA):
        if "/" in rel:
            dest.fs.create_dir(join(dest.path, rel.rsplit("/", 1)[0]), recursive=True)
        _put_create_only(os.path.join(local_dir, rel), dest, rel)


def _put_create_only(source: str, dest: Location, rel: str) -> None:
    """source's bytes at dest/rel, never replacing a file of a committed checkpoint.

    Created only where nothing is, or the same bytes are (this writer's retry). A different
    file in a folder that is not committed was left by a writer that lost the run (a killed or
    taken-over launch): it is removed and the create tried once more; losing again means a
    writer is still at work there, and this one stops (CheckpointError). Once committed, a
    folder's files can never change: every writer creates, none overwrites.
    """
    target = join(dest.path, rel)
    for attempt in range(2):
        try:
            if dest.is_gcs:
                gcs.upload_create_only(target, source)
            elif dest.is_local:
                _copy_create_only(source, target)
            else:  # no create-only primitive in pyarrow's generic API: look, then copy
                if exists(dest.fs, target):
                    raise FileExistsError(target)
                pafs.copy_files(source, target, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=dest.fs, chunk_size=CHUNK)
            return
        except FileExistsError:
            if exists(dest.fs, join(dest.path, METADATA)):
                raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri} "
                                      f"(another writer committed it while this one uploaded)") from None
            if attempt == 1:
                raise CheckpointError(f"{dest.uri}/{rel} is being written by another writer of this "
                                      "checkpoint; this one writes nothing over it") from None
            if dest.is_gcs:
                gcs.delete_if_generation(target)
            else:
                dest.fs.delete_file(target)


def _copy_create_only(source: str, target: str) -> None:
    """source's bytes appear at target whole (a temp file, then a hard link), only where nothing
    is or the same bytes are; FileExistsError otherwise."""
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(source, tmp)
    try:
        link_create_only(tmp, target)
    except FileExistsError:
        if os.path.getsize(target) != os.path.getsize(source) or sha256_file(target) != sha256_file(source):
            raise
    finally:
        os.unlink(tmp)


def missing_or_wrong_size(dest: Location, files: dict) -> list[str]:
    """Which of files ({rel: {size, ...}}) are not in dest with their size: one listing."""
    found = {}
    for info in dest.fs.get_file_info(pafs.FileSelector(dest.path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            found[info.path[len(dest.path.rstrip("/")) + 1:]] = info.size
    return sorted(rel for rel, entry in files.items() if found.get(rel) != entry["size"])


def commit(dest: Location, metadata_json: bytes) -> None:
    """Write dest's metadata.json, the commit marker, create-only: CheckpointError if one is
    there already (a checkpoint is never overwritten, not even by a racing second writer)."""
    final = join(dest.path, METADATA)
    try:
        if dest.is_gcs:
            gcs.write_create_only(final, metadata_json)
            return
        # Never a fixed temp name: two writers of one checkpoint must not share (or move) it.
        tmp = join(dest.path, f"{METADATA}.{uuid.uuid4().hex}.tmp")
        with dest.fs.open_output_stream(tmp) as out:
            out.write(metadata_json)
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
    except FileExistsError:
        raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri}") from None


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
