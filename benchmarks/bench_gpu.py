"""On CUDA GPUs, in under 5 minutes: a GPT (d_model 768, 12 layers, seq 1024, bf16; the
production preset's shape before it moved to 3B and fsdp) through the service vs a plain
PyTorch loop on the same GPU, with train.strategy ddp (default) or fsdp (--strategy fsdp: FSDP2
over every GPU here, NCCL; one GPU still runs fully_shard, with nothing to shard against).

1. Tokens/s and model FLOPs utilization (6 x params x tokens/s / the GPU's bf16 dense peak),
   service (Ray Train, 1 worker, Accelerate, Ray Data ingest) / plain loop.
2. The async checkpoint stall of that model (seconds the loop is blocked per checkpoint).
3. Stop at step S, resume to 2S, against 2S straight: are the per-step losses bitwise equal?

    python benchmarks/bench_gpu.py                   # needs CUDA; prints "skipped" without it
    python benchmarks/bench_gpu.py --strategy fsdp   # sharded over the GPUs of this machine
    python benchmarks/bench_gpu.py --steps 20        # shorter
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
SETS = ["data.prepare=none", "train.val_every=0", "train.global_batch_size=32", "train.grad_accum_steps=1",
        "model.vocab_size=256", "model.seq_len=1024", "model.n_layer=12", "model.n_head=12", "model.d_model=768",
        "model.dropout=0.1", "optim.lr=6e-4", "scaling.cpus_per_worker=4", "scaling.data_cpus=4",
        "checkpoint.keep_last=0", "checkpoint.keep_best=0", "checkpoint.max_failures=0",
        "checkpoint.preemption_check_every=0", "optim.warmup_steps=10"]


def plain_loop(cfg, folder: Path, steps: int) -> float:
    """One process, no Ray, no Accelerate: the same model, batch and AdamW in bf16 autocast."""
    import pyarrow.fs as pafs
    from _baseline_reader import RankStream

    from data.index import build_index
    from data.order import EpochOrder
    from trainers.model import GPT

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                            fused=True)
    order = EpochOrder.make(build_index(pafs.LocalFileSystem(), str(folder)), cfg.data.shuffle_seed, 0)
    batches = iter(RankStream(pafs.LocalFileSystem(), order, cfg.train.global_batch_size, 1, 0, 0))
    first = None
    for step in range(steps):
        _, tokens = next(batches)
        x = torch.from_numpy(tokens.astype(np.int64)).cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            torch.cuda.synchronize()
            first = time.time()
    torch.cuda.synchronize()
    return (steps - 1) / (time.time() - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="10 steps")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU here (run this on a GPU machine; see benchmarks/RESULTS.md)")
        return
    from configs import load, parse_set, with_overrides
    from trainers.model import GPT

    steps = 10 if args.quick else args.steps
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    gpus = torch.cuda.device_count() if args.strategy == "fsdp" else 1
    sets = SETS + [f"train.strategy={args.strategy}", f"scaling.num_workers={gpus}"]
    cfg = with_overrides(load("production"), parse_set(sets))
    G, T = cfg.train.global_batch_size, cfg.model.seq_len
    data = _common.make_corpus(root / "data", files=4, rows=(2 * steps * G) // 4 + G, sample_bytes=T + 1,
                               row_group=64)
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    params = sum(p.numel() for p in GPT(cfg.model).parameters())
    alone = "; only one GPU here: nothing is sharded across devices" if gpus == 1 and args.strategy == "fsdp" else ""
    print(f"GPU: {name} x {gpus} ({args.strategy}{alone}); "
          f"model {params / 1e6:.1f}M params, batch {G} x {T} tokens, bf16, {steps} steps")

    torch.backends.cuda.matmul.allow_tf32 = True
    plain = plain_loop(cfg, data, steps)
    torch.cuda.empty_cache()

    base = ["--config", "production", "--storage", root / "ckpt", "--set", f"data.path={data}"]
    for s in sets:
        base += ["--set", s]

    def service(run: str, *extra) -> tuple[str, dict]:
        result = _common.run_cli(base + ["--run-name", run, *extra])
        assert result.rc == 0, result.out[-4000:]
        from storage.names import CheckpointName

        names = [CheckpointName.parse(p.name) for p in (root / "ckpt" / run).glob("checkpoint-*")]
        final = root / "ckpt" / run / str(max(names, key=lambda n: n.step))
        return result.out, json.loads((final / "training_metrics.json").read_text())

    straight_out, straight = service("straight", "--max-steps", 2 * steps, "--checkpoint-every", steps // 2)
    half = steps
    service("chain", "--max-steps", half, "--checkpoint-every", steps // 2)
    _, chained = service("chain", "--resume", "latest", "--max-steps", 2 * steps, "--checkpoint-every", steps // 2)

    rate = _common.floats(r"steps after the first at ([\d.]+) steps/s", straight_out)[0]
    stalls = _common.floats(r"Training blocked ([\d.]+)s", straight_out)
    tokens_service, tokens_plain = rate * G * T / gpus, plain * G * T  # per GPU
    print(f"1. tokens/s per GPU: plain PyTorch loop {tokens_plain:,.0f}   service {tokens_service:,.0f}   "
          f"service / plain {tokens_service / tokens_plain:.3f} (target >= 0.9)  "
          f"{'OK' if tokens_service / tokens_plain >= 0.9 else 'MISSED'}")
    if peak:
        mfu = [6 * params * t / peak for t in (tokens_plain, tokens_service)]
        print(f"   MFU: plain {mfu[0]:.1%}   service {mfu[1]:.1%} (peak bf16 {peak / 1e12:.0f} TFLOP/s)")
    print(f"2. async checkpoint stall: median {statistics.median(stalls):.3f} s over {len(stalls)} checkpoints "
          f"({[round(s, 3) for s in stalls]})")
    a, b = straight["loss_history"], chained["loss_history"]
    equal = a == b
    worst = max(abs(x[1] - y[1]) for x, y in zip(a, b)) if len(a) == len(b) else float("nan")
    print(f"3. stop at {half}, resume to {2 * steps} vs straight: losses bitwise equal: {equal} "
          f"(max |diff| {worst:.3g} over {len(a)} steps)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
