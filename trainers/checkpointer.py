"""Checkpointing on the workers, in one place: which checkpoint an attempt starts from, restoring
it, saving one (local snapshot, Ray report, background upload, commit, retention).

What a checkpoint holds, one mapping of stateful parts (as torchtitan's CheckpointManager):

    ======================  ===========================================  ==================
    file                    what                                         loaded with
    ======================  ===========================================  ==================
    model.safetensors       model weights (unwrapped)                    safetensors
    optimizer.pt            AdamW state                                  torch weights_only
    scheduler_state.pt      LR scheduler state                           torch weights_only
    rng_state_rank{r}.pt    torch / numpy / python RNG of rank r         torch weights_only
    training_metrics.json   loss, LR and validation histories, resumes   json
    metadata.json           progress, data cursor, config, manifest      json (written last)
    ======================  ===========================================  ==================

Nothing is unpickled on load: a checkpoint from a stranger cannot run code. The file names are
storage/manifest.py's: its completeness check requires every file loaded here.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode
from safetensors.torch import load_file, save_file

from storage import manifest, retention, transfer
from storage.location import resolve
from storage.names import CheckpointName
from trainers import source as sources
from trainers.launch_plan import LaunchPlan
from trainers.logs import say as _say
from trainers.state import TrainState


class _Weights:
    """The model's weights as safetensors (no pickle)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def save(self, path: str) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}, path)

    def load(self, path: str) -> None:
        self.model.load_state_dict(load_file(path))


class _TorchState:
    """Anything with state_dict()/load_state_dict() of tensors and numbers (weights_only)."""

    def __init__(self, obj):
        self.obj = obj

    def save(self, path: str) -> None:
        torch.save(self.obj.state_dict(), path)

    def load(self, path: str) -> None:
        self.obj.load_state_dict(torch.load(path, weights_only=True))


class Checkpointer:
    def __init__(self, plan: LaunchPlan, model: torch.nn.Module, optimizer, scheduler, rank: int,
                 world: int, say: Callable[[str], None]):
        self.plan, self.cfg = plan, plan.config
        self.rank, self.world, self.say = rank, world, say
        self.model = model  # unwrapped: saved and loaded without DDP's prefixes
        self.scheduler = scheduler
        self.states = {manifest.MODEL: _Weights(model), manifest.OPTIMIZER: _TorchState(optimizer),
                       manifest.SCHEDULER: _TorchState(scheduler)}
        self.run = resolve(plan.run_uri)
        self.progress_initial = 0
        resumed = plan.resume
        self.retention = retention.Policy(
            keep_last=self.cfg.checkpoint.keep_last, keep_best=self.cfg.checkpoint.keep_best,
            protect=frozenset([resumed.name]) if resumed and resumed.uri.startswith(plan.run_uri) else frozenset(),
        )

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
            # Each rank downloads what it loads: everything but the other ranks' RNG states.
            # Hashes: the driver verified --resume (a local one is loaded as it stands); a
            # download, or a retry's own checkpoint, is verified here.
            folder = transfer.fetch(source.loc, scratch, wanted=self._wanted,
                                    verify=source.retry or source.loc.is_gcs)
            fetched = time.time()
            metadata = _read_json(os.path.join(folder, manifest.METADATA))
            for file, part in self.states.items():
                part.load(os.path.join(folder, file))
            rng = os.path.join(folder, manifest.rng_file(self.rank))
            if metadata["world_size"] == self.world and os.path.exists(rng):
                _restore_rng(rng)
            else:
                say(f"⚠️  Checkpoint was written by {metadata['world_size']} workers, this run has "
                    f"{self.world}: data order and cursor carry over; dropout streams start fresh")
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
        return not rel.startswith("rng_state_rank") or rel == manifest.rng_file(self.rank)

    # --- save ------------------------------------------------------------------------------

    def save(self, state: TrainState, files_done: int, preempted: bool = False) -> None:
        """Every rank calls this at the same step (a collective): rank 0 writes the snapshot
        and reports it; Ray uploads it in the background through _upload."""
        name = CheckpointName(epoch=state.epoch, step=state.step, files=files_done)
        started = time.time()
        blobs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(blobs, _capture_rng())
        else:
            blobs = [_capture_rng()]
        last_val = state.val_history[-1] if state.val_history else None
        metrics = {
            "step": state.step, "epoch": state.epoch,
            "loss": state.loss_history[-1][1] if state.loss_history else None,
            "val_loss": last_val[1] if last_val else None,
            "best_loss": state.best_loss, "progress_initial": self.progress_initial,
            "checkpoint": str(name),
        }
        mode = (CheckpointUploadMode.ASYNC if self.cfg.checkpoint.upload == "async"
                else CheckpointUploadMode.SYNC)
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=str(name),
                             checkpoint_upload_mode=mode)
            return
        folder = tempfile.mkdtemp(prefix=f"{name}-")  # must outlive report(): the upload is async
        try:
            for file, part in self.states.items():
                part.save(os.path.join(folder, file))
            for rank, blob in enumerate(blobs):
                with open(os.path.join(folder, manifest.rng_file(rank)), "wb") as f:
                    f.write(blob)
            with open(os.path.join(folder, manifest.METRICS), "w") as f:
                json.dump(state.metrics_dict(), f)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        to_commit = {
            "name": str(name), "run_name": self.cfg.run_name, "launch_id": self.plan.launch_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files_processed": name.files, "world_size": self.world,
            "global_batch_size": self.cfg.train.global_batch_size, "config": asdict(self.cfg),
            "data_index": self.plan.data_index.to_json(),
            "resumed_from": asdict(self.plan.resume) if self.plan.resume else None,
            "train_loss": metrics["loss"],
            "val_loss": last_val[1] if last_val and last_val[0] == state.step else None,
            "versions": {"torch": torch.__version__, "ray": ray.__version__},
            "preempted": preempted,  # saved because Ray announced a node's preemption
            **state.progress_dict(),
        }
        size_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        self.say(f"\n💾 Saved {name} locally in {time.time() - started:.2f}s (Checkpoint size "
                 f"{size_mb:.1f} MB); uploading "
                 f"{'in the background' if mode is CheckpointUploadMode.ASYNC else 'now'}")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=str(name), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=self._upload_fn(to_commit))
        self.say(f"⏱️  Training blocked {time.time() - started:.3f}s for {name} ({mode.value.lower()} upload)")

    def _upload_fn(self, to_commit: dict):
        launch_id, run, policy = self.plan.launch_id, self.run, self.retention

        def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
            """Runs in Ray's upload thread: hash, copy the data files, metadata.json last,
            then retention (one rank deletes: this one)."""
            dest = run.child(dir_name)
            started = time.time()
            try:
                existing = manifest.check(dest)
                if existing.ok and existing.metadata.get("launch_id") == launch_id:
                    # A retry regenerated a checkpoint this launch already wrote: same state, keep it.
                    _say(f"☁️  {dir_name} is already in storage from this run; keeping it")
                    return Checkpoint(path=dest.path, filesystem=dest.fs)
                manifest.write_metadata(checkpoint.path, to_commit)  # hashes: here, off the training thread
                transfer.upload(checkpoint.path, dest)
            except BaseException:
                shutil.rmtree(checkpoint.path, ignore_errors=True)  # Ray deletes it only on success
                raise
            _say(f"☁️  Uploaded {dir_name} to {dest.uri} in {time.time() - started:.2f}s")
            for name in retention.apply(run, policy, log=_say):
                _say(f"🧹 Retention deleted {name}")
            return Checkpoint(path=dest.path, filesystem=dest.fs)

        return upload


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
