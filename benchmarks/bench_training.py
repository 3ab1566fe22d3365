"""Training overhead and resume time, through the real service (local Ray, 1 worker).

1. Steps per second of the service (1 Ray Train worker, our parquet stream, Accelerate)
   against a plain single-process PyTorch loop over the same model, data and optimizer.
   Target: service / plain >= 0.9. And the plain loop with activation checkpointing (each
   block's forward again in backward): its cost in steps/s.
2. Resume time: job start to first resumed step, against job start to first step of a fresh
   run, split into Ray + worker start, checkpoint fetch, state load and data pipeline start
   (Ray Data: the dataset built at the cursor until this rank's first batch is in hand).

    python benchmarks/bench_training.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import pyarrow.fs as pafs
import torch
from _baseline_reader import RankStream

from configs import load, parse_set, with_overrides
from data.index import build_index
from data.order import EpochOrder
from trainers import recompute
from trainers.model import GPT

SETS = ["model.seq_len=256", "model.d_model=256", "model.n_layer=4", "model.n_head=4",
        "data.prepare=none", "train.val_every=0", "train.global_batch_size=16",
        "data.steps_per_block=0"]  # the service's default block size (~1 MB per rank)


def bench_config(sets: list[str] = SETS):
    return with_overrides(load("test"), parse_set(sets))


def plain_loop(cfg, folder: Path, steps: int) -> float:
    """The baseline: one process, no Ray, no Accelerate, same model, data order and AdamW."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    recompute.apply(model, cfg)  # train.activation_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    plan = EpochOrder.make(build_index(pafs.LocalFileSystem(), str(folder)), cfg.data.shuffle_seed, 0)
    batches = iter(RankStream(pafs.LocalFileSystem(), plan, cfg.train.global_batch_size, 1, 0, 0))
    first = None
    for step in range(steps):
        _, tokens = next(batches)
        x = torch.from_numpy(tokens.astype(np.int64))
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            first = time.time()
    return (steps - 1) / (time.time() - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    quick = args.quick
    steps = 6 if quick else 60
    sets = list(SETS)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = _common.make_corpus(root / "data", files=4 if args.quick else 16, rows=400 if args.quick else 2000,
                               sample_bytes=257)
    sets.append(f"data.path={data}")
    cfg = bench_config(sets)
    torch.set_num_threads(1)  # a Ray worker with 1 CPU gets OMP_NUM_THREADS=1: same here
    plain = plain_loop(cfg, data, steps)
    recomputing = plain_loop(with_overrides(cfg, {"train": {"activation_checkpointing": "full"}}), data, steps)

    base = ["--config", "test", "--num-workers", 1, "--storage", root / "ckpt", "--verbose"]  # clock times
    for s in sets:
        base += ["--set", s]
    fresh_run = _common.run_cli(base + ["--run-name", "bench", "--max-steps", steps,
                                         "--checkpoint-every", steps // 2])
    fresh, fresh_start = fresh_run.out, fresh_run.started
    assert fresh_run.rc == 0, fresh[-3000:]
    service = _common.floats(r"steps after the first at ([\d.]+) steps/s", fresh)[0]

    print(f"1. steps/s (model {sum(p.numel() for p in GPT(cfg.model).parameters()) / 1e6:.1f}M params, "
          f"batch {cfg.train.global_batch_size} x {cfg.model.seq_len}):")
    print(f"   plain PyTorch loop {plain:.3f}   service (Ray Train, 1 worker) {service:.3f}   "
          f"ratio {service / plain:.3f} (target >= 0.9)  {'OK' if service / plain >= 0.9 else 'MISSED'}")
    print(f"   plain loop with train.activation_checkpointing=full {recomputing:.3f}   "
          f"its cost: {recomputing / plain:.3f} x the steps/s (report)")

    def split(out: str, start: float) -> dict:
        first_step = _common.floats(r"first step done at ([\d.]+)", out)[0]
        loop = _common.floats(r"Loop started at ([\d.]+),", out)[0]
        batch = _common.floats(r"\(first batch in ([\d.]+) s\)", out)[0]
        fetch = (_common.floats(r"\(fetch ([\d.]+)s", out) or [0.0])[0]
        load_s = (_common.floats(r"state load ([\d.]+)s\)", out) or [0.0])[0]
        parts = {"total": first_step - start, "ray+workers": loop - start, "fetch": fetch,
                 "state load": load_s, "data pipeline start": batch}
        parts["setup+step"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
        return parts  # setup+step: model build, Accelerate/DDP wrap, the first forward/backward

    a = split(fresh, fresh_start)
    print("2. job start -> first step (s):      " + "  ".join(f"{k} {v:6.2f}" for k, v in a.items()))
    if quick:  # the smoke test: the resumed job's start is the same code, measured in a full run
        return
    resumed_run = _common.run_cli(base + ["--run-name", "bench", "--resume", "latest", "--max-steps", steps + 4])
    assert resumed_run.rc == 0, resumed_run.out[-3000:]
    b = split(resumed_run.out, resumed_run.started)
    print("   job start -> first resumed step:  " + "  ".join(f"{k} {v:6.2f}" for k, v in b.items()))
    print(f"   resume / fresh: {b['total'] / a['total']:.2f}")


if __name__ == "__main__":
    main()
