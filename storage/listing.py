"""Which checkpoints a run has: the one listing, each checkpoint checked at most once.

``scan(run)`` lists the folders of a run named like a checkpoint (storage/names.py), in
training order (parsed numbers, never strings); anything else in the run (the lease, Ray's own
files) is not a checkpoint. Each entry carries storage/manifest.py's ``check`` verdict, made on
first use and kept: ``latest`` stops at the newest complete checkpoint without hashing older
ones. ``latest``, ``list``, ``show``, resume, the overwrite rule, retention and the workers'
choice of where to start all look at a run through ``scan``.

What a name stands for is decided here too (``Entry.empty``): nothing there (no metadata.json
and no file in the folder: a name never saved under), an incomplete save, or a corrupt one.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property

import pyarrow.fs as pafs

from storage.location import Location, exists
from storage.manifest import CheckResult, Status, check
from storage.names import CheckpointName


@dataclass
class Entry:
    name: CheckpointName
    loc: Location
    verify_hashes: bool = False  # what `result` checks: sizes only, or hashes too

    @classmethod
    def at(cls, loc: Location, verify_hashes: bool = False) -> Entry:
        """The checkpoint folder loc, whose name must parse (ValueError otherwise)."""
        return cls(CheckpointName.parse(posixpath.basename(loc.path.rstrip("/"))), loc, verify_hashes)

    @cached_property
    def result(self) -> CheckResult:
        return check(self.loc, verify_hashes=self.verify_hashes)

    @property
    def empty(self) -> bool:
        """Nothing there: no metadata.json and no file directly in the folder. Not recursive:
        a checkpoint's files sit directly in it, and a walk must never wander through a big
        tree."""
        if self.result.status is not Status.INCOMPLETE:
            return False
        info = self.loc.fs.get_file_info(self.loc.path)
        if info.type == pafs.FileType.File:
            return False
        sel = pafs.FileSelector(self.loc.path, recursive=False, allow_not_found=True)
        return not any(i.type == pafs.FileType.File for i in self.loc.fs.get_file_info(sel))


def scan(run: Location, verify_hashes: bool = False) -> list[Entry]:
    """Every folder in run named like a checkpoint, in training order (parsed numbers).

    Lists recursively: GCS has no directories and pyarrow shows implied ones only when a
    marker object exists, so the first path component of each object is what counts.
    """
    if not exists(run.fs, run.path):
        return []
    found: dict[str, CheckpointName] = {}
    prefix_len = len(run.path.rstrip("/")) + 1
    for info in run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True)):
        first = info.path[prefix_len:].split("/", 1)[0]
        if first not in found:
            parsed = CheckpointName.try_parse(first)
            if parsed is not None:
                found[first] = parsed
    return [Entry(n, run.child(str(n)), verify_hashes)
            for n in sorted(found.values(), key=lambda n: n.sort_key)]


def latest_complete(run: Location) -> Entry | None:
    """The highest-step checkpoint that is whole, hashes included (MD5 from the server on GCS,
    sha256 locally): a corrupt newest checkpoint is skipped, never chosen."""
    return next((e for e in reversed(scan(run, verify_hashes=True)) if e.result.ok), None)
