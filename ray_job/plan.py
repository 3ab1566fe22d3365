"""`python -m ray_job.plan --config NAME [train's flags]`: what a launch would do and need, known
before anything is rented. Exit 0 it fits, 1 it does not, 2 bad input.

Runs every check `python -m ray_job.train` runs before Ray (ray_job/train.py's prepare, dry:
config, storage, data index, --resume vetting; the run's lease read, not taken), starts nothing
and writes nothing, then prints the plan and the per-GPU memory of one training step measured by
tracing it under FakeTensorMode (trainers/memory.py). A check this machine cannot make (a bucket
it cannot reach) is shown as not checked, with why, and does not fail the plan. The last line:

    Peak per GPU: 28.0 GB of 40 GB: fits

fits when the peak is at most 90% of the GPU's memory (scaling.gpu_memory_gb, or by
scaling.gpu's name: configs/gpus.py): the headroom is for the CUDA context and the allocator's
fragmentation, which the trace does not see.
"""

from __future__ import annotations

import sys
import time

from configs import ConfigError
from configs.gpus import memory_gb
from configs.schema import Config
from ray_job.errors import UserError

HEADROOM = 0.9  # of the GPU's memory the peak may use
GB = 2**30


def main(argv: list[str] | None = None) -> int:
    from ray_job.train import prepare

    unchecked: list[tuple[str, str]] = []
    try:
        cfg, storage, run, plan = prepare(argv, dry=True, unchecked=unchecked)
        lease = lease_state(cfg, run) if not any(what == "--storage" for what, _ in unchecked) else None
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(cfg, run.uri, plan, unchecked, lease))
    try:
        mem = estimate_memory(cfg)
    except Exception as e:  # a model.factory module that fake tensors cannot run
        print(f"❌ Memory not estimated: tracing one step failed ({type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0][:300]})", file=sys.stderr)
        return 1
    print(memory_table(cfg, mem))
    line, fits = verdict(cfg, mem.peak)
    print(line)
    if lease is not None and lease.startswith("in use"):
        print(f"error: --storage {run.uri}: {lease}; train would refuse it now", file=sys.stderr)
        return 2
    return 0 if fits else 1


def estimate_memory(cfg: Config):
    from trainers import memory

    # An elastic range keeps the global batch: its smallest group holds the most per GPU.
    world = cfg.scaling.min_workers if cfg.scaling.elastic else cfg.scaling.num_workers
    print(f"⏳ Tracing one training step under FakeTensorMode ({world} ranks, "
          f"{cfg.train.strategy}) for its memory...", flush=True)
    return memory.estimate(cfg, world)


