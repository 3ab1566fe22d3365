"""Writing, checking, listing and fetching checkpoints.

A checkpoint is a folder ``{run}/checkpoint-epoch{E}-step{S}-files{F}/``. It counts only when
it is *complete*: ``metadata.json`` exists, is written last, and lists every other file of
the checkpoint with its size and sha256, and every listed file is there with that size
(and, when hashes are checked, that sha256). ``check`` is the one definition of complete:
``latest``, ``list``, resume and retention all call it.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow.fs as pafs

from storage import gcs
from storage.location import Location, join
from storage.names import CheckpointName

METADATA = "metadata.json"
METRICS = "training_metrics.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler_state.pt"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt or unusable. The message is for people."""


class Status(str, enum.Enum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    CORRUPT = "corrupt"


@dataclass
class CheckResult:
    status: Status
    reason: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is Status.COMPLETE


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(path: str) -> dict:
    """sha256 (what we verify on load) and base64 MD5 (what GCS reports for every object)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": base64.b64encode(md5.digest()).decode()}


def _is_gcs(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "gcs"


def write_metadata(local_dir: str, metadata: dict) -> dict:
    """Add the manifest of every file in local_dir to metadata and write metadata.json last."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if rel == METADATA or rel.endswith(".tmp"):
                continue
            files[rel] = {"size": os.path.getsize(full), **_digests(full)}
    metadata = {**metadata, "format_version": FORMAT_VERSION, "files": files}
    tmp = os.path.join(local_dir, METADATA + ".tmp")
    with open(tmp, "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(local_dir, METADATA))  # atomic on a local disk
    return metadata


def _read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_metadata(loc: Location) -> dict:
    return _read_json(loc.fs, join(loc.path, METADATA))


def _sha256_remote(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check(loc: Location, verify_hashes: bool = False) -> CheckResult:
    """Decide whether the checkpoint at loc is complete. Never raises for a bad checkpoint."""
    meta_path = join(loc.path, METADATA)
    if not _exists(loc.fs, meta_path):
        return CheckResult(Status.INCOMPLETE, f"{METADATA} is missing (the save never finished)")
    try:
        metadata = _read_json(loc.fs, meta_path)
        manifest = metadata["files"]
        if not isinstance(manifest, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in manifest.values()
        ):
            raise ValueError("its file list is malformed")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return CheckResult(Status.CORRUPT, f"{METADATA} is unreadable: {e}")
    infos = {}
    selector = pafs.FileSelector(loc.path, recursive=True)
    for info in loc.fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            infos[info.path[len(loc.path.rstrip("/")) + 1:]] = info
    remote_md5 = gcs.md5s(loc.path) if verify_hashes and _is_gcs(loc.fs) else None
    for rel, expected in sorted(manifest.items()):
        info = infos.get(rel)
        if info is None:
            return CheckResult(Status.INCOMPLETE, f"{rel} is missing", metadata)
        if info.size != expected["size"]:
            return CheckResult(
                Status.CORRUPT,
                f"{rel} has {info.size} bytes, metadata.json says {expected['size']}",
                metadata,
            )
        if remote_md5 is not None and expected.get("md5"):  # verified without a download
            if remote_md5.get(rel) != expected["md5"]:
                return CheckResult(
                    Status.CORRUPT, f"{rel} md5 {remote_md5.get(rel)} != {expected['md5']} in metadata.json",
                    metadata,
                )
        elif verify_hashes:
            actual = _sha256_remote(loc.fs, join(loc.path, rel))
            if actual != expected["sha256"]:
                return CheckResult(
                    Status.CORRUPT, f"{rel} sha256 {actual[:12]}... != {expected['sha256'][:12]}...",
                    metadata,
                )
    return CheckResult(Status.COMPLETE, "", metadata)


@dataclass
class Entry:
    name: CheckpointName
    loc: Location


def list_checkpoints(run: Location) -> list[Entry]:
    """Every folder in run named like a checkpoint, in training order (parsed numbers).

    Lists recursively: GCS has no directories and pyarrow shows implied ones only when a
    marker object exists, so the first path component of each object is what counts.
    """
    if not _exists(run.fs, run.path):
        return []
    found: dict[str, CheckpointName] = {}
    prefix_len = len(run.path.rstrip("/")) + 1
    for info in run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True)):
        first = info.path[prefix_len:].split("/", 1)[0]
        if first not in found:
            parsed = CheckpointName.try_parse(first)
            if parsed is not None:
                found[first] = parsed
    return [Entry(n, run.child(str(n))) for n in sorted(found.values(), key=lambda n: n.sort_key)]


def latest_complete(run: Location) -> Entry | None:
    """The highest-step checkpoint that is whole, hashes included (MD5 from the server on GCS,
    sha256 locally): a corrupt newest checkpoint is skipped, never chosen."""
    for entry in reversed(list_checkpoints(run)):
        if check(entry.loc, verify_hashes=True).ok:
            return entry
    return None


def upload(local_dir: str, dest: Location) -> None:
    """Copy a finished local checkpoint to dest: every data file first, metadata.json last.

    Refuses to replace a checkpoint that already has a metadata.json: a checkpoint is
    never overwritten.
    """
    if _exists(dest.fs, join(dest.path, METADATA)):
        raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri}")
    dest.fs.create_dir(dest.path, recursive=True)
    rels = []
    for root, _, names in os.walk(local_dir):
        for name in names:
            rels.append(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"))
    for rel in sorted(r for r in rels if r != METADATA):
        if "/" in rel:
            dest.fs.create_dir(join(dest.path, rel.rsplit("/", 1)[0]), recursive=True)
        with open(os.path.join(local_dir, rel), "rb") as src, dest.fs.open_output_stream(
            join(dest.path, rel)
        ) as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
    # The commit marker, last. On GCS create-only: of two writers of one name, one loses loudly.
    with open(os.path.join(local_dir, METADATA), "rb") as f:
        commit = f.read()
    if _is_gcs(dest.fs):
        try:
            gcs.write_create_only(join(dest.path, METADATA), commit)
        except FileExistsError:
            raise CheckpointError(f"refusing to overwrite the existing checkpoint {dest.uri}") from None
    else:
        tmp = join(dest.path, METADATA + ".tmp")
        with dest.fs.open_output_stream(tmp) as out:
            out.write(commit)
        dest.fs.move(tmp, join(dest.path, METADATA))  # a rename: atomic on a local disk


def delete(loc: Location) -> None:
    """Remove a checkpoint: metadata.json first (it stops counting at once), then the rest
    object by object (GCS has no directories to remove; see DESIGN.md)."""
    meta = join(loc.path, METADATA)
    if _exists(loc.fs, meta):
        loc.fs.delete_file(meta)
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            loc.fs.delete_file(info.path)
    if isinstance(loc.fs, pafs.LocalFileSystem) and _exists(loc.fs, loc.path):
        loc.fs.delete_dir(loc.path)


def fetch(loc: Location, scratch_dir: str, wanted: Callable[[str], bool] = lambda rel: True) -> str:
    """Make the checkpoint readable on local disk, verifying each wanted file's size and sha256.

    A local checkpoint is verified in place; of a remote one only the wanted files are
    downloaded, to scratch_dir. Returns the local folder. Raises CheckpointError naming the file.
    """
    result = check(loc)
    if not result.ok:
        raise CheckpointError(f"checkpoint {loc.uri} is {result.status.value}: {result.reason}")
    manifest = {rel: v for rel, v in result.metadata["files"].items() if wanted(rel)}
    if isinstance(loc.fs, pafs.LocalFileSystem):
        local = loc.path
    else:
        local = scratch_dir
        os.makedirs(local, exist_ok=True)
        for rel in sorted(manifest) + [METADATA]:
            target = os.path.join(local, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with loc.fs.open_input_stream(join(loc.path, rel)) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    for rel, expected in sorted(manifest.items()):
        actual = sha256_file(os.path.join(local, rel))
        if actual != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {loc.uri} is corrupt: {rel} has sha256 {actual[:12]}..., "
                f"metadata.json says {expected['sha256'][:12]}...; resume from another checkpoint"
            )
    return local


def now_iso(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))
