"""How the model is spread over the workers (train.strategy): one object per strategy that builds
the optimizer, runs a training step, averages a number over the ranks and says how much state
this rank holds. The train loop and the checkpointer call these and nothing strategy-specific.

    ========  ==========================================  =========================================
    strategy  model and AdamW state on each rank           checkpoint (trainers/checkpointer.py)
    ========  ==========================================  =========================================
    ddp       all of it (Accelerate's DDP, all-reduce)     rank 0 writes model.safetensors and
                                                           optimizer.pt
    fsdp      1/W of it (FSDP2 fully_shard: all-gather     every rank writes its DCP shard
              per block for compute, reduce-scatter of     (__{rank}_0.distcp), rank 0 .metadata
              gradients)
    ========  ==========================================  =========================================

Accelerate stays for ddp. Under fsdp it is not asked to prepare anything: on CPU its FSDP2
plugin is silently ignored (Accelerate 1.15 switches to FSDP only on accelerators) and preparing
an already sharded model fails (DDP broadcasts DTensors), so fully_shard is called directly
(../shared/research/fsdp-dcp.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator

from configs.schema import Config
from trainers import recompute, sharded


def adamw(cfg: Config, params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


class Replicated:
    """ddp: the model whole on every rank, gradients all-reduced by Accelerate's DDP."""

    name = "ddp"
    sharded = False
    recomputed = 0  # blocks under activation checkpointing
    grad_bytes = 0
    grad_norm = 0.0

    def __init__(self, cfg: Config, world: int, project_dir: str | None = None):
        self.cfg, self.world = cfg, world
        self.accelerator = Accelerator(cpu=not cfg.scaling.use_gpu, mixed_precision=cfg.train.mixed_precision,
                                       gradient_accumulation_steps=cfg.train.grad_accum_steps,
                                       **_trackers(cfg, project_dir))
        self.device = self.accelerator.device

    def build(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The optimizer over the plain model; a checkpoint is restored into these two before
        prepare() wraps them (state dicts without DDP's prefixes)."""
        self.recomputed = recompute.apply(model, self.cfg)  # train.activation_checkpointing
        self.model, self.optimizer = model, adamw(self.cfg, model.parameters())
        return self.model, self.optimizer

    def prepare(self) -> None:
        self.wrapped, self.wrapped_optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def step(self, tokens: np.ndarray) -> torch.Tensor:
        """One optimizer step over this rank's slice, in grad_accum_steps micro-batches."""
        accelerator, model, optimizer = self.accelerator, self.wrapped, self.wrapped_optimizer
        accum = self.cfg.train.grad_accum_steps
        batch = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        total = torch.zeros((), device=self.device)
        for micro in torch.chunk(batch, accum):
            with accelerator.accumulate(model):
                loss = model(micro[:, :-1], micro[:, 1:])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    self.grad_bytes = sharded.local_bytes(p.grad for p in self.model.parameters())
                    # the norm before clipping (max_norm inf scales by exactly 1: nothing changes)
                    self.grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm(self.cfg))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / accum
        return total

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return self.accelerator.reduce(t, op)

    def eval_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.wrapped)

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.model, self.optimizer, self.grad_bytes)


class Sharded:
    """fsdp: FSDP2 on the default process group; AdamW over the sharded parameters (DTensors)."""

    name = "fsdp"
    sharded = True
    recomputed = 0
    grad_bytes = 0
    grad_norm = 0.0

    def __init__(self, cfg: Config, world: int, project_dir: str | None = None):
        self.cfg, self.world = cfg, world
        # For the device Ray Train assigned and the trackers; nothing is prepared through it.
        self.accelerator = Accelerator(cpu=not cfg.scaling.use_gpu, **_trackers(cfg, project_dir))
        self.device = self.accelerator.device

    def build(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model.to(self.device)
        self.recomputed = recompute.apply(model, self.cfg)  # before fully_shard, on the same blocks
        self.model, self.blocks = sharded.shard(model, self.cfg.model.shard_modules,
                                                bf16=self.cfg.train.mixed_precision == "bf16")
        self.optimizer = adamw(self.cfg, self.model.parameters())
        return self.model, self.optimizer

    def prepare(self) -> None:
        pass  # sharded in build(): the optimizer must be made over the shards

    def step(self, tokens: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        total, self.grad_bytes, self.grad_norm = sharded_step(self.model, self.optimizer, batch, self.cfg)
        return total

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world if op == "mean" else t

    def eval_model(self) -> torch.nn.Module:
        return self.model

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.model, self.optimizer, self.grad_bytes)


def sharded_step(model, optimizer, batch: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One fsdp optimizer step over this rank's batch in grad_accum_steps micro-batches (the
    memory plan traces this same function: trainers/memory.py). Returns the mean loss, the
    gradients' bytes at their peak and the gradient norm before clipping."""
    accum = cfg.train.grad_accum_steps
    total = torch.zeros((), device=batch.device)
    micros = torch.chunk(batch, accum)
    for i, micro in enumerate(micros):
        model.set_requires_gradient_sync(i == len(micros) - 1)  # reduce-scatter once per step
        loss = model(micro[:, :-1], micro[:, 1:])
        (loss / accum).backward()
        total += loss.detach() / accum
    grad_bytes = sharded.local_bytes(p.grad for p in model.parameters())
    # the global norm over every shard (a DTensor all-reduce), before clipping
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm(cfg))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_bytes, norm


STRATEGIES = {"ddp": Replicated, "fsdp": Sharded}


def make(cfg: Config, world: int, project_dir: str | None = None):
    """The strategy; project_dir: where Accelerate's trackers write (trainers/tracking.py)."""
    return STRATEGIES[cfg.train.strategy](cfg, world, project_dir)


def _trackers(cfg: Config, project_dir: str | None) -> dict:
    if not cfg.logging.trackers:
        return {}
    return {"log_with": list(cfg.logging.trackers), "project_dir": project_dir}


def max_norm(cfg: Config) -> float:
    return cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")


def grad_norm(strategy) -> float:
    """The last step's gradient norm before clipping, as a float (a DTensor's is gathered)."""
    norm = strategy.grad_norm
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_bytes: int) -> dict[str, int]:
    """What this rank holds of the training state (a DTensor counts its local shard); gradients
    as measured at their peak, just before the optimizer step."""
    return {
        "params": sharded.local_bytes(model.parameters()),
        "grads": grad_bytes,
        "optimizer": sharded.local_bytes(v for s in optimizer.state.values() for v in s.values()
                                         if isinstance(v, torch.Tensor)),
    }
