"""How many of this rank's checkpoint reports still wait for Ray Train to take them.

Ray 2.60 (ray/train/v2/_internal/execution/context.py) runs every ASYNC report in one upload
thread, in order: it calls the report's checkpoint_upload_fn (ours waits for our writer thread),
then puts the report in a queue of size 1 that its controller empties once per poll of the
workers (worker_group/worker.py poll_status; RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by Ray's
default, 0.5 s as ray_job/launch.py sets it). So report k's upload function is called only once
report k-1 is in that queue, and the queue drains at about one report a poll however fast
training saves: a run that checkpoints faster waits at its end (and after a stop) for every
report still queued, about a poll each, before the attempt ends (worker.py:
train_fn_with_final_checkpoint_flush shuts the upload pool down, waiting).

The checkpointer holds its next save while more than `checkpoint.max_pending` reports wait
(reported, upload function not yet called): the wait is paid during training, where it is
logged and counted as stall, not at the end. A report Ray never runs (report() skips one when
its synchronization barrier is reset by a failing worker) must not hold training for ever: when
no upload function has been running for `lost_after_s` while reports wait, the oldest counts
as dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LOST_AFTER_S = 60.0  # 30 polls at Ray's default interval: far beyond a healthy queue's wait


class RayReports:
    def __init__(self, lost_after_s: float = LOST_AFTER_S, clock: Callable[[], float] = time.monotonic):
        self.lost_after_s, self.clock = lost_after_s, clock
        self._cond = threading.Condition()
        self.reported = self.called = self.returned = self.dropped = 0
        self._idle_since = clock()  # when Ray's upload thread last finished one of ours

    def reporting(self) -> None:
        """Before ray.train.report(...) with a checkpoint and our upload function."""
        with self._cond:
            if self.called == self.returned and self.reported == self.called + self.dropped:
                self._idle_since = self.clock()  # nothing queued until now: no wait has accrued
            self.reported += 1

    def upload_called(self) -> None:
        """Ray's upload thread entered our upload function."""
        with self._cond:
            self.called += 1
            self._cond.notify_all()

    def upload_returned(self) -> None:
        with self._cond:
            self.returned += 1
            self._idle_since = self.clock()
            self._cond.notify_all()

    def waiting(self) -> int:
        """Reports whose upload function Ray has not called yet (nor given up on)."""
        with self._cond:
            return self.reported - self.called - self.dropped

    def wait_below(self, limit: int, deadline: float | None = None) -> tuple[float, int]:
        """Block until fewer than limit reports wait, or deadline (clock time) passes; returns
        (seconds waited, reports counted as dropped while waiting)."""
        started = self.clock()
        dropped = 0
        with self._cond:
            while self.reported - self.called - self.dropped >= limit:
                now = self.clock()
                if deadline is not None and now >= deadline:
                    break
                # Ray's own time only: while our upload function runs, it waits for our writer
                if self.called == self.returned and now - self._idle_since >= self.lost_after_s:
                    self.dropped += 1
                    dropped += 1
                    self._idle_since = now
                    continue
                self._cond.wait(timeout=0.2)
        return self.clock() - started, dropped
