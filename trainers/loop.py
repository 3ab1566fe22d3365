"""The train loop each Ray worker runs. Reads like the guide:

set up Accelerate -> restore (if any) -> build the data stream from the cursor ->
for each step: train, log, validate, checkpoint -> finish.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from accelerate import Accelerator
from ray.train import Checkpoint, CheckpointUploadMode
from tqdm import tqdm

from configs.schema import Config, from_dict
from storage import checkpoint as ckpt
from storage import retention
from storage.location import Location, resolve
from storage.names import CheckpointName
from trainers import checkpointing
from trainers import source as sources
from trainers.data import DataIndex, EpochPlan, read_all
from trainers.ingest import DataOrderError, check_batch, tokens_of
from trainers.model import GPT
from trainers.state import TrainState


def train_loop(plan: dict) -> None:
    loop_started = time.time()
    cfg: Config = from_dict(Config, plan["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = _say if rank == 0 else (lambda *a, **k: None)

    # --- set up Accelerate, the model, the optimizer and the schedule -------------------
    if cfg.scaling.use_gpu:  # exact resume on GPU needs deterministic kernels (cuBLAS included)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        cpu=not cfg.scaling.use_gpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
    )
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    # Stepped by us, not prepared: Accelerate's scheduler wrapper steps once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    _seed_rank(cfg.train.seed, rank)  # each rank's own dropout stream
    state = TrainState()

    # --- restore ------------------------------------------------------------------------
    source = sources.choose(plan)  # the train dataset was built from the same choice
    if source is not None and source.retry:
        say(f"🔁 Restarted by Ray: resuming from this run's latest checkpoint {source.name} "
            f"(it wins over --resume on in-run retries)")
    if source is not None:
        state = _restore(source, plan, model, optimizer, scheduler, rank, world, say)
    model, optimizer = accelerator.prepare(model, optimizer)
    index = DataIndex.from_json(plan["data_index"])
    data = resolve(cfg.data.path)
    val_ids, val_tokens = read_all(data.fs, data.child("val").path) if cfg.train.val_every else (None, None)

    # --- build the data stream from the cursor --------------------------------------------
    # Ray Data deals this rank its slices of the global order from the cursor on, read once
    # across the cluster (trainers/ingest.py); every batch is checked against its position.
    G, A = cfg.train.global_batch_size, cfg.train.grad_accum_steps
    per_rank = G // world
    max_steps = plan["max_steps"]
    epoch_plan = EpochPlan.make(index, cfg.data.shuffle_seed, state.epoch)
    steps_per_epoch = epoch_plan.steps(G)
    say("\n📈 Starting optimized training loop...")
    if source is not None:
        say(f"🔄 Resuming training from step {state.step}, target: {max_steps}")
        say(f"🔄 Resuming epoch {state.epoch}: skipping {state.samples_in_epoch // G} batches")
    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_batches(batch_size=per_rank, batch_format="numpy", prefetch_batches=2))
    audit = _Audit(plan, rank)
    progress_initial = state.step
    bar = tqdm(total=max_steps, initial=state.step, desc="Training", unit="step",
               disable=rank != 0, mininterval=1.0, dynamic_ncols=False, ascii=True,
               file=sys.stdout)  # stdout keeps it in order with the log lines

    # --- for each step: train, log, validate, checkpoint ------------------------------------
    model.train()
    first_step_at = None
    notified = False  # one checkpoint per preemption notice; Ray restarts us after the node goes
    while state.step < max_steps:
        fetch_started = time.time()
        batch = next(batches, None)
        if batch is None:
            raise DataOrderError(f"rank {rank}: the train stream ended before step {state.step + 1}")
        check_batch(batch, rank, state.epoch, state.samples_in_epoch + rank * per_rank, per_rank)
        ids, tokens = batch["id"], tokens_of(batch)
        if state.step == progress_initial:
            first_batch_s = time.time() - fetch_started
        audit.trained(state, ids)
        loss = _train_step(accelerator, model, optimizer, cfg, tokens, A)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        state.samples_in_epoch += G
        if state.samples_in_epoch == steps_per_epoch * G:  # the checkpoint belongs to the next epoch
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            epoch_plan = EpochPlan.make(index, cfg.data.shuffle_seed, state.epoch)

        mean_loss = accelerator.reduce(loss.detach().float(), "mean").item()
        state.best_loss = min(state.best_loss, mean_loss)
        if state.step % cfg.train.log_every == 0:
            state.loss_history.append([state.step, mean_loss])
            state.lr_history.append([state.step, lr])
        if state.step == progress_initial + 1:
            first_step_at = time.time()
            say(f"⏱️  First step done at {first_step_at:.3f} (first batch read in {first_batch_s:.3f}s; "
                f"loop started at {loop_started:.3f})")
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

        last = state.step == max_steps
        if cfg.train.val_every and (state.step % cfg.train.val_every == 0 or last):
            val_loss = _validate(accelerator, model, val_tokens, cfg, rank, world)
            state.val_history.append([state.step, val_loss])
            state.best_val_loss = min(state.best_val_loss, val_loss)
        notice = _preemption_notice(cfg, state, notified)
        if notice is not None:
            notified = True
            say(f"\n⚠️  Preemption notice: node(s) {', '.join(n[:12] for n in notice.preempted_node_ids)} "
                f"(ranks {notice.preempted_ranks}) go away{_deadline(notice)}: saving a checkpoint now")
        if state.step % cfg.checkpoint.every == 0 or last or notice is not None:
            _save(plan, cfg, accelerator, model, optimizer, scheduler, state, epoch_plan,
                  progress_initial, rank, world, say, preempted=notice is not None)
        if notice is not None and not last:
            _hold_for_preemption(cfg, notice, say)

    # --- finish ---------------------------------------------------------------------------
    bar.close()
    trained = state.step - progress_initial
    if first_step_at is not None and trained > 1:
        rate = (trained - 1) / (time.time() - first_step_at)
        say(f"⏱️  Loop started at {loop_started:.3f}; {trained - 1} steps after the first at {rate:.3f} steps/s")
    say(f"🏁 Training finished at step {state.step}, epoch {state.epoch}; "
        f"best loss {state.best_loss:.4f}; progress started at step {progress_initial}")


def _preemption_notice(cfg: Config, state: TrainState, notified: bool):
    """Ray's notice that a node of this run is being preempted, or None.

    get_preemption_info() is a barrier: every rank calls it at the same steps.
    """
    every = cfg.checkpoint.preemption_check_every
    if not every or state.step % every:
        return None
    info = ray.train.get_preemption_info()
    return None if info is None or notified else info


def _hold_for_preemption(cfg: Config, info, say) -> None:
    """Every rank waits (they all got the same notice) until the node is gone, the deadline
    passes, or preemption_wait_s runs out: steps trained now would die with the node."""
    wait = cfg.checkpoint.preemption_wait_s
    if info.deadline_ms is not None:
        wait = min(wait, max(0.0, info.deadline_ms / 1000 - time.time()))
    if wait <= 0:
        return
    say(f"⏸️  Holding training up to {wait:.0f}s for the preemption (Ray restarts the run from "
        "the checkpoint once the node is gone)")
    time.sleep(wait)


def _deadline(info) -> str:
    if info.deadline_ms is None:
        return ""
    return f" in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f}s"


def _say(message: str) -> None:
    # Not print(): Ray Train patches print to log *and* tee to stdout, so lines showed twice.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _lr_lambda(cfg: Config):
    warmup, decay, floor = cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay:
            return floor
        progress = (step - warmup) / (decay - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _seed_rank(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 1000 + rank + 1)
    np.random.seed((seed * 1000 + rank + 1) % 2**32)


def _train_step(accelerator, model, optimizer, cfg: Config, tokens: np.ndarray, accum: int):
    device = accelerator.device
    batch = torch.from_numpy(tokens.astype(np.int64)).to(device)
    total = torch.zeros((), device=device)
    for micro in torch.chunk(batch, accum):
        with accelerator.accumulate(model):
            loss = model(micro[:, :-1], micro[:, 1:])
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach() / accum
    return total


@torch.no_grad()
def _validate(accelerator, model, val_tokens, cfg: Config, rank: int, world: int) -> float:
    model.eval()
    device, bs = accelerator.device, cfg.train.val_batch_size
    sums = torch.zeros(2, device=device)  # loss x samples, samples
    starts = list(range(0, len(val_tokens), bs))
    for lo in starts[rank::world]:  # each rank a share; the sum is the same on every rank
        batch = torch.from_numpy(val_tokens[lo:lo + bs].astype(np.int64)).to(device)
        loss = accelerator.unwrap_model(model)(batch[:, :-1], batch[:, 1:])
        sums += torch.stack([loss.float() * len(batch), torch.tensor(float(len(batch)), device=device)])
    sums = accelerator.reduce(sums, "sum")
    model.train()
    return (sums[0] / sums[1]).item()


def _restore(source, plan, model, optimizer, scheduler, rank, world, say) -> TrainState:
    loc, name = source.loc, source.name
    say(f"🔄 Attempting to resume training from checkpoint: {name}")
    started = time.time()
    if loc.is_remote:
        say("📥 Downloading checkpoint from GCS...")
    scratch = tempfile.mkdtemp(prefix="resume-")
    fetch_started = time.time()
    # Each rank downloads what it loads: everything but the other ranks' RNG states.
    folder = ckpt.fetch(loc, scratch, wanted=lambda rel: not rel.startswith("rng_state_rank")
                        or rel == ckpt.rng_file(rank))
    fetched = time.time()
    metadata = checkpointing.load_metadata(folder)
    checkpointing.load_model(folder, model)
    checkpointing.load_optimizer(folder, optimizer)
    checkpointing.load_scheduler(folder, scheduler)
    rng = os.path.join(folder, ckpt.rng_file(rank))
    if metadata["world_size"] == world and os.path.exists(rng):
        checkpointing.restore_rng(rng)
    else:
        say(f"⚠️  Checkpoint was written by {metadata['world_size']} workers, this run has {world}: "
            "data order and cursor carry over; dropout streams start fresh")
    metrics = checkpointing.load_metrics(folder)
    state = TrainState.from_checkpoint(metadata, metrics)
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
        f"(fetch {fetched - fetch_started:.2f}s, state load {time.time() - fetched:.2f}s)")
    shutil.rmtree(scratch, ignore_errors=True)  # a downloaded copy; a local checkpoint stays put
    return state


def _save(plan, cfg, accelerator, model, optimizer, scheduler, state, epoch_plan,
          progress_initial, rank, world, say, preempted: bool = False) -> None:
    name = CheckpointName(epoch=state.epoch, step=state.step,
                          files=epoch_plan.files_done(state.samples_in_epoch))
    started = time.time()
    blob = checkpointing.capture_rng()
    blobs = [None] * world
    if world > 1:
        dist.all_gather_object(blobs, blob)
    else:
        blobs = [blob]
    metrics = {
        "step": state.step, "epoch": state.epoch,
        "loss": state.loss_history[-1][1] if state.loss_history else None,
        "val_loss": state.val_history[-1][1] if state.val_history else None,
        "best_loss": state.best_loss, "progress_initial": progress_initial,
        "checkpoint": str(name),
    }
    mode = CheckpointUploadMode.ASYNC if cfg.checkpoint.upload == "async" else CheckpointUploadMode.SYNC
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=str(name),
                         checkpoint_upload_mode=mode)
        return
    folder = tempfile.mkdtemp(prefix=f"{name}-")  # must outlive report(): the upload is async
    metadata = {
        "name": str(name), "run_name": plan["run_name"], "launch_id": plan["launch_id"],
        "created_at": ckpt.now_iso(), "files_processed": name.files, "world_size": world,
        "global_batch_size": cfg.train.global_batch_size, "config": plan["config"],
        "data_index": plan["data_index"], "resumed_from": plan.get("resume"),
        "train_loss": metrics["loss"], "val_loss": (state.val_history[-1][1] if state.val_history
                                                   and state.val_history[-1][0] == state.step else None),
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "preempted": preempted,  # saved because Ray announced a node's preemption
    }
    to_commit = checkpointing.save_local(folder, accelerator.unwrap_model(model), optimizer,
                                         scheduler, blobs, state, metadata)
    snapshot_s = time.time() - started
    size_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    say(f"\n💾 Saved {name} locally in {snapshot_s:.2f}s (Checkpoint size {size_mb:.1f} MB); uploading "
        f"{'in the background' if mode is CheckpointUploadMode.ASYNC else 'now'}")
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                     checkpoint_dir_name=str(name), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True,
                     checkpoint_upload_fn=_upload_fn(plan, cfg, to_commit))
    say(f"⏱️  Training blocked {time.time() - started:.3f}s for {name} ({mode.value.lower()} upload)")


def _upload_fn(plan: dict, cfg: Config, to_commit: dict):
    run_uri = plan["run_uri"]
    resumed = plan.get("resume") or {}
    policy = retention.Policy(
        keep_last=cfg.checkpoint.keep_last, keep_best=cfg.checkpoint.keep_best,
        protect=frozenset([resumed["name"]]) if resumed.get("uri", "").startswith(run_uri) else frozenset(),
    )

    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        storage = ray.train.get_context().get_storage()
        dest = Location(storage.storage_filesystem,
                        storage.experiment_fs_path.rstrip("/") + "/" + dir_name,
                        run_uri.rstrip("/") + "/" + dir_name)
        started = time.time()
        existing = ckpt.check(dest)
        if existing.ok and existing.metadata.get("launch_id") == plan["launch_id"]:
            # A retry regenerated a checkpoint this launch already wrote: same state, keep it.
            _say(f"☁️  {dir_name} is already in storage from this run; keeping it")
            return Checkpoint(path=dest.path, filesystem=dest.fs)
        ckpt.write_metadata(checkpoint.path, to_commit)  # hashes: here, off the training thread
        ckpt.upload(checkpoint.path, dest)
        _say(f"☁️  Uploaded {dir_name} to {dest.uri} in {time.time() - started:.2f}s")
        run = Location(dest.fs, storage.experiment_fs_path, run_uri)
        for name in retention.apply(run, policy, log=_say):  # one rank deletes: this one
            _say(f"🧹 Retention deleted {name}")
        return Checkpoint(path=dest.path, filesystem=dest.fs)

    return upload


class _Audit:
    """Optional audit trail (--audit-dir): per rank, one JSON line per trained batch, so
    exactly-once is proven from sample ids. The read tasks log every file and row group they
    open beside it (reads.jsonl, trainers/ingest.py): skip-without-reading and read-once."""

    def __init__(self, plan: dict, rank: int):
        self.path = None
        folder = plan.get("audit_dir")
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.path = os.path.join(folder, f"rank{rank}.jsonl")

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def trained(self, state: TrainState, ids: np.ndarray) -> None:
        if self.path is not None:
            self._write({"event": "batch", "step": state.step + 1, "epoch": state.epoch,
                         "ids": [int(i) for i in ids], "pid": os.getpid()})
