"""The train loop each Ray worker runs. Reads like the guide:

set up the strategy (ddp or fsdp) -> restore (if any) -> build the data stream from the cursor ->
for each step: train, log, validate, checkpoint -> finish.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import ray.train
import torch
from tqdm import tqdm

from configs.schema import Config
from data.index import read_all
from data.order import SampleOrder, shuffle_window
from data.stream import DataOrderError, check_batch, tokens_of
from storage.location import resolve
from storage.names import CheckpointName
from trainers import elastic, init_weights, parallel, stopping, tracking
from trainers.audit import Audit
from trainers.checkpointer import Checkpointer, seed_rank
from trainers.launch_plan import LaunchPlan
from trainers.logs import quiet_ray
from trainers.logs import say as _say
from trainers.model import build_model
from trainers.preemption import PreemptionWatch
from trainers.schedule import lr_factor
from trainers.state import TrainState


def train_loop(plan: LaunchPlan) -> None:
    loop_started = time.time()
    cfg = plan.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = _say if rank == 0 else (lambda *a, **k: None)
    quiet_ray(plan.verbose)

    # --- set up the strategy (Accelerate's DDP, or FSDP2), the model, the optimizer, the schedule
    if cfg.scaling.use_gpu:  # exact resume on GPU needs deterministic kernels (cuBLAS included)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Ray Data's pipeline starts cold (seconds): it reads the first batch while the model is
    # built and restored. The stream was built from the same checkpoint choice (trainers/source.py).
    batches = _Stream(ray.train.get_dataset_shard("train"), cfg.train.global_batch_size // world)
    run = resolve(plan.run_uri)
    # train.strategy: ddp or fsdp (trainers/parallel.py); its Accelerator holds the trackers
    strategy = parallel.make(cfg, world, tracking.project_dir(run, plan.launch_id))
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (fsdp then keeps its shard)
    model, optimizer = strategy.build(build_model(cfg.model))  # model.factory: the GPT by default
    # Stepped by us, not prepared: Accelerate's scheduler wrapper steps once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    seed_rank(cfg.train.seed, rank)
    checkpointer = Checkpointer(plan, strategy, scheduler, rank, world, say)
    if strategy.sharded:
        say(f"🧩 fsdp: {strategy.blocks} blocks and the root sharded over {world} workers; every rank "
            "writes its own checkpoint shards")
    if strategy.recomputed:
        say(f"♻️  Activation checkpointing: {strategy.recomputed} blocks recompute their forward in backward")

    # --- restore ------------------------------------------------------------------------
    state = TrainState()
    source = checkpointer.choose_source()  # the train dataset was built from the same choice
    if source is not None:
        state = checkpointer.restore(source)
        if plan.init_from is not None and plan.resume is None:  # an in-run retry of a fresh run
            say(f"ℹ️  --init-from {plan.init_from.uri} not loaded: the run continues from its checkpoint")
    elif plan.init_from is not None:  # --init-from: a fresh run starts from those weights
        init_weights.load(plan.init_from, model, rank, say)
    strategy.prepare()  # ddp: Accelerate wraps the restored model and optimizer
    resized = elastic.note_group(plan, world, rank, source.name if source is not None else None)
    if resized:
        say(resized)
    n_params = sum(p.numel() for p in model.parameters())  # local shards under fsdp: x world
    tracker = checkpointer.tracking = tracking.Tracking(
        cfg, strategy.accelerator, run, plan.launch_id, rank, state.step, world,
        n_params * (world if strategy.sharded else 1))
    data = resolve(cfg.data.path)
    val_tokens = read_all(data.fs, data.child("val").path, plan.token_dtype)[1] if cfg.train.val_every else None

    # --- build the data stream from the cursor --------------------------------------------
    # Ray Data deals this rank its slices of the global order from the cursor on, read once
    # across the cluster (data/stream.py); every batch is checked against its position.
    G, per_rank, max_steps = cfg.train.global_batch_size, cfg.train.global_batch_size // world, cfg.train.max_steps
    window = shuffle_window(cfg, plan.token_dtype)  # data.shuffle: the epoch's order (data/order.py)
    order = SampleOrder.make(plan.data_index, cfg.data.shuffle_seed, state.epoch, G, window)
    steps_per_epoch = order.steps(G)
    say("\n📈 Starting optimized training loop...")
    if source is not None:
        say(f"🔄 Resuming training from step {state.step}, target: {max_steps}")
        say(f"🔄 Resuming epoch {state.epoch}: skipping {state.samples_in_epoch // G} batches")
    audit = Audit(plan.audit_dir, rank)
    preemption = PreemptionWatch(cfg, say)
    progress_initial = state.step
    bar = tqdm(total=max_steps, initial=state.step, desc="Training", unit="step",
               disable=rank != 0, mininterval=1.0, dynamic_ncols=False, ascii=True,
               file=sys.stdout)  # stdout keeps it in order with the log lines

    # --- for each step: train, log, validate, checkpoint ------------------------------------
    model.train()
    first_step_at = deadline = None  # deadline: a graceful stop's (checkpoint.drain_timeout_s)
    while state.step < max_steps:
        fetch_started = time.time()
        batch = batches.next()
        if batch is None:
            raise DataOrderError(f"rank {rank}: the train stream ended before step {state.step + 1}")
        check_batch(batch, rank, state.epoch, state.samples_in_epoch + rank * per_rank, per_rank)
        fetched = time.time()
        if state.step == progress_initial:
            first_batch_s = fetched - fetch_started
        audit.trained(state, batch["id"])
        loss = strategy.step(tokens_of(batch, plan.token_dtype))
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        state.samples_in_epoch += G
        if state.samples_in_epoch == steps_per_epoch * G:  # the checkpoint belongs to the next epoch
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            order = SampleOrder.make(plan.data_index, cfg.data.shuffle_seed, state.epoch, G, window)

        # The stop flag rides the loss all-reduce: every rank learns a stop at the same step.
        # So does a resize Ray is about to make (trainers/elastic.py): save, then hold.
        asked = [float(rank == 0 and stopping.requested(plan.launch_id)),
                 float(rank == 0 and cfg.scaling.elastic and elastic.resize_requested(plan.launch_id))]
        summed = strategy.reduce(torch.stack([loss.detach().float(),
                                              *(torch.tensor(a, device=loss.device) for a in asked)]), "sum")
        mean_loss, stop, resize = (summed[0] / world).item(), summed[1].item() > 0, summed[2].item() > 0
        tracker.step(state.step, mean_loss, lr, lambda: parallel.grad_norm(strategy),
                     fetched - fetch_started, time.time() - fetched)
        state.best_loss = min(state.best_loss, mean_loss)
        if state.step % cfg.train.log_every == 0:
            state.loss_history.append([state.step, mean_loss])
            state.lr_history.append([state.step, lr])
        if state.step == progress_initial + 1:
            first_step_at = time.time()
            say(f"⏱️  First step after {first_step_at - loop_started:.1f} s on the worker (first batch in "
                f"{first_batch_s:.1f} s)")
            if plan.verbose:  # clock times, for benchmarks/bench_training.py's split of a job's start
                say(f"⏱️  Loop started at {loop_started:.3f}, first step done at {first_step_at:.3f}")
            held = strategy.state_bytes()
            say(f"💽 Training state on rank 0 ({strategy.name}, {world} workers): params "
                f"{held['params'] / 2**20:.2f} MB, grads {held['grads'] / 2**20:.2f} MB, AdamW "
                f"{held['optimizer'] / 2**20:.2f} MB")
        bar.update(1)
        speed = {"tok/s": f"{tracker.tokens_per_s:,.0f}"} if tracker.tokens_per_s else {}
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **speed, refresh=False)

        last = state.step == max_steps
        if cfg.train.val_every and (state.step % cfg.train.val_every == 0 or last):
            val_loss = _validate(strategy, val_tokens, cfg, rank, world)
            state.val_history.append([state.step, val_loss])
            tracker.log({"val/loss": val_loss}, state.step)
            state.best_val_loss = min(state.best_val_loss, val_loss)
        notice = preemption.notice(state.step)
        # A stop keeps checkpoint.drain_timeout_s from here to the attempt's end
        deadline = time.monotonic() + cfg.checkpoint.drain_timeout_s if stop and not last else None
        if state.step % cfg.checkpoint.every == 0 or last or notice is not None or stop or resize:  # keep this step
            files_done = order.files_done(state.samples_in_epoch)
            if resize and rank == 0:
                elastic.saved_for_resize(plan.launch_id, str(CheckpointName(state.epoch, state.step, files_done)))
            checkpointer.save(state, files_done, preempted=notice is not None, deadline=deadline)
        if resize and not last:
            # Ray restarts the group at its new size once this step is committed: steps trained
            # now would be lost with the group
            checkpointer.drain(cfg.checkpoint.drain_timeout_s)
            elastic.hold(say)
        if notice is not None:
            # the preemption's checkpoint is committed before anything else can be dropped
            checkpointer.drain(cfg.checkpoint.drain_timeout_s)
            if not last:
                preemption.hold(notice)
        if deadline is not None:
            _stop(checkpointer, state, cfg, say, rank, deadline)
            break

    # --- finish ---------------------------------------------------------------------------
    bar.close()
    if deadline is None:
        checkpointer.drain(None)  # every checkpoint saved is committed before the attempt ends
    checkpointer.close()
    tracker.end(None if deadline is None else max(1.0, deadline - time.monotonic()))
    trained = state.step - progress_initial
    if first_step_at is not None and trained > 1:
        rate = (trained - 1) / (time.time() - first_step_at)
        say(f"⏱️  {trained - 1} steps after the first at {rate:.3f} steps/s")
    say(f"🏁 Training finished at step {state.step}, epoch {state.epoch}; "
        f"best loss {state.best_loss:.4f}; progress started at step {progress_initial}")


class _Stream:
    """This rank's batches; the first is fetched in a thread from the start, so Ray Data's cold
    start overlaps building and restoring the model."""

    def __init__(self, shard, per_rank: int):
        self.batches = iter(shard.iter_batches(batch_size=per_rank, batch_format="numpy", prefetch_batches=2))
        self.first: dict = {}
        self.warmer = threading.Thread(target=self._first, name="first-batch", daemon=True)
        self.warmer.start()

    def _first(self) -> None:
        try:
            self.first["batch"] = next(self.batches, None)
        except BaseException as e:  # raised in the loop, where the batch is wanted
            self.first["error"] = e

    def next(self):
        if self.warmer is not None:
            self.warmer.join()
            self.warmer = None
            if "error" in self.first:
                raise self.first["error"]
            return self.first.pop("batch")
        return next(self.batches, None)


def _stop(checkpointer, state, cfg: Config, say, rank: int, deadline: float) -> None:
    """A graceful stop (trainers/stopping.py): finish the checkpoints already saved until the
    deadline, then abandon the rest: none of them is committed after the line that says so."""
    todo = checkpointer.unfinished()
    say(f"\n🛑 Stop requested: stopped after step {state.step} (saved); finishing {len(todo)} checkpoint(s) "
        f"saved and not yet committed (up to {cfg.checkpoint.drain_timeout_s:g}s; Ctrl-C again to stop at once)")
    started = time.time()
    left = checkpointer.drain(max(0.0, deadline - time.monotonic()), show=rank == 0)
    if left:
        left, under_way = checkpointer.abandon()
        if under_way:
            say(f"🛑 {under_way}'s commit was under way at checkpoint.drain_timeout_s: it is whole only if "
                "its metadata.json landed")
    if left:
        say(f"🛑 {len(left)} checkpoint(s) not finished within checkpoint.drain_timeout_s: "
            f"{', '.join(left)} stay incomplete and are never resumed")
    else:
        say(f"🛑 Every saved checkpoint is committed ({time.time() - started:.1f}s)")


@torch.no_grad()
def _validate(strategy, val_tokens: np.ndarray, cfg: Config, rank: int, world: int) -> float:
    model = strategy.eval_model()
    model.eval()
    device, bs = strategy.device, cfg.train.val_batch_size
    sums = torch.zeros(2, device=device)  # loss x samples, samples
    starts = list(range(0, len(val_tokens), bs))
    # Each rank a share; the sum is the same on every rank. Under fsdp every forward is a
    # collective (each block is all-gathered), so every rank runs as many: a rank past the end
    # repeats the first batch and counts nothing.
    rounds = -(-len(starts) // world) if strategy.sharded else len(starts[rank::world])
    for i in range(rounds):
        j = i * world + rank
        lo = starts[j] if j < len(starts) else 0
        batch = torch.from_numpy(val_tokens[lo:lo + bs].astype(np.int64)).to(device)
        loss = model(batch[:, :-1], batch[:, 1:])
        if j < len(starts):
            sums += torch.stack([loss.float() * len(batch), torch.tensor(float(len(batch)), device=device)])
    sums = strategy.reduce(sums, "sum")
    model.train()
    return (sums[0] / sums[1]).item()
