"""Checkpointing on the workers, in one place: which checkpoint an attempt starts from, restoring
it, saving one (stage in memory, background write, upload and commit, Ray report).

What a checkpoint holds, one mapping of stateful parts (as torchtitan's CheckpointManager). The
strategy (trainers/parallel.py) decides how the model and optimizer are written, not what a
checkpoint is:

    ======================  ===========================================  ==================
    file                    what                                         loaded with
    ======================  ===========================================  ==================
    model.safetensors       ddp: model weights (rank 0 writes)           safetensors
    optimizer.pt            ddp: AdamW state (rank 0 writes)             torch weights_only
    .metadata               fsdp: DCP's index of every rank's shards     allow-listed unpickler
    __{r}_0.distcp          fsdp: rank r's shards of model and AdamW     torch weights_only
    scheduler_state.pt      LR scheduler state                           torch weights_only
    rng_state_rank{r}.pt    torch / numpy / python RNG of rank r         torch weights_only
    training_metrics.json   loss, LR and validation histories, resumes   json
    metadata.json           progress, data cursor, config, manifest      json (written last)
    ======================  ===========================================  ==================

Nothing is unpickled on load: a checkpoint from a stranger cannot run code. The file names are
storage/manifest.py's: its completeness check requires every file loaded here.

A save blocks training only to stage the state in CPU memory (a copy); the checkpointer's writer
thread serializes it to local disk, hashes it, uploads it and (rank 0, once every writer's
files are in storage) commits it. One staged copy at a time: a save waits for the previous one
to be written to local disk before it stages (bounded memory: one extra copy of this rank's
share of model and AdamW state, while the checkpoint before it uploads). Ray's report registers
each checkpoint (ASYNC: in its upload thread, waiting for the writer; SYNC: in the loop).
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from storage import manifest, transfer
from storage.fence import Fence
from storage.location import resolve
from storage.names import CheckpointName
from trainers import sharded, snapshots, stopping
from trainers import source as sources
from trainers.commit import Committer
from trainers.launch_plan import LaunchPlan
from trainers.state import TrainState


class _Full:
    """ddp: rank 0 writes the whole model (safetensors) and optimizer (torch.save of tensors
    and numbers), index-keyed as AdamW's own state_dict."""

    writers = frozenset([0])

    def __init__(self, model, optimizer, group):
        self.model, self.optimizer = model, optimizer

    def stage(self) -> dict:
        return {"model": _cpu_copy(self.model.state_dict()), "optim": _cpu_copy(self.optimizer.state_dict())}

    def write(self, staged: dict, folder: str) -> None:
        save_file({k: v.contiguous() for k, v in staged["model"].items()}, os.path.join(folder, manifest.MODEL))
        torch.save(staged["optim"], os.path.join(folder, manifest.OPTIMIZER))


class _Sharded:
    """fsdp: every rank writes its own shards of model and AdamW state through DCP, keyed by
    parameter name; rank 0 adds .metadata after every rank's data."""

    def __init__(self, model, optimizer, group):
        self.model, self.optimizer, self.group = model, optimizer, group
        self.writers = frozenset(range(dist.get_world_size()))
        self.stager = sharded.Stager()

    def stage(self) -> dict:
        msd, osd = get_state_dict(self.model, self.optimizer)
        return self.stager.stage({"model": msd, "optim": osd})

    def write(self, staged: dict, folder: str) -> None:
        sharded.save(staged, folder, self.group)  # collective over self.group: every rank at once


