"""Checkpointing on the workers, in one place: which checkpoint an attempt starts from and
restoring it (trainers/restore.py), saving one (this module: stage in memory, background
write, upload and commit, Ray report). What a checkpoint holds and how each file is written
and loaded: trainers/state_files.py.

A save blocks training only to stage the state in CPU memory (a copy); the checkpointer's writer
thread serializes it to local disk, hashes it, uploads it and (rank 0, once every writer's
files are in storage) commits it. One staged copy at a time: a save waits for the previous one
to be written to local disk before it stages (bounded memory: one extra copy of this rank's
share of model and AdamW state, while the checkpoint before it uploads). Ray's report registers
each checkpoint (ASYNC: in its upload thread, waiting for the writer; SYNC: in the loop).

Two backlogs are bounded by checkpoint.max_pending, each wait logged and counted as stall:
checkpoints saved and not committed (ours), and reports Ray Train has not taken yet (its
queue drains about one report a poll: trainers/ray_reports.py).

A graceful stop drains the writer up to checkpoint.drain_timeout_s, then abandons what is left:
from then on this attempt commits none of them (the writer looks before its upload and, under
a lock the stop takes, before the commit), so the stop's "stay incomplete" holds even when an
upload finishes late.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode

from storage import manifest, transfer
from storage.fence import Fence
from storage.location import resolve
from storage.names import CheckpointName
from trainers import restore, sharded, snapshots, state_files, stopping
from trainers import source as sources
from trainers.commit import Committer
from trainers.launch_plan import LaunchPlan
from trainers.ray_reports import RayReports
from trainers.state import TrainState
from trainers.state_files import Full, Sharded, capture_rng, tensors

# The formats and loaders moved to trainers/state_files.py; importable here as they were.
_Full, _Sharded, _capture_rng, _restore_rng = Full, Sharded, capture_rng, state_files.restore_rng
load_model_and_optimizer, seed_rank = state_files.load_model_and_optimizer, state_files.seed_rank


class Abandoned(Exception):
    """A checkpoint the stop gave up on: this attempt neither uploads nor commits it."""


class _Pending:
    """One checkpoint staged in memory until the checkpointer's writer thread has written it to
    local disk (the staged buffers may then be reused); the same thread then uploads and (rank 0)
    commits it."""

    def __init__(self, name: str, fmt, staged: dict | None, small: dict[str, bytes], folder: str):
        self.name, self.fmt, self.staged, self.small, self.folder = name, fmt, staged, small, folder
        self.written = threading.Event()
        self.settled = threading.Event()  # the writer is done with it, or the stop gave up on it
        self.abandoned = False
        self.future = None

    def write(self) -> float:
        started = time.time()
        try:
            if self.staged is not None:
                self.fmt.write(self.staged, self.folder)  # fsdp: a collective, every rank's writer at once
            for rel, data in self.small.items():
                with open(os.path.join(self.folder, rel), "wb") as f:
                    f.write(data)
        finally:
            self.staged, self.small = None, {}  # written: the staged copy may be freed or reused
            self.written.set()
        return time.time() - started

    def committed(self) -> bool:
        f = self.future
        return f.done() and not f.cancelled() and f.exception() is None


class Checkpointer:
    def __init__(self, plan: LaunchPlan, strategy, scheduler, rank: int, world: int,
                 say: Callable[[str], None]):
        self.plan, self.cfg = plan, plan.config
        self.rank, self.world, self.say = rank, world, say
        self.strategy = strategy
        self.model, self.optimizer = strategy.model, strategy.optimizer  # unwrapped: no DDP prefixes
        self.scheduler = scheduler
        # DCP's collectives run in the writer thread: a gloo group of their own, never FSDP's.
        group = sharded.new_group() if strategy.sharded else None
        self.format = (Sharded if strategy.sharded else Full)(self.model, self.optimizer, group)
        self.group = group
        self.run = resolve(plan.run_uri)
        self.progress_initial = 0
        self.in_flight: _Pending | None = None
        # One writer thread, FIFO: write, upload, (fsdp) gather every rank's file list, commit.
        # Every rank persists its checkpoints in the same order, so DCP's and the gather's
        # collectives line up; at most one staged copy waits while the previous one uploads.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        # Every change to the run checks that its lease is still this launch's (storage/lease.py).
        self.fence = Fence(self.run, plan.launch_id, plan.config.checkpoint.lease_stale_s)
        self.committer = Committer(plan, fence=self.fence) if rank == 0 else None
        self.tracking = None  # the loop's trainers/tracking.Tracking, once it exists
        self.pending: list[_Pending] = []  # saved, not yet known committed
        self.ray = RayReports()
        self._gate = threading.Lock()  # held by the writer from its last look to the commit's end
        self._abandoned = False  # set by a stop whose drain ran out of time
        self._committing: str | None = None
        self.snapshots = snapshots.rank_folder(self.run.uri, plan.launch_id, rank)
        snapshots.clear_earlier(self.run.uri, plan.launch_id)  # a killed launch's leftovers
        os.makedirs(self.snapshots, exist_ok=True)

    # --- which checkpoint, restore (trainers/restore.py) -------------------------------------

    def choose_source(self) -> sources.Source | None:
        return restore.choose_source(self.plan, self.say)

    def restore(self, source: sources.Source) -> TrainState:
        state = restore.restore(source, self.strategy, self.scheduler, self.rank, self.world, self.say)
        self.progress_initial = state.step
        return state

    # --- save ------------------------------------------------------------------------------

    def save(self, state: TrainState, files_done: int, preempted: bool = False,
             deadline: float | None = None) -> None:
        """Every rank calls this at the same step (a collective). The writers (rank 0 under ddp,
        every rank under fsdp) stage their state in memory; their writer threads write, hash,
        upload and commit it (_persist); Ray's report registers it. deadline (time.monotonic()):
        a stop's, after which the backlogs are waited for no longer."""
        name = CheckpointName(epoch=state.epoch, step=state.step, files=files_done)
        started = time.time()
        fresh = False  # one staged copy at a time (bounded memory), but a stop's deadline wins
        if self.in_flight is not None:
            fresh = not self.in_flight.written.wait(None if deadline is None else
                                                    max(0.0, deadline - time.monotonic()))
        self._bound_backlog(name, deadline)
        self._bound_ray_queue(name, deadline)
        waited = time.time() - started
        blobs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(blobs, capture_rng())
        else:
            blobs = [capture_rng()]
        writes = self.rank in self.format.writers
        staged = self.format.stage(fresh) if writes else None
        last_val = state.val_history[-1] if state.val_history else None
        metrics = {
            "step": state.step, "epoch": state.epoch,
            "loss": state.loss_history[-1][1] if state.loss_history else None,
            "val_loss": last_val[1] if last_val else None,
            "best_loss": state.best_loss, "progress_initial": self.progress_initial,
            "checkpoint": str(name),
        }
        small: dict[str, bytes] = {}
        commit_fields = None
        if self.rank == 0:
            buf = io.BytesIO()
            torch.save(copy.deepcopy(self.scheduler.state_dict()), buf)
            small[manifest.SCHEDULER] = buf.getvalue()
            small[manifest.METRICS] = json.dumps(state.metrics_dict()).encode()
            small.update({manifest.rng_file(r): blob for r, blob in enumerate(blobs)})
            commit_fields = {  # trainers/commit.py adds config, data index and manifest
                "name": str(name), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files_processed": name.files, "train_loss": metrics["loss"],
                "val_loss": last_val[1] if last_val and last_val[0] == state.step else None,
                "versions": {"torch": torch.__version__, "ray": ray.__version__},
                "preempted": preempted,  # saved because Ray announced a node's preemption
                **state.progress_dict(),
            }
        mode = (CheckpointUploadMode.ASYNC if self.cfg.checkpoint.upload == "async"
                else CheckpointUploadMode.SYNC)
        if not writes:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=str(name),
                             checkpoint_upload_mode=mode)
            return
        folder = tempfile.mkdtemp(prefix=f"{name}-rank{self.rank}-", dir=self.snapshots)  # the writer removes it
        pending = self.in_flight = _Pending(str(name), self.format, staged, small, folder)
        pending.future = self.writer.submit(self._persist, pending, commit_fields)
        pending.future.add_done_callback(lambda _: pending.settled.set())
        self.pending.append(pending)
        if self.rank == 0:
            stopping.record_saved(self.plan.launch_id, str(name))
        staged_mb = sum(v.numel() * v.element_size() for v in tensors(staged)) / 2**20
        self.say(f"\n💾 Staged {name} in memory in {time.time() - started:.2f}s ({staged_mb:.1f} MB on "
                 f"rank 0{', waited ' + format(waited, '.2f') + 's for the previous one' if waited > 0.01 else ''}); "
                 f"writing and uploading {'in the background' if mode is CheckpointUploadMode.ASYNC else 'now'} "
                 f"({len(self.unfinished())} of checkpoint.max_pending {self.cfg.checkpoint.max_pending} pending)")
        dest = self.run.child(str(name))

        def registered(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
            """Ray's upload step (its upload thread under ASYNC, this thread under SYNC): the
            writer thread has done the work; Ray records the committed folder."""
            self.ray.upload_called()
            try:
                pending.settled.wait()
                if not pending.abandoned:  # abandoned: the stop said so already; not a failure
                    pending.future.result()  # the writer's error, if any, is raised here: Ray fails the run
                return Checkpoint(path=dest.path, filesystem=dest.fs)
            finally:
                self.ray.upload_returned()

        self.ray.reporting()
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=str(name), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=registered)
        blocked = time.time() - started
        self.say(f"⏱️  Training blocked {blocked:.3f}s for {name} ({mode.value.lower()} upload)")
        if self.tracking is not None:
            self.tracking.log({"checkpoint/stall_s": blocked}, state.step)

    def _bound_backlog(self, name: CheckpointName, deadline: float | None) -> None:
        """At most checkpoint.max_pending checkpoints saved but not committed: wait for the oldest."""
        self.pending = [p for p in self.pending if not p.committed()]
        limit = self.cfg.checkpoint.max_pending
        unfinished = [p for p in self.pending if not p.future.done()]
        if len(unfinished) < limit:
            return
        started = time.time()
        oldest = unfinished[0]
        self.say(f"⏳ {limit} checkpoints saved and not yet committed (checkpoint.max_pending): "
                 f"{name} waits for {oldest.name}")
        try:
            oldest.future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.say(f"⏳ {oldest.name} not committed by the stop's deadline; saving {name} anyway")
            return
        self.say(f"⏳ {oldest.name} committed; {name} waited {time.time() - started:.2f}s")

    def _bound_ray_queue(self, name: CheckpointName, deadline: float | None) -> None:
        """Hold this save while more than checkpoint.max_pending of this rank's reports wait for
        Ray Train's upload step (trainers/ray_reports.py): the wait is paid here, as stall, not
        when the attempt ends."""
        limit = self.cfg.checkpoint.max_pending
        waiting = self.ray.waiting()
        if waiting <= limit:
            return
        waited, dropped = self.ray.wait_below(limit + 1, deadline)
        if dropped:
            self.say(f"⚠️  Ray Train ran no upload for {self.ray.lost_after_s:g}s while {waiting} of this "
                     f"rank's reports waited: counting {dropped} as dropped by Ray")
        self.say(f"⏳ {name} waited {waited:.2f}s for Ray Train to take earlier reports ({waiting} "
                 f"waiting, more than checkpoint.max_pending {limit})")

    def unfinished(self) -> list[str]:
        return [p.name for p in self.pending if not p.future.done()]

    def drain(self, timeout_s: float | None, show: bool = False) -> list[str]:
        """Wait until every saved checkpoint is committed, up to timeout_s; the names still
        unfinished after it (errors are raised, as Ray's report would)."""
        from tqdm import tqdm

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        todo = list(self.pending)
        bar = tqdm(total=len(todo), desc="Finishing checkpoints", unit="ckpt", ascii=True,
                   disable=not show or not todo, file=sys.stdout, dynamic_ncols=False)
        for pending in todo:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                pending.future.result(timeout=left)
            except TimeoutError:
                break
            bar.update(1)
        bar.close()
        return self.unfinished()

    def abandon(self, wait_s: float = 1.0) -> tuple[list[str], str | None]:
        """After a stop's drain ran out of time: no checkpoint of this attempt is committed from
        now on. Returns the saved checkpoints not committed (they stay incomplete) and the one
        whose commit was already under way (the gate held past wait_s: it is whole only if its
        metadata.json lands), if any."""
        self._abandoned = True  # the writer reads it under the gate
        for pending in self.pending:
            if not pending.future.done():
                pending.abandoned = True
                pending.settled.set()  # Ray's upload step stops waiting for it
        under_way = None
        if self._gate.acquire(timeout=wait_s):
            self._gate.release()
        else:
            under_way = self._committing
        return [p.name for p in self.pending if not p.committed() and p.name != under_way], under_way

    def close(self) -> None:
        """The end of the attempt: no new work; this launch's snapshot folder goes (the writer
        removes each snapshot once uploaded; one abandoned by a stop is never uploaded)."""
        self.writer.shutdown(wait=False, cancel_futures=True)
        snapshots.remove(self.run.uri, self.plan.launch_id, self.rank)

    def _persist(self, pending: _Pending, commit_fields: dict | None) -> None:
        """The writer thread: write the staged state to local disk, hash it, upload it into the
        named folder, then commit. Under fsdp every rank's file list reaches rank 0 through a
        gather that each rank joins only after its own upload: metadata.json is written when
        every rank's shards are in storage (trainers/commit.py)."""
        name = pending.name
        dest = self.run.child(name)
        started = time.time()
        try:
            write_s = pending.write()
            written = time.time()
            if self._abandoned:
                raise Abandoned(name)
            files = manifest.digest_folder(pending.folder)
            existing = manifest.check(dest)
            stored = None
            if existing.ok and existing.metadata.get("launch_id") == self.plan.launch_id:
                # A retry regenerated a checkpoint this launch already committed: same state, keep it.
                self.say(f"☁️  {name} is already in storage from this run; keeping it")
            else:
                stored = transfer.upload_files(pending.folder, dest, self.plan.launch_id, self.fence)
        finally:
            shutil.rmtree(pending.folder, ignore_errors=True)
        report = {"rank": self.rank, "world_size": self.world, "files": files, "write_s": write_s,
                  "upload_s": time.time() - written, "stored": stored}
        if commit_fields is not None:
            report["commit"] = commit_fields
        reports = [report]
        if self.strategy.sharded:
            reports = [None] * self.world
            dist.all_gather_object(reports, report, group=self.group)
        if self.committer is None:
            return
        with self._gate:
            if self._abandoned:  # an upload that finished after the stop gave up on it
                raise Abandoned(name)
            self._committing = name
            try:
                if self.committer.commit_and_retain(name, reports):
                    _record_committed(self.plan.launch_id, name)
            finally:
                self._committing = None
        if self.tracking is not None:  # rank 0: the trackers' files travel with the checkpoint
            self.tracking.log({"checkpoint/upload_s": time.time() - started}, CheckpointName.parse(name).step)
            self.tracking.sync()  # best effort: a failed copy warns and is retried at the next one


def _record_committed(launch_id: str, name: str) -> None:
    """So the driver's exits do not name it. Best effort: the driver confirms in storage what
    it names, so a lost record costs a look, never a wrong line."""
    try:
        stopping.record_committed(launch_id, name)
    except Exception:
        pass