def warn_memory(cfg: Config) -> None:
    """train's check before Ray starts: the estimate's last line, loudly when it does not fit."""
    try:
        mem = estimate_memory(cfg)
    except Exception as e:  # a model.factory module that fake tensors cannot run: train anyway
        print(f"⚠️  Memory not estimated ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
        return
    line, fits = verdict(cfg, mem.peak)
    if fits:
        print(f"💽 {line}")
    else:
        print(f"⚠️  {line}: expect CUDA out of memory. Set --set train.activation_checkpointing=full, "
              "raise train.grad_accum_steps or add workers; see python -m ray_job.plan --config "
              f"{cfg.name}", file=sys.stderr)


def verdict(cfg: Config, peak: int) -> tuple[str, bool]:
    """The plan's last line, and whether it fits (a CPU run, or a GPU of unknown memory, does)."""
    x = f"{peak / GB:.1f} GB"
    if not cfg.scaling.use_gpu:
        return f"Peak per worker: {_gb(peak).strip()} (a CPU run: no GPU memory to fit)", True
    total = memory_gb(cfg.scaling.gpu, cfg.scaling.gpu_memory_gb)
    if total is None:
        return (f"Peak per GPU: {x} of ? GB: not checked (set scaling.gpu, e.g. nvidia-tesla-a100, "
                "or scaling.gpu_memory_gb)"), True
    fits = peak <= HEADROOM * total * GB
    return f"Peak per GPU: {x} of {total:g} GB: {'fits' if fits else 'does not fit'}", fits


def lease_state(cfg: Config, run) -> str:
    """The run's lease as read (never taken): free, in use by a live launch, or left stale."""
    from storage.lease import Holder, Lease, LeaseError

    try:
        current = Lease(run, "plan", stale_s=cfg.checkpoint.lease_stale_s).store.read()
    except (LeaseError, OSError) as e:
        return f"not checked ({e})"
    if current is None:
        return "free"
    holder = Holder.parse(current[0])
    if holder is None:
        return "unreadable: train would refuse it until the file is deleted"
    now = time.time()
    if now - holder.heartbeat > cfg.checkpoint.lease_stale_s:
        return f"left stale ({holder.describe(now)}): train takes it over"
    return f"in use by another launch ({holder.describe(now)})"


def table(cfg: Config, run_uri: str, plan, unchecked: list[tuple[str, str]], lease: str | None) -> str:
    from data.order import SampleOrder, shuffle_window

    t, s, m = cfg.train, cfg.scaling, cfg.model
    W, G = (s.min_workers if s.elastic else s.num_workers), t.global_batch_size  # elastic: the fewest
    per_rank = G // W
    micro = per_rank // t.grad_accum_steps
    index = plan.data_index
    window = shuffle_window(cfg, plan.token_dtype)
    row = (m.seq_len + 1) * _itemsize(plan.token_dtype)
    rows = [
        ("Config", f"{cfg.name}: run {run_uri}"),
        ("Workers", (f"{W}..{s.num_workers} (elastic)" if s.elastic else f"{W}") + f" x {t.strategy}"
         + (f" on {s.gpu or 'GPUs'}" if s.use_gpu else " on CPU")
         + f", {t.mixed_precision if t.mixed_precision != 'no' else 'fp32'}"
         + (", activation checkpointing" if t.activation_checkpointing != "none" else "")),
        ("Per rank", f"{per_rank} samples a step: {t.grad_accum_steps} micro-batch(es) of {micro} x "
                     f"{m.seq_len} tokens" + (f" (at {W} workers)" if s.elastic else "")),
        ("Tokens per step", f"{G * m.seq_len:,} ({G} samples)"),
    ]
    if index is not None:
        steps = SampleOrder.make(index, cfg.data.shuffle_seed, 0, G, window).steps(G)
        rows.append(("Steps per epoch", f"{steps:,} ({len(index.files)} files, {index.total_rows:,} samples)"))
    else:
        rows.append(("Steps per epoch", "not known (the data was not read)"))
    rows.append(("Shuffle window", f"{window:,} samples, {_gb(window * row).strip()}" if window
                 else "none (data.shuffle=files)"))
    rows += [("Checks", "")]
    rows += [(f"  {what}", "not checked: " + why) for what, why in unchecked]
    done = {what for what, _ in unchecked}
    for what, ok in (("--storage", "reachable"), ("data.path", "indexed"),
                     ("--resume", f"{plan.resume.name} (step {plan.resume.step}) verified" if plan.resume else None),
                     ("--init-from", f"{plan.init_from.uri}: names and shapes match the model"
                      if plan.init_from and not plan.resume else None)):
        if what not in done and ok:
            rows.append((f"  {what}", "✓ " + ok))
    if lease is not None:
        rows.append(("  lease", lease))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def memory_table(cfg: Config, mem) -> str:
    total = mem.n_params * 4 * 3  # fp32 weights and AdamW's two moments
    each = (f"{_gb(mem.params + mem.optimizer).strip()} from each rank" if cfg.train.strategy == "fsdp"
            else "all from rank 0")
    rows = [
        ("Checkpoint", f"{_gb(total).strip()} ({_count(mem.n_params)} parameters: fp32 weights and AdamW "
                       f"state); {each}"),
        (f"Memory per rank (traced: {mem.world} ranks, micro-batch {mem.micro_batch}"
         + (", the smallest group of scaling.min_workers..num_workers" if cfg.scaling.elastic else "") + ")", ""),
        ("  parameters", _gb(mem.params)),
        ("  gradients", _gb(mem.grads)),
        ("  optimizer state", _gb(mem.optimizer)),
        ("  activations at the peak", _gb(mem.activations)),
        ("  transient at the peak", _gb(mem.transient)),
        ("  peak", _gb(mem.peak)),
    ]
    width = max(len(k) for k, v in rows if v)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() if v else k for k, v in rows)


def _gb(n: int) -> str:
    return f"{n / GB:8.2f} GB" if n >= GB / 10 else f"{n / 2**20:8.2f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


if __name__ == "__main__":
    sys.exit(main())