def _cpu_copy(tree):
    """tree with every tensor copied to CPU memory, containers as they were (AdamW's betas stay
    a tuple: torch.save keeps what load_state_dict gets back)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_copy(v) for v in tree)
    return tree


def _by_name(optim_state: dict, names: list[str]) -> dict:
    """An optimizer state_dict keyed by parameter index (optimizer.pt) -> keyed by parameter name
    (what set_state_dict takes): index i is the i-th of model.named_parameters()."""
    return {"state": {names[i]: s for i, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}


def load_model_and_optimizer(model, optimizer, into_shards: bool, folder: str, metadata: dict,
                             fetch_shards: Callable[[list[str]], None] | None = None) -> None:
    """A checkpoint's model and optimizer state into this run's, whichever strategy wrote it: a
    sharded one through DCP (it reshards to this world size, and to plain tensors alike); a
    whole one directly (ddp) or spread over the shards (fsdp: each rank keeps its part)."""
    tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in optimizer.param_groups]
    if metadata.get("strategy", "ddp") == "fsdp":
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        try:
            sharded.load(state, folder, allowed=set(metadata["files"]), before_read=fetch_shards)
        except sharded.UnsafeCheckpoint as e:
            raise manifest.CheckpointError(f"checkpoint {metadata.get('name')} refused: {e}; nothing of it "
                                           "was run") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        weights = load_file(os.path.join(folder, manifest.MODEL))
        optim = torch.load(os.path.join(folder, manifest.OPTIMIZER), weights_only=True)
        if not into_shards:
            model.load_state_dict(weights)
            optimizer.load_state_dict(optim)
            return
        names = [n for n, _ in model.named_parameters()]  # FSDP2 keeps the parameter names
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=_by_name(optim, names),
                       options=StateDictOptions(full_state_dict=True))
    for group, keys in zip(optimizer.param_groups, tuples):  # set_state_dict gives betas back as a list
        group.update({k: tuple(group[k]) for k in keys if isinstance(group.get(k), list)})


class _Pending:
    """One checkpoint staged in memory until the checkpointer's writer thread has written it to
    local disk (the staged buffers may then be reused); the same thread then uploads and (rank 0)
    commits it."""

    def __init__(self, fmt, staged: dict | None, small: dict[str, bytes], folder: str):
        self.fmt, self.staged, self.small, self.folder = fmt, staged, small, folder
        self.written = threading.Event()
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
        self.format = (_Sharded if strategy.sharded else _Full)(self.model, self.optimizer, group)
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
        self.pending: list[tuple[str, object]] = []  # (name, future) saved, not yet committed
        self.saved: list[str] = []  # every name this attempt saved (rank 0 tells the driver)
        self.snapshots = snapshots.rank_folder(self.run.uri, plan.launch_id, rank)
        snapshots.clear_earlier(self.run.uri, plan.launch_id)  # a killed launch's leftovers
        os.makedirs(self.snapshots, exist_ok=True)

    # --- which checkpoint ------------------------------------------------------------------

    def choose_source(self) -> sources.Source | None:
        """--resume on the first attempt, this launch's newest checkpoint on in-run retries;
        the train dataset was built from the same choice (trainers/source.py)."""
        source = sources.choose(self.plan)
        if source is not None and source.retry:
            self.say(f"🔁 Restarted by Ray: resuming from this run's latest checkpoint {source.name} "
                     f"(it wins over --resume on in-run retries)")
        return source

    # --- restore ---------------------------------------------------------------------------

    def restore(self, source: sources.Source) -> TrainState:
        say, name = self.say, source.name
        say(f"🔄 Attempting to resume training from checkpoint: {name}")
        started = time.time()
        if source.loc.is_gcs:
            say("📥 Downloading checkpoint from GCS...")
        scratch = tempfile.mkdtemp(prefix="resume-")
        try:
            # Each rank downloads what it loads: not the other ranks' RNG states, and of a sharded
            # checkpoint only the shard files its part of the state lives in (fetched when DCP
            # has planned the read). Hashes: the driver verified --resume (a local one is loaded
            # as it stands); a download, or a retry's own checkpoint, is verified here.
            verify = source.retry or source.loc.is_gcs
            folder = transfer.fetch(source.loc, scratch, wanted=self._wanted, verify=verify)
            metadata = _read_json(os.path.join(folder, manifest.METADATA))
            files = metadata["files"]

            def fetch_shards(rels: list[str]) -> None:
                transfer.fetch_files(source.loc, folder, rels, files, verify)

            fetched = time.time()
            written_by = metadata.get("strategy", "ddp")
            if written_by != self.strategy.name:
                say(f"🔀 {name} was written under {written_by}; loading it into {self.strategy.name}")
            load_model_and_optimizer(self.model, self.optimizer, self.strategy.sharded, folder, metadata,
                                     fetch_shards)
            self.scheduler.load_state_dict(torch.load(os.path.join(folder, manifest.SCHEDULER), weights_only=True))
            rng = os.path.join(folder, manifest.rng_file(self.rank))
            if metadata["world_size"] == self.world and os.path.exists(rng):
                _restore_rng(rng)
            else:
                say(f"⚠️  Checkpoint was written by {metadata['world_size']} workers, this run has "
                    f"{self.world}: data order and cursor carry over; dropout streams start fresh; the state "
                    f"loads exactly ({'resharded' if self.strategy.sharded else 'whole'}), the steps after it "
                    f"are close to, not bitwise equal to, a run on {metadata['world_size']} workers "
                    "(reductions split differently)")
            state = TrainState.from_checkpoint(metadata, _read_json(os.path.join(folder, manifest.METRICS)))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # a downloaded copy; a local one stays put
        if (state.step, state.epoch, state.samples_in_epoch) != (source.step, source.epoch,
                                                                 source.samples_in_epoch):
            raise manifest.CheckpointError(f"{name} changed while resuming (step {source.step} when "
                                           f"chosen, {state.step} when loaded): not resuming from it")
        state.resumes.append([state.step, name])
        self.progress_initial = state.step
        say(f"✅ Resumed from checkpoint: {name}")
        say(f"   Starting from Step: {state.step + 1}, Epoch: {state.epoch}")
        say(f"   Best loss restored: {state.best_loss:.4f}")
        say(f"   Loss history entries: {len(state.loss_history)}")
        say(f"   Training will continue from global step {state.step + 1}")
        say(f"✅ Restored scheduler state (last LR {self.scheduler.get_last_lr()[0]:.6g})")
        say(f"✅ Loaded training metrics ({len(state.loss_history)} loss, {len(state.lr_history)} LR, "
            f"{len(state.val_history)} validation entries)")
        say(f"   Checkpoint verified and loaded in {time.time() - started:.2f}s "
            f"(fetch {fetched - started:.2f}s, state load {time.time() - fetched:.2f}s)")
        return state

    def _wanted(self, rel: str) -> bool:
        if rel.endswith(".distcp"):
            return False  # fetched once DCP knows which this rank reads
        return not rel.startswith("rng_state_rank") or rel == manifest.rng_file(self.rank)

    # --- save ------------------------------------------------------------------------------

    def save(self, state: TrainState, files_done: int, preempted: bool = False) -> None:
        """Every rank calls this at the same step (a collective). The writers (rank 0 under ddp,
        every rank under fsdp) stage their state in memory; their writer threads write, hash,
        upload and commit it (_persist); Ray's report registers it."""
        name = CheckpointName(epoch=state.epoch, step=state.step, files=files_done)
        started = time.time()
        if self.in_flight is not None:  # one staged copy at a time (bounded memory)
            self.in_flight.written.wait()
        self._bound_backlog(name)
        waited = time.time() - started
        blobs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(blobs, _capture_rng())
        else:
            blobs = [_capture_rng()]
        writes = self.rank in self.format.writers
        staged = self.format.stage() if writes else None
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
        pending = self.in_flight = _Pending(self.format, staged, small, folder)
        pending.future = self.writer.submit(self._persist, pending, str(name), commit_fields)
        self.pending.append((str(name), pending.future))
        self.saved.append(str(name))
        if self.rank == 0:
            stopping.record_saved(self.plan.launch_id, self.saved)
        staged_mb = sum(v.numel() * v.element_size() for v in _tensors(staged)) / 2**20
        self.say(f"\n💾 Staged {name} in memory in {time.time() - started:.2f}s ({staged_mb:.1f} MB on "
                 f"rank 0{', waited ' + format(waited, '.2f') + 's for the previous one' if waited > 0.01 else ''}); "
                 f"writing and uploading {'in the background' if mode is CheckpointUploadMode.ASYNC else 'now'} "
                 f"({len(self.unfinished())} of checkpoint.max_pending {self.cfg.checkpoint.max_pending} pending)")
        dest = self.run.child(str(name))

        def registered(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
            """Ray's upload step (its upload thread under ASYNC, this thread under SYNC): the
            writer thread has done the work; Ray records the committed folder."""
            pending.future.result()  # the writer's error, if any, is raised here: Ray fails the run
            return Checkpoint(path=dest.path, filesystem=dest.fs)

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=str(name), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=registered)
        blocked = time.time() - started
        self.say(f"⏱️  Training blocked {blocked:.3f}s for {name} ({mode.value.lower()} upload)")
        if self.tracking is not None:
            self.tracking.log({"checkpoint/stall_s": blocked}, state.step)

    def _bound_backlog(self, name: CheckpointName) -> None:
        """At most checkpoint.max_pending checkpoints saved but not committed: wait for the oldest."""
        self.pending = [(n, f) for n, f in self.pending if not f.done() or f.exception() is not None]
        limit = self.cfg.checkpoint.max_pending
        if len([f for _, f in self.pending if not f.done()]) < limit:
            return
        started = time.time()
        oldest, future = next((n, f) for n, f in self.pending if not f.done())
        self.say(f"⏳ {limit} checkpoints saved and not yet committed (checkpoint.max_pending): "
                 f"{name} waits for {oldest}")
        future.result()
        self.say(f"⏳ {oldest} committed; {name} waited {time.time() - started:.2f}s")

    def unfinished(self) -> list[str]:
        return [n for n, f in self.pending if not f.done()]

    def drain(self, timeout_s: float | None, show: bool = False) -> list[str]:
        """Wait until every saved checkpoint is committed, up to timeout_s; the names still
        unfinished after it (errors are raised, as Ray's report would)."""
        from tqdm import tqdm

        deadline = None if timeout_s is None else time.time() + timeout_s
        todo = [(n, f) for n, f in self.pending]
        bar = tqdm(total=len(todo), desc="Finishing checkpoints", unit="ckpt", ascii=True,
                   disable=not show or not todo, file=sys.stdout, dynamic_ncols=False)
        for _, future in todo:
            left = None if deadline is None else max(0.0, deadline - time.time())
            try:
                future.result(timeout=left)
            except TimeoutError:
                break
            bar.update(1)
        bar.close()
        return self.unfinished()

    def close(self) -> None:
        """The end of the attempt: no new work; this launch's snapshot folder goes (the writer
        removes each snapshot once uploaded; one still being uploaded after a drain that timed
        out fails and stays incomplete in storage, as the stop said)."""
        self.writer.shutdown(wait=False, cancel_futures=True)
        snapshots.remove(self.run.uri, self.plan.launch_id, self.rank)

    def _persist(self, pending: _Pending, name: str, commit_fields: dict | None) -> None:
        """The writer thread: write the staged state to local disk, hash it, upload it into the
        named folder, then commit. Under fsdp every rank's file list reaches rank 0 through a
        gather that each rank joins only after its own upload: metadata.json is written when
        every rank's shards are in storage (trainers/commit.py)."""
        dest = self.run.child(name)
        started = time.time()
        try:
            write_s = pending.write()
            written = time.time()
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
        if self.committer is not None:
            self.committer.commit_and_retain(name, reports)
            if self.tracking is not None:  # rank 0: the trackers' files travel with the checkpoint
                self.tracking.log({"checkpoint/upload_s": time.time() - started}, CheckpointName.parse(name).step)
                self.tracking.sync()


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree.to_local() if hasattr(tree, "to_local") else tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _capture_rng() -> bytes:
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _restore_rng(path: str) -> None:
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_rank(seed: int, rank: int) -> None:
    """Each rank's own dropout stream (the model's init is seeded identically on every rank)."""
    torch.manual_seed(seed * 1000 + rank + 1)
    np.random.seed((seed * 1000 + rank + 1) % 2**32)
