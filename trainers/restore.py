"""Restoring a checkpoint on a worker: which one an attempt starts from (trainers/source.py's
choice), fetching what this rank loads, and loading it into the model, the optimizer, the
scheduler and the RNGs (trainers/state_files.py), with the guide's lines."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch

from storage import manifest, transfer
from trainers import source as sources
from trainers.launch_plan import LaunchPlan
from trainers.state import TrainState
from trainers.state_files import load_model_and_optimizer, read_json, restore_rng


def choose_source(plan: LaunchPlan, say: Callable[[str], None]) -> sources.Source | None:
    """--resume on the first attempt, this launch's newest checkpoint on in-run retries; the
    train dataset was built from the same choice (trainers/source.py)."""
    source = sources.choose(plan)
    if source is not None and source.retry:
        say(f"🔁 Restarted by Ray: resuming from this run's latest checkpoint {source.name} "
            f"(it wins over --resume on in-run retries)")
    return source


def restore(source: sources.Source, strategy, scheduler, rank: int, world: int,
            say: Callable[[str], None]) -> TrainState:
    name = source.name
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

        def wanted(rel: str) -> bool:
            if rel.endswith(".distcp"):
                return False  # fetched once DCP knows which this rank reads
            return not rel.startswith("rng_state_rank") or rel == manifest.rng_file(rank)

        folder = transfer.fetch(source.loc, scratch, wanted=wanted, verify=verify)
        metadata = read_json(os.path.join(folder, manifest.METADATA))
        files = metadata["files"]

        def fetch_shards(rels: list[str]) -> None:
            transfer.fetch_files(source.loc, folder, rels, files, verify)

        fetched = time.time()
        written_by = metadata.get("strategy", "ddp")
        if written_by != strategy.name:
            say(f"🔀 {name} was written under {written_by}; loading it into {strategy.name}")
        load_model_and_optimizer(strategy.model, strategy.optimizer, strategy.sharded, folder, metadata,
                                 fetch_shards)
        scheduler.load_state_dict(torch.load(os.path.join(folder, manifest.SCHEDULER), weights_only=True))
        rng = os.path.join(folder, manifest.rng_file(rank))
        if metadata["world_size"] == world and os.path.exists(rng):
            restore_rng(rng)
        else:
            say(f"⚠️  Checkpoint was written by {metadata['world_size']} workers, this run has "
                f"{world}: data order and cursor carry over; dropout streams start fresh; the state "
                f"loads exactly ({'resharded' if strategy.sharded else 'whole'}), the steps after it "
                f"are close to, not bitwise equal to, a run on {metadata['world_size']} workers "
                "(reductions split differently)")
        state = TrainState.from_checkpoint(metadata, read_json(os.path.join(folder, manifest.METRICS)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a downloaded copy; a local one stays put
    if (state.step, state.epoch, state.samples_in_epoch) != (source.step, source.epoch,
                                                             source.samples_in_epoch):
        raise manifest.CheckpointError(f"{name} changed while resuming (step {source.step} when "
                                       f"chosen, {state.step} when loaded): not resuming from it")
    state.resumes.append([state.step, name])
    say(f"✅ Resumed from checkpoint: {name}")
    say(f"   Starting from Step: {state.step + 1}, Epoch: {state.epoch}")
    say(f"   Best loss restored: {state.best_loss:.4f}")
    say(f"   Loss history entries: {len(state.loss_history)}")
    say(f"   Training will continue from global step {state.step + 1}")
    say(f"✅ Restored scheduler state (last LR {scheduler.get_last_lr()[0]:.6g})")
    say(f"✅ Loaded training metrics ({len(state.loss_history)} loss, {len(state.lr_history)} LR, "
        f"{len(state.val_history)} validation entries)")
    say(f"   Checkpoint verified and loaded in {time.time() - started:.2f}s "
        f"(fetch {fetched - started:.2f}s, state load {time.time() - fetched:.2f}s)")
    return state
