"""trainers/tracking.py without Ray: the TensorBoard copy into a bucket-like run is best effort
(issue 23, item 6). A copy that fails after a commit is a warning, not a failed checkpoint; the
next copy (at the next commit, or at the end) brings every event file over."""

from __future__ import annotations

import shutil

import pyarrow.fs as pafs
from accelerate import Accelerator

from configs import load
from storage.location import Location
from trainers import tracking


def _tracker(tmp_path) -> tuple[tracking.Tracking, object]:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    # not local disk (a subtree filesystem stands for a bucket): the event files are copied
    run = Location(pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), "runs/r", "gs://b/runs/r")
    local = tracking.project_dir(run, "launch-t")
    accelerator = Accelerator(cpu=True, log_with=["tensorboard"], project_dir=local)
    return tracking.Tracking(load("test"), accelerator, run, "launch-t", 0, 0, 1, 1000), bucket / "runs" / "r"


def test_a_failed_tensorboard_copy_is_a_warning_and_the_next_one_copies_everything(tmp_path, capsys):
    tracker, run = _tracker(tmp_path)
    try:
        tracker.log({"train/loss": 1.0}, 1)
        run.mkdir(parents=True)
        (run / tracking.FOLDER).write_text("in the way")  # the copy fails, as a GCS blip would
        tracker.sync()  # after a commit: must not raise
        warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("⚠️")]
        assert len(warned) == 1 and warned[0].startswith(
            "⚠️  TensorBoard copy to gs://b/runs/r/tensorboard failed"), warned
        assert warned[0].endswith("retried after the next checkpoint and at the end")
        (run / tracking.FOLDER).unlink()
        (run / tracking.FOLDER).mkdir()  # a bucket has no folders to make; local disk does
        tracker.log({"train/loss": 0.5}, 2)
        tracker.sync()  # the next commit's copy
        assert len(list((run / tracking.FOLDER).glob("events.out.tfevents.*"))) == 1
        assert "⚠️" not in capsys.readouterr().out
        shutil.rmtree(run / tracking.FOLDER)
        (run / tracking.FOLDER).write_text("in the way")
        tracker.end()  # the end's copy fails too: a warning, the attempt still ends
        assert "⚠️  TensorBoard copy to gs://b/runs/r/tensorboard failed" in capsys.readouterr().out
    finally:
        shutil.rmtree(tracker.local, ignore_errors=True)
