"""The train loop each Ray worker runs. Reads like the guide:

set up Accelerate -> restore (if any) -> build the data stream from the cursor ->
for each step: train, log, validate, checkpoint -> finish.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import ray.train
import torch
from accelerate import Accelerator
from tqdm import tqdm

from configs.schema import Config
from storage.location import resolve
from trainers.audit import Audit
from trainers.checkpointer import Checkpointer, seed_rank
from trainers.data import EpochOrder, read_all
from trainers.ingest import DataOrderError, check_batch, tokens_of
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
    model = build_model(cfg.model)  # model.factory: the built-in GPT unless the user brings one
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    # Stepped by us, not prepared: Accelerate's scheduler wrapper steps once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    seed_rank(cfg.train.seed, rank)
    checkpointer = Checkpointer(plan, model, optimizer, scheduler, rank, world, say)

    # --- restore ------------------------------------------------------------------------
    state = TrainState()
    source = checkpointer.choose_source()  # the train dataset was built from the same choice
    if source is not None:
        state = checkpointer.restore(source)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = resolve(cfg.data.path)
    val_tokens = read_all(data.fs, data.child("val").path, plan.token_dtype)[1] if cfg.train.val_every else None

    # --- build the data stream from the cursor --------------------------------------------
    # Ray Data deals this rank its slices of the global order from the cursor on, read once
    # across the cluster (trainers/ingest.py); every batch is checked against its position.
    G, per_rank, max_steps = cfg.train.global_batch_size, cfg.train.global_batch_size // world, cfg.train.max_steps
    order = EpochOrder.make(plan.data_index, cfg.data.shuffle_seed, state.epoch)
    steps_per_epoch = order.steps(G)
    say("\n📈 Starting optimized training loop...")
    if source is not None:
        say(f"🔄 Resuming training from step {state.step}, target: {max_steps}")
        say(f"🔄 Resuming epoch {state.epoch}: skipping {state.samples_in_epoch // G} batches")
    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_batches(batch_size=per_rank, batch_format="numpy", prefetch_batches=2))
    audit = Audit(plan.audit_dir, rank)
    preemption = PreemptionWatch(cfg, say)
    progress_initial = state.step
    bar = tqdm(total=max_steps, initial=state.step, desc="Training", unit="step",
               disable=rank != 0, mininterval=1.0, dynamic_ncols=False, ascii=True,
               file=sys.stdout)  # stdout keeps it in order with the log lines

    # --- for each step: train, log, validate, checkpoint ------------------------------------
    model.train()
    first_step_at = None
    while state.step < max_steps:
        fetch_started = time.time()
        batch = next(batches, None)
        if batch is None:
            raise DataOrderError(f"rank {rank}: the train stream ended before step {state.step + 1}")
        check_batch(batch, rank, state.epoch, state.samples_in_epoch + rank * per_rank, per_rank)
        if state.step == progress_initial:
            first_batch_s = time.time() - fetch_started
        audit.trained(state, batch["id"])
        loss = _train_step(accelerator, model, optimizer, cfg, tokens_of(batch, plan.token_dtype))
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        state.samples_in_epoch += G
        if state.samples_in_epoch == steps_per_epoch * G:  # the checkpoint belongs to the next epoch
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            order = EpochOrder.make(plan.data_index, cfg.data.shuffle_seed, state.epoch)

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
        notice = preemption.notice(state.step)
        if state.step % cfg.checkpoint.every == 0 or last or notice is not None:
            checkpointer.save(state, order.files_done(state.samples_in_epoch), preempted=notice is not None)
        if notice is not None and not last:
            preemption.hold(notice)

    # --- finish ---------------------------------------------------------------------------
    bar.close()
    trained = state.step - progress_initial
    if first_step_at is not None and trained > 1:
        rate = (trained - 1) / (time.time() - first_step_at)
        say(f"⏱️  Loop started at {loop_started:.3f}; {trained - 1} steps after the first at {rate:.3f} steps/s")
    say(f"🏁 Training finished at step {state.step}, epoch {state.epoch}; "
        f"best loss {state.best_loss:.4f}; progress started at step {progress_initial}")


def _train_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                cfg: Config, tokens: np.ndarray) -> torch.Tensor:
    """One optimizer step over this rank's slice, in grad_accum_steps micro-batches."""
    accum = cfg.train.grad_accum_steps
    batch = torch.from_numpy(tokens.astype(np.int64)).to(accelerator.device)
    total = torch.zeros((), device=accelerator.device)
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
def _validate(accelerator: Accelerator, model: torch.nn.Module, val_tokens: np.ndarray, cfg: Config,
              rank: int, world: int) -> float:
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
