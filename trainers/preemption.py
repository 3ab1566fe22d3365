"""Ray's preemption notice: save a checkpoint at once, then hold until the node goes."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray.train

from configs.schema import Config

NO_DEADLINE_S = 120.0  # Ray's DEFAULT_PREEMPTION_DEADLINE_S: a notice without a deadline


class PreemptionWatch:
    def __init__(self, cfg: Config, say: Callable[[str], None]):
        self.every = cfg.checkpoint.preemption_check_every
        self.wait_s = cfg.checkpoint.preemption_wait_s
        self.say = say
        self.notified = False  # one checkpoint per notice; Ray restarts us after the node goes

    def notice(self, step: int):
        """Ray's notice that a node of this run is being preempted (first time only), or None.

        get_preemption_info() is a barrier: every rank calls it at the same steps.
        """
        if not self.every or step % self.every:
            return None
        info = ray.train.get_preemption_info()
        if info is None or self.notified:
            return None
        self.notified = True
        self.say(f"\n⚠️  Preemption notice: node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} "
                 f"(ranks {info.preempted_ranks}) go away{_deadline(info)}: saving a checkpoint now")
        return info

    def hold(self, info) -> None:
        """Every rank waits (they all got the same notice) until Ray ends the group: at the
        notice's deadline (no deadline: Ray's 120 s), Ray restarts the run from the checkpoint on
        the nodes that remain. Steps trained meanwhile would die with the node. preemption_wait_s
        past the deadline, training goes on (Ray never restarted it)."""
        until = (info.deadline_ms / 1000 if info.deadline_ms is not None else time.time() + NO_DEADLINE_S)
        wait = max(0.0, until - time.time()) + self.wait_s
        if not self.wait_s:
            return
        self.say(f"⏸️  Holding training until Ray restarts the run from the checkpoint (up to {wait:.0f}s: "
                 "the deadline, then checkpoint.preemption_wait_s)")
        time.sleep(wait)


def _deadline(info) -> str:
    if info.deadline_ms is None:
        return ""
    return f" in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f}s"
