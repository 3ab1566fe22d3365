"""What a checkpoint holds and the one check of whether it is whole.

A checkpoint is a folder ``{run}/checkpoint-epoch{E}-step{S}-files{F}/``. It counts only when
it is *complete*: ``metadata.json`` exists, is written last, and lists every other file of
the checkpoint with its size and sha256, and every listed file is there with that size
(and, when hashes are checked, that sha256). ``check`` is the one definition of complete:
``latest``, ``list``, resume and retention all call it (through storage/listing.py's ``scan``
when they look at a whole run).

Nothing in a checkpoint is trusted before ``check`` has read it: the manifest's names must be
plain relative paths inside the folder, metadata.json must have the schema below with sane
ranges, list every file a worker loads, and agree with the folder's name. Anything else is
corrupt, with the reason, and never reaches a worker.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import json
import os
import posixpath
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow.fs as pafs

from storage import gcs
from storage.location import Location, exists, join
from storage.names import CheckpointName

METADATA = "metadata.json"
METRICS = "training_metrics.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler_state.pt"
DCP_METADATA = ".metadata"  # a sharded checkpoint's DCP index (trainers/sharded.py)
STRATEGIES = ("ddp", "fsdp")  # metadata.json "strategy": how the model and optimizer were written
FORMAT_VERSION = 1
CHUNK = 8 << 20  # bytes per read when hashing or copying


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def loaded_files(world_size: int, strategy: str = "ddp") -> list[str]:
    """Every file trainers/checkpointer.py reads back on resume: each must be in the manifest,
    so that its size and hash are checked (an emptied manifest cannot switch the checks off).
    fsdp: the DCP index; its shard files are each rank's ("shards", checked separately)."""
    state = [DCP_METADATA] if strategy == "fsdp" else [MODEL, OPTIMIZER]
    return state + [SCHEDULER, METRICS] + [rng_file(r) for r in range(world_size)]


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


# --- hashing ----------------------------------------------------------------------------------

def _feed(stream: BinaryIO, *digests) -> None:
    """Every chunk of stream into each digest: one read, however many hashes."""
    while chunk := stream.read(CHUNK):
        for digest in digests:
            digest.update(chunk)


