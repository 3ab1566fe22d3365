"""One launch's two sides as separate processes, for tests/integration/test_lease_fence.py:

    python lease_holder.py driver RUN LAUNCH STALE_S   # takes the run's lease, heartbeats
    python lease_holder.py worker RUN LAUNCH STALE_S   # saves and commits checkpoints, with retention

The worker does what trainers/checkpointer.py and trainers/commit.py do for every checkpoint
(upload under the fence, commit and retention under the fence), as fast as it can, and keeps
trying after the lease is lost: the worst case for the fence. Each line it prints is an
outcome ("committed NAME", "refused: ...").
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

from configs import load
from data.index import DataIndex
from storage import manifest, transfer
from storage.fence import Fence, LeaseLost
from storage.lease import Lease
from storage.location import resolve
from trainers.commit import Committer
from trainers.launch_plan import LaunchPlan

FILES = {"model.safetensors": b"w" * 300, "optimizer.pt": b"o" * 200, "scheduler_state.pt": b"s",
         "rng_state_rank0.pt": b"r0", "training_metrics.json": b"{}"}


def driver(run, launch: str, stale_s: float) -> None:
    lease = Lease(run, launch, stale_s=stale_s)
    lease.acquire()

    def lost(why: str) -> None:
        print(f"driver: {why}", flush=True)
        os._exit(3)

    lease.start_heartbeat(on_lost=lost)
    print("driver: holding", flush=True)
    while True:
        time.sleep(1)


def worker(run, launch: str, stale_s: float) -> None:
    cfg = load("test")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy="ddp"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, keep_last=2))
    index = DataIndex(tuple(f"/data/train/part-{i}.parquet" for i in range(6)), (64,) * 6)
    plan = LaunchPlan(config=cfg, launch_id=launch, run_uri=run.uri, data_index=index)
    fence = Fence(run, launch, stale_s)
    committer = Committer(plan, say=lambda line: print(f"worker: {line}", flush=True), fence=fence)
    for step in range(1, 100_000):
        name = f"checkpoint-epoch0-step{step}-files2"
        local = tempfile.mkdtemp()
        for rel, data in FILES.items():
            with open(os.path.join(local, rel), "wb") as f:
                f.write(data + str(step).encode())
        try:
            stored = transfer.upload_files(local, run.child(name), launch, fence)
            report = {"rank": 0, "world_size": 1, "files": manifest.digest_folder(local), "stored": stored,
                      "commit": {"name": name, "step": step, "epoch": 0, "samples_in_epoch": 128,
                                 "files_processed": 2, "best_loss": 3.0, "best_val_loss": None,
                                 "train_loss": 3.0, "val_loss": None, "created_at": "2026-12-01T00:00:00Z",
                                 "preempted": False}}
            if committer.commit_and_retain(name, [report]):
                print(f"worker: committed {name}", flush=True)
        except LeaseLost as e:
            print(f"worker: refused: {e}", flush=True)
            time.sleep(0.05)
        time.sleep(0.02)


if __name__ == "__main__":
    role, uri, launch, stale = sys.argv[1:5]
    (driver if role == "driver" else worker)(resolve(uri), launch, float(stale))
