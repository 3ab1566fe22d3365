"""--storage is checked for writing before anything runs, without writing (storage/location.py):
a file in the way, a read-only or full file system, no permission. The file system's answers
are injected where this machine cannot produce them (tests run as root, no spare mounts)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from storage.location import StorageUnreachable, local_write_problem, probe, resolve


def fs(flag=0, free=1 << 30):
    return lambda path: SimpleNamespace(f_flag=flag, f_bavail=free // 4096, f_frsize=4096)


def test_a_writable_folder_or_one_to_be_made_passes(tmp_path):
    assert local_write_problem(str(tmp_path)) is None
    assert local_write_problem(str(tmp_path / "new" / "deeper")) is None
    assert not (tmp_path / "new").exists()  # nothing made, nothing written
    assert os.listdir(tmp_path) == []


def test_a_file_or_a_file_above_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    assert local_write_problem(str(tmp_path / "f")).startswith("is a file, not a folder")
    problem = local_write_problem(str(tmp_path / "f" / "runs"))
    assert problem.startswith(f"is under a file ({tmp_path / 'f'}), not a folder")
    with pytest.raises(StorageUnreachable, match="is a file, not a folder"):
        probe(resolve(str(tmp_path / "f")), writable=True)
    probe(resolve(str(tmp_path / "f")))  # reading needs no check here


def test_read_only_full_and_no_permission_are_refused(tmp_path):
    ro = local_write_problem(str(tmp_path / "runs"), statvfs=fs(flag=os.ST_RDONLY))
    assert ro == f"is on a read-only file system ({tmp_path}); give a writable folder for checkpoints"
    full = local_write_problem(str(tmp_path), statvfs=fs(free=1 << 20))
    assert full.startswith("is on a full file system (1 MiB free at")
    denied = local_write_problem(str(tmp_path), statvfs=fs(), access=lambda p, mode: False)
    assert denied.startswith("is not writable by this user")