def _sha256(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    _feed(stream, digest)
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def _sha256_remote(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return _sha256(f)


def _digests(path: str) -> dict:
    """sha256 (what we verify on load) and base64 MD5 (what GCS reports for every object)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        _feed(f, sha, md5)
    return {"sha256": sha.hexdigest(), "md5": base64.b64encode(md5.digest()).decode()}


# --- writing the manifest -----------------------------------------------------------------------

def digest_folder(local_dir: str) -> dict:
    """{relative name: {size, sha256, md5}} of every file in local_dir but metadata.json: what a
    rank wrote, as the manifest lists it."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if rel == METADATA or rel.endswith(".tmp"):
                continue
            files[rel] = {"size": os.path.getsize(full), **_digests(full)}
    return files


def with_manifest(metadata: dict, files: dict) -> dict:
    """metadata.json's content: the metadata, the format version and the file list."""
    return {**metadata, "format_version": FORMAT_VERSION, "files": files}


def write_metadata(local_dir: str, metadata: dict) -> dict:
    """Add the manifest of every file in local_dir to metadata and write metadata.json last."""
    metadata = with_manifest(metadata, digest_folder(local_dir))
    # A temp name of our own (never a fixed one another writer could share), then a rename:
    # this is the local snapshot, which a retry may write again, so replacing is intended here.
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{METADATA}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(local_dir, METADATA))  # atomic on a local disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return metadata


# --- validating metadata.json -------------------------------------------------------------------

_MAX_INT = 2**63 - 1  # what torch and numpy can hold; JSON integers are unbounded
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rel_name_problem(rel) -> str | None:
    """Why rel is not a plain relative file name inside a checkpoint (None if it is)."""
    if not isinstance(rel, str) or not rel:
        return "an empty name"
    if "\\" in rel:
        return "a backslash"
    if rel.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "an empty, '.' or '..' path segment"
    if any(unicodedata.category(ch) == "Cc" for ch in rel):
        return "a control character"
    if rel == METADATA:
        return "metadata.json listing itself"
    return None


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "its file list is not a mapping"
    for rel, entry in manifest.items():
        problem = rel_name_problem(rel)
        if problem is not None:
            return f"its file list names {rel!r}: {problem} (only plain names inside the checkpoint)"
        if not (isinstance(entry, dict) and _is_int(entry.get("size")) and 0 <= entry["size"] <= _MAX_INT
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and isinstance(entry.get("md5", ""), str)):
            return f"its file list entry for {rel!r} is malformed (needs size and a sha256 hex digest)"
    return None


def _int_field(metadata: dict, key: str, low: int = 0) -> str | None:
    if key not in metadata:
        return f"{key} is missing"
    value = metadata[key]
    if not _is_int(value):
        return f"{key} is {value!r}, not an integer"
    if not low <= value <= _MAX_INT:
        return f"{key} is {value}, out of range (>= {low})"
    return None


def _metadata_problem(metadata: dict, folder: str) -> str | None:
    """Why metadata (a JSON object) is not a checkpoint's metadata for a folder named folder."""
    if metadata.get("format_version") != FORMAT_VERSION:
        return f"format_version is {metadata.get('format_version')!r}; this code reads {FORMAT_VERSION}"
    for key, low in (("step", 0), ("epoch", 0), ("samples_in_epoch", 0), ("files_processed", 0),
                     ("world_size", 1), ("global_batch_size", 1)):
        problem = _int_field(metadata, key, low)
        if problem is not None:
            return problem
    config = metadata.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return f"config is {_short(config)}, not a config with a model section"
    index = metadata.get("data_index")
    if not (isinstance(index, dict) and isinstance(index.get("files"), list)
            and isinstance(index.get("rows"), list)
            and all(isinstance(f, str) for f in index["files"])
            and all(_is_int(r) and 0 <= r <= _MAX_INT for r in index["rows"])
            and len(index["files"]) == len(index["rows"])):
        return f"data_index is {_short(index)}, not {{files: [paths], rows: [counts]}} of one length"
    for key in ("best_loss", "best_val_loss", "train_loss", "val_loss"):
        if metadata.get(key) is not None and not _is_number(metadata[key]):
            return f"{key} is {_short(metadata[key])}, not a number"
    for key in ("name", "launch_id", "run_name", "created_at"):
        if key in metadata and not isinstance(metadata[key], str):
            return f"{key} is {_short(metadata[key])}, not a string"
    resumed = metadata.get("resumed_from")
    if resumed is not None and not (isinstance(resumed, dict) and isinstance(resumed.get("name"), str)):
        return f"resumed_from is {_short(resumed)}, not {{name, uri}}"
    # The data cursor: whole global batches, inside the epoch (the last batch ends the epoch).
    batch, cursor, total = metadata["global_batch_size"], metadata["samples_in_epoch"], sum(index["rows"])
    if cursor % batch or cursor + batch > total:
        return (f"samples_in_epoch {cursor} is not a whole number of global batches "
                f"({batch}) inside an epoch of {total} samples")
    if metadata["files_processed"] > len(index["files"]):
        return (f"files_processed {metadata['files_processed']} exceeds the "
                f"{len(index['files'])} data files")
    # The folder's name and the metadata say the same thing.
    name = CheckpointName.try_parse(folder)
    if name is None:
        return f"the folder name {folder!r} is not a checkpoint name (checkpoint-epoch{{E}}-step{{S}}-files{{F}})"
    said = (metadata["epoch"], metadata["step"], metadata["files_processed"])
    if (name.epoch, name.step, name.files) != said:
        return (f"the folder is {folder} but metadata.json says epoch {said[0]}, step {said[1]}, "
                f"files {said[2]}")
    if metadata.get("name", folder) != folder:
        return f"the folder is {folder} but metadata.json names {metadata['name']!r}"
    manifest = metadata["files"]
    if metadata["world_size"] > len(manifest):
        return f"world_size {metadata['world_size']} but only {len(manifest)} files are listed"
    strategy = metadata.get("strategy", "ddp")  # checkpoints from before fsdp are ddp's
    if strategy not in STRATEGIES:
        return f"strategy is {_short(strategy)}, not one of {', '.join(STRATEGIES)}"
    unlisted = [rel for rel in loaded_files(metadata["world_size"], strategy) if rel not in manifest]
    if unlisted:
        return f"its file list lacks {', '.join(unlisted)} (every {strategy} checkpoint has them)"
    if strategy == "fsdp":
        return _shards_problem(metadata.get("shards"), metadata["world_size"], manifest)
    return None


def _shards_problem(shards, world_size: int, manifest: dict) -> str | None:
    """A sharded checkpoint names, for every rank, the files that rank wrote: a rank whose
    shards never arrived leaves the checkpoint unusable, so each must be listed (and, like every
    listed file, present)."""
    if not isinstance(shards, dict):
        return f"shards is {_short(shards)}, not {{rank: [files]}}"
    for rank in range(world_size):
        files = shards.get(str(rank))
        if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
            return f"shards lists no files for rank {rank} of {world_size}"
        missing = [f for f in files if f not in manifest]
        if missing:
            return f"shards names {missing[0]!r} for rank {rank}, which the file list lacks"
    extra = sorted(set(shards) - {str(r) for r in range(world_size)})
    if extra:
        return f"shards names rank {extra[0]!r}, outside world_size {world_size}"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the check --------------------------------------------------------------------------------

def check(loc: Location, verify_hashes: bool = False) -> CheckResult:
    """Decide whether the checkpoint at loc is complete. Never raises for a bad checkpoint."""
    meta_path = join(loc.path, METADATA)
    if not exists(loc.fs, meta_path):
        return CheckResult(Status.INCOMPLETE, f"{METADATA} is missing (the save never finished)")
    if loc.fs.get_file_info(meta_path).type != pafs.FileType.File:
        return CheckResult(Status.CORRUPT, f"{METADATA} is not a file")
    try:
        with loc.fs.open_input_stream(meta_path) as f:
            metadata = json.loads(f.read())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return CheckResult(Status.CORRUPT, f"{METADATA} is unreadable: {type(e).__name__}: {e}")
    if not isinstance(metadata, dict):
        return CheckResult(Status.CORRUPT, f"{METADATA} is unreadable: not a JSON object")
    if "claimed_by" in metadata and "files" not in metadata:  # storage/transfer.py's claim
        return CheckResult(Status.INCOMPLETE, f"{METADATA} is launch {str(metadata['claimed_by'])[:12]}'s "
                           "claim: being written, not committed")
    if "files" not in metadata:
        return CheckResult(Status.CORRUPT, f"{METADATA} is unreadable: it has no file list")
    # Untrusted until here: a corrupt checkpoint's metadata is not handed on (no caller sees it).
    problem = _manifest_problem(metadata["files"]) or _metadata_problem(
        metadata, posixpath.basename(loc.path.rstrip("/")))
    if problem is not None:
        return CheckResult(Status.CORRUPT, f"{METADATA} is invalid: {problem}")
    manifest = metadata["files"]
    infos = {}
    selector = pafs.FileSelector(loc.path, recursive=True)
    for info in loc.fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            infos[info.path[len(loc.path.rstrip("/")) + 1:]] = info
    remote_md5 = gcs.md5s(loc.path) if verify_hashes and loc.is_gcs else None
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
