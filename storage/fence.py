"""The fence: what every worker-side change to a run checks first, that the run's lease
(storage/lease.py) is still this launch's. Commits, retention deletes, the start of every
checkpoint upload and every removal of another writer's file go through it
(trainers/commit.py, storage/transfer.py, storage/marker.py), so a launch that lost its lease,
its driver frozen or cut off from storage and the run taken over, never changes the run again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from storage.lease import Holder, LeaseError, _LocalStore, _store
from storage.location import Location


class LeaseLost(LeaseError):
    """The run's lease is no longer this launch's: it writes nothing more to the run."""


class Fence:
    """What a worker checks before it changes the run (a commit, a retention delete, removing
    another writer's file, starting an upload): the run's lease is still this launch's.

    ``with fence(): ...`` runs the block only then; LeaseLost otherwise. On local disk the
    block runs under the lease's flock, which every takeover takes too: no launch can take the
    run over between the check and the change. On GCS (no lock spans two objects) the lease is
    read generation-matched and must be this launch's with a heartbeat at most stale_s / 2 old:
    a takeover needs one older than stale_s, which leaves half of it for the block to land. A
    heartbeat between the two (a refresh or two failed) is waited for; past stale_s the lease
    is as good as lost and LeaseLost is raised.
    """

    def __init__(self, run: Location, launch_id: str, stale_s: float, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, store=None):
        self.run, self.launch_id, self.stale_s = run, launch_id, stale_s
        self.clock, self.sleep = clock, sleep
        self.store = store if store is not None else _store(run)

    def _holder(self) -> Holder:
        current = self.store.read()
        holder = Holder.parse(current[0]) if current else None
        if holder is None or holder.launch_id != self.launch_id:
            who = f"another launch holds it ({holder.describe(self.clock())})" if holder else "it is gone"
            raise LeaseLost(f"lost the lease on run {self.run.uri}: {who}; this launch "
                            f"({self.launch_id[:12]}) writes nothing more to the run")
        return holder

    @contextmanager
    def __call__(self):
        if isinstance(self.store, _LocalStore):
            with self.store._locked():
                self._holder()
                yield
            return
        while True:
            age = self.clock() - self._holder().heartbeat
            if age <= self.stale_s / 2:
                break
            if age > self.stale_s:
                raise LeaseLost(f"the lease on run {self.run.uri} was last refreshed {age:.0f}s ago, "
                                f"past checkpoint.lease_stale_s ({self.stale_s:g}s): another launch may "
                                "take the run over, so this launch writes nothing more to it")
            self.sleep(min(1.0, self.stale_s / 20))
        yield
