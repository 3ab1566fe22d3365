"""Spot capacity: Ray's elastic worker group (`ScalingConfig(num_workers=(min, max))`) seen from
the job. Ray restarts the whole group at every resize (ray/train/v2/_internal/execution/
controller/controller.py, `_execute_resize_decision`); each attempt trains at the size Ray gave
it, from the newest committed checkpoint, with the same global batch and sample order.

Three things Ray does not do, done here:

- The train stream is built for the attempt's real size. Ray calls the datasets callable with
  no arguments (callbacks/datasets.py), in its controller, after every callback's
  `before_worker_group_start(context)`, which carries the group's size: `ElasticHooks` records
  it there, in the controller process, and `train_dataset` reads it.
- Growing back costs no steps. Ray decides to grow (RunningState -> ResizingState) and then calls
  `before_controller_execute_resize_decision` before it shuts the running group down: the hook
  asks the workers (Ray's key-value store, as a graceful stop does) to save the step in
  progress, waits until that checkpoint is committed in storage, and only then lets Ray restart
  the group, which resumes from it.
- The log says what happened (`↘️  Resized: 2 -> 1 workers (node ... lost)`): rank 0 records each
  attempt's size and nodes, and the next attempt compares.
"""

from __future__ import annotations

import json
import time

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from trainers.launch_plan import LaunchPlan

NAMESPACE = "ray_train_resume"
GROW_WAIT_S = 120.0  # the longest a resize waits for the workers' checkpoint (then Ray goes on)

# launch_id -> the size of the group Ray is starting; lives in Ray Train's controller process,
# where both the hooks and the datasets callable run.
_STARTING: dict[str, int] = {}


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _get(key: str):
    raw = _kv()._internal_kv_get(key, namespace=NAMESPACE)
    return None if raw is None else json.loads(raw)


def _put(key: str, value) -> None:
    _kv()._internal_kv_put(key, json.dumps(value).encode(), overwrite=True, namespace=NAMESPACE)


def _delete(key: str) -> None:
    _kv()._internal_kv_del(key, namespace=NAMESPACE)


def group_size(plan: LaunchPlan) -> int:
    """The size of the group Ray is starting for this launch (in the controller process)."""
    size = _STARTING.get(plan.launch_id)
    if size is None:
        if plan.config.scaling.elastic:
            raise RuntimeError("Ray started a worker group without telling its size "
                               "(ElasticHooks.before_worker_group_start did not run)")
        return plan.config.scaling.num_workers
    return size


class ElasticHooks(ControllerCallback, WorkerGroupCallback):
    """Given to `RunConfig(callbacks=[...])`; Ray calls it in its controller."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.growing = False

    def before_worker_group_start(self, worker_group_context) -> None:
        _STARTING[self.plan.launch_id] = worker_group_context.num_workers

    def after_controller_state_update(self, previous_state, current_state) -> None:
        # ResizingState follows only a running group (controller.py, _step): a resize that will
        # shut down a group that is training.
        if type(current_state).__name__ == "ResizingState":
            self.growing = True

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        if not self.growing:
            return  # the first start or a restart: no group is training
        self.growing = False
        save_before_resize(self.plan, resize_decision.num_workers)


def save_before_resize(plan: LaunchPlan, new_size: int, timeout_s: float = GROW_WAIT_S) -> str | None:
    """Ask the running group to save the step in progress and wait until that checkpoint is
    committed; the name, or None if it did not come in time (Ray restarts the group anyway,
    from the newest committed checkpoint: at most checkpoint.every steps are retrained)."""
    from storage import manifest
    from storage.location import resolve

    launch = plan.launch_id
    _delete(f"resize_saved/{launch}")
    _put(f"resize/{launch}", new_size)
    deadline = time.time() + timeout_s
    name = None
    try:
        while time.time() < deadline:
            name = _get(f"resize_saved/{launch}")
            if name is not None and manifest.check(resolve(plan.run_uri).child(name)).ok:
                return name
            time.sleep(0.2)
        return None
    finally:
        _delete(f"resize/{launch}")


def resize_requested(launch_id: str) -> bool:
    """Rank 0, once a step: Ray is about to restart the group at another size."""
    return _kv()._internal_kv_get(f"resize/{launch_id}", namespace=NAMESPACE) is not None


def saved_for_resize(launch_id: str, name: str) -> None:
    _put(f"resize_saved/{launch_id}", name)


def note_attempt(plan: LaunchPlan, world: int, nodes: list[str], resumed_from: str | None) -> str | None:
    """Rank 0 at an attempt's start: record its size and nodes; the line saying how the group
    changed since the previous attempt of this launch, or None."""
    import ray

    key = f"attempt/{plan.launch_id}"
    previous = _get(key)
    _put(key, {"world": world, "nodes": sorted(set(nodes))})
    if previous is None or previous["world"] == world:
        return None
    source = f"; resuming from {resumed_from}" if resumed_from else ""
    if world > previous["world"]:
        return f"↗️  Resized: {previous['world']} -> {world} workers{source}"
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    gone = [n for n in previous["nodes"] if n not in set(nodes)]
    why = ", ".join(f"node {n[:12]} {'lost' if n not in alive else 'left'}" for n in gone) or "fewer fit"
    return f"↘️  Resized: {previous['world']} -> {world} workers ({why}){source}"


def note_group(plan: LaunchPlan, world: int, rank: int, resumed_from: str | None) -> str | None:
    """Every rank at an attempt's start (a collective): rank 0 gets the line saying how the
    group changed since this launch's previous attempt."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [node] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(nodes, node)
    return note_attempt(plan, world, nodes, resumed_from) if rank == 0 else None


def hold(say) -> None:
    """After the resize's checkpoint is committed: wait for Ray to end this group (it restarts it
    at the new size from that checkpoint); train on only if it never does."""
    say("⏸️  Holding for the resize: Ray restarts the group at its new size from this checkpoint")
    time.sleep(GROW_WAIT_S + 60)
