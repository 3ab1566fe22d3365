"""The optional audit trail (--audit-dir): per rank, one JSON line per trained batch, so
exactly-once is proven from sample ids. The Ray Data read tasks log every file and row group
they open beside it (reads.jsonl, data/stream.py): skip-without-reading and read-once."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from trainers.state import TrainState


class Audit:
    def __init__(self, folder: str | None, rank: int):
        self.path = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.path = os.path.join(folder, f"rank{rank}.jsonl")

    def trained(self, state: TrainState, ids: np.ndarray) -> None:
        """Record the batch of step state.step + 1 (called before the step)."""
        if self.path is None:
            return
        record = {"event": "batch", "step": state.step + 1, "epoch": state.epoch,
                  "ids": [int(i) for i in ids], "pid": os.getpid(), "t": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
