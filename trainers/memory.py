"""Per-GPU memory of one training step, measured without a GPU.

The real model (model.factory's) is built under FakeTensorMode (tensors with shapes and dtypes
and no storage: a 3B model costs nothing), spread as train.strategy spreads it on a fake process
group of the configured world size (torch.testing's: every collective answers at once), and one
whole optimizer step runs at the real per-rank micro-batch shape and precision, with torch's
memory trackers watching every tensor it makes (FSDPMemTracker under fsdp, MemTracker under
ddp; torchtitan's estimator does the same). AdamW's state is made before the traced step (as
from step 2 on), so the peak is the steady one. Measured on CPU kernels: scaled_dot_product_
attention takes its flash path there as on a GPU (with dropout it keeps the attention matrix on
both), and bf16 under ddp is CPU autocast. Not counted: the CUDA context and the caching
allocator's fragmentation; the plan's 10% headroom is for them.

    ==========  =============================================================================
    params      this rank's weights (fp32; under fsdp its 1/W shard)
    grads       this rank's gradients just before the optimizer step
    optimizer   this rank's AdamW state (exp_avg, exp_avg_sq, step)
    activations tensors the step made at its peak (saved for backward, and backward's
                temporaries: the logits and their fp32 copy and gradient among them)
    transient   fsdp: gathered blocks and their unsharded gradients at the peak; ddp: DDP's
                gradient buckets (a second copy of the gradients: gradient_as_bucket_view off)
    peak        the most held at once in the step, transient included
    ==========  =============================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from configs.schema import Config

FSDP_TRANSIENT = ("Unsharded Param", "Unsharded Grad", "All Gather", "Reduce Scatter")
ACTIVATIONS = ("Activation", "Temp")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank (rank 0) for one optimizer step; see the module's table."""

    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    peak: int
    world: int
    micro_batch: int
    n_params: int
    """Parameters of the whole model (every rank's together)."""
    fake: bool = True


def micro_batch(cfg: Config, world: int) -> int:
    """Samples in one forward pass on one rank."""
    return cfg.train.global_batch_size // world // cfg.train.grad_accum_steps


def estimate(cfg: Config, world: int | None = None) -> MemoryEstimate:
    """The step traced under FakeTensorMode on a fake process group of `world` ranks (default:
    scaling.num_workers). The caller's process must have no default process group."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    world = world or cfg.scaling.num_workers
    group = _group("fake", world) if cfg.train.strategy == "fsdp" else contextlib.nullcontext()
    with group:
        return _trace(cfg, world, FakeTensorMode())


def measure(cfg: Config) -> MemoryEstimate:
    """The same step with real CPU tensors, one rank (a gloo group of 1 under fsdp): what
    `estimate` is checked against."""
    group = _group("gloo", 1) if cfg.train.strategy == "fsdp" else contextlib.nullcontext()
    with group:
        return _trace(cfg, 1, contextlib.nullcontext())


@contextlib.contextmanager
def _group(backend: str, world: int):
    if dist.is_initialized():
        raise RuntimeError("a default process group exists already; estimate memory in a process without one")
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        store = FakeStore()
    else:
        store = dist.HashStore()
    dist.init_process_group(backend, rank=0, world_size=world, store=store)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trace(cfg: Config, world: int, mode) -> MemoryEstimate:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainers import parallel, recompute, sharded
    from trainers.model import build_model

    fsdp = cfg.train.strategy == "fsdp"
    micro = micro_batch(cfg, world)
    with mode, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
    recompute.apply(model, cfg)  # train.activation_checkpointing, as the strategy applies it
    if fsdp:  # outside the fake mode: the device mesh is made of real tensors
        model, _ = sharded.shard(model, cfg.model.shard_modules, bf16=cfg.train.mixed_precision == "bf16")
    with mode, torch.random.fork_rng(devices=[]):
        optimizer = parallel.adamw(cfg, model.parameters())
        for p in model.parameters():  # AdamW's state exists from step 2 on: make it first
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = torch.randint(0, cfg.model.vocab_size, (micro * cfg.train.grad_accum_steps, cfg.model.seq_len + 1))
        if fsdp:
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((batch,))
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer, batch)
        model.train()
        with tracker:
            # fsdp: per-module stats restart at each micro-batch (FSDPMemTracker refuses a second
            # root forward otherwise; the peak is kept across them). Prepended after its hooks.
            if fsdp:
                fresh = model.register_forward_pre_hook(lambda *_: tracker.reset_mod_stats(), prepend=True)
                grad_bytes = parallel.sharded_step(model, optimizer, batch, cfg)[1]
                fresh.remove()
            else:
                grad_bytes = _replicated_step(model, optimizer, batch, cfg, tracker.reset_mod_stats)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
        held = parallel.state_bytes(model, optimizer, grad_bytes)
    named = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    transient = sum(named.get(k, 0) for k in FSDP_TRANSIENT)
    peak = named["Total"]
    if not fsdp and world > 1:  # DDP's buckets: allocated when it wraps the model, held throughout
        transient += held["params"]
        peak += held["params"]
    return MemoryEstimate(params=held["params"], grads=held["grads"], optimizer=held["optimizer"],
                          activations=sum(named.get(k, 0) for k in ACTIVATIONS), transient=transient,
                          peak=peak, world=world, micro_batch=micro,
                          n_params=sum(p.numel() for p in model.parameters()),
                          fake=not isinstance(mode, contextlib.nullcontext))


def _replicated_step(model, optimizer, batch: torch.Tensor, cfg: Config, fresh) -> int:
    """parallel.Replicated.step without Accelerate (no process group needed): its autocast,
    its loss scaling over micro-batches, its clip and step. Returns the gradients' bytes.
    fresh: called before each micro-batch's forward."""
    from trainers import parallel, sharded

    accum = cfg.train.grad_accum_steps
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    cast = (torch.autocast("cpu", dtype=precision) if precision is not None else contextlib.nullcontext())
    for micro in torch.chunk(batch, accum):
        fresh()  # per-module stats restart (MemTracker refuses a second root forward otherwise)
        with cast:
            loss = model(micro[:, :-1], micro[:, 1:])
        (loss / accum).backward()
    grad_bytes = sharded.local_bytes(p.grad for p in model.parameters())
    torch.nn.utils.clip_grad_norm_(model.parameters(), parallel.max_norm(cfg))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_bytes
