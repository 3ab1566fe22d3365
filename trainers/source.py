"""Which checkpoint an attempt starts from. Torch-free: the loop restores weights from it and
the train dataset is built from its cursor (data/stream.py, in Ray Train's controller),
through this one function, so data and weights come from the same checkpoint.

An explicit --resume wins on the first attempt; this launch's own newest checkpoint on in-run
retries (Ray restarting the worker group after a failure or a preemption).

Ray's get_checkpoint() also returns the latest checkpoint of an *earlier* job with the same run
name and storage, which would silently override --resume NAME: only a checkpoint written by
this launch (same launch_id) counts as a retry's. And Ray's registry is not storage's truth:
Ray registers a checkpoint just before our controller callback commits it (ray_job/commit.py
writes metadata.json once every writer's files are in storage), so a registered checkpoint
may be uncommitted, and only committed ones can be resumed: storage alone answers. The driver refused any
complete checkpoint newer than the resume point, so the newest complete one in the run decides:
it is this launch's, or none is.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.listing import scan
from storage.location import Location, resolve
from trainers.launch_plan import LaunchPlan


@dataclass(frozen=True)
class Source:
    loc: Location
    name: str
    step: int
    epoch: int
    samples_in_epoch: int
    retry: bool  # this launch's own checkpoint, after Ray restarted the workers


def choose(plan: LaunchPlan) -> Source | None:
    for entry in reversed(scan(resolve(plan.run_uri))):
        result = entry.result
        if not result.ok:
            continue  # a save in flight or killed mid-upload
        if result.metadata.get("launch_id") == plan.launch_id:
            m = result.metadata
            return Source(entry.loc, str(entry.name), int(m["step"]), int(m["epoch"]),
                          int(m["samples_in_epoch"]), retry=True)
        break
    r = plan.resume
    if r is not None:
        return Source(resolve(r.uri), r.name, r.step, r.epoch, r.samples_in_epoch, retry=False)
    return None
