"""Where a launch's checkpoint snapshots wait on local disk before upload: one folder per
launch, ``{tmp}/ray-train-resume-snapshots/{run key}/{launch id}/``, never loose in the temp
directory. Every way a job ends removes its launch's folder (the writer threads remove each
snapshot once uploaded; the loop and the driver remove the folder at the end), and a launch
removes the folders earlier launches of the same run left on its nodes (a killed job cannot
clean up after itself). The run's lease makes one launch the only writer, so nothing removed
here belongs to a live launch."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

ROOT = "ray-train-resume-snapshots"


def run_folder(run_uri: str) -> str:
    return os.path.join(tempfile.gettempdir(), ROOT, hashlib.sha256(run_uri.encode()).hexdigest()[:16])


def launch_folder(run_uri: str, launch_id: str) -> str:
    return os.path.join(run_folder(run_uri), launch_id)


def rank_folder(run_uri: str, launch_id: str, rank: int) -> str:
    """One rank's snapshots (ranks of a launch may share a node and its temp directory)."""
    return os.path.join(launch_folder(run_uri, launch_id), f"rank{rank}")


def clear_earlier(run_uri: str, launch_id: str) -> list[str]:
    """Remove the snapshot folders of this run's other launches on this node; their names."""
    root = run_folder(run_uri)
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return []
    gone = [e for e in entries if e != launch_id]
    for entry in gone:
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    return gone


def remove(run_uri: str, launch_id: str, rank: int | None = None) -> None:
    """A rank's folder (a worker at its end), or the launch's (the driver at its end); then
    the folders above it that are left empty."""
    launch = launch_folder(run_uri, launch_id)
    shutil.rmtree(launch if rank is None else rank_folder(run_uri, launch_id, rank), ignore_errors=True)
    for folder in (launch, run_folder(run_uri)):
        try:
            os.rmdir(folder)  # only if empty: another rank on this node may still be writing
        except OSError:
            return
