"""One launch writes a run at a time (storage/lease.py), taken on the driver before Ray starts."""

from __future__ import annotations

import _thread
import sys
from typing import TYPE_CHECKING

from configs.schema import Config
from ray_job.errors import UserError
from storage.lease import Lease, LeaseError
from storage.location import Location, resolve

if TYPE_CHECKING:
    from trainers.launch_plan import LaunchPlan


def take_run(cfg: Config, run: Location, plan: LaunchPlan) -> Lease:
    """Own the run for this launch, or refuse (UserError, nothing written).

    Then look at the run again: a launch that finished between prepare()'s checks and our lease
    may have written checkpoints this one would collide with. The heartbeat starts last; a lost
    lease (another launch took it after ours went stale) stops this launch.
    """
    from ray_job import resume

    lease = Lease(run, plan.launch_id, stale_s=cfg.checkpoint.lease_stale_s)
    try:
        lease.acquire()
    except LeaseError as e:
        raise UserError(str(e)) from None
    except OSError as e:  # read-only, full, no permission: the probe missed it
        raise UserError(f"--storage {run.uri}: cannot write the run's lease "
                        f"({type(e).__name__}: {e}); use a writable --storage") from None
    try:
        resume.check_no_overwrite(run, _choice(plan))
    except BaseException:
        lease.release()
        raise
    lease.start_heartbeat(on_lost=_stop_this_launch)
    return lease


def _choice(plan: LaunchPlan):
    """The ResumeChoice prepare() made, rebuilt from the plan (the overwrite guard's input)."""
    from ray_job.resume import ResumeChoice

    r = plan.resume
    if r is None:
        return None
    return ResumeChoice(name=r.name, loc=resolve(r.uri), metadata={"step": r.step})


def _stop_this_launch(reason: str) -> None:
    print(f"❌ {reason}; stopping this launch so that the run has one writer", file=sys.stderr,
          flush=True)
    _thread.interrupt_main()  # KeyboardInterrupt in main(), which exits 1 for a lost lease
