"""Shared by the benchmark scripts: a synthetic parquet corpus, the GCS API server, the CLI.
The repo's packages are installed in the venv (setup.sh: pip install -e .)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_job import launcher


def make_corpus(folder: Path, files: int, rows: int, sample_bytes: int, row_group: int = 256) -> Path:
    """train/part-*.parquet and val/part-00000.parquet of random bytes: id int64, tokens binary."""
    rng = np.random.default_rng(0)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "val").mkdir(parents=True, exist_ok=True)
    for f in range(files):
        path = folder / "train" / f"part-{f:05d}.parquet"
        if path.exists():
            continue
        data = rng.integers(0, 256, size=(rows, sample_bytes), dtype=np.uint8)
        table = pa.table({"id": pa.array(np.arange(f * rows, (f + 1) * rows), pa.int64()),
                          "tokens": pa.array([r.tobytes() for r in data], pa.binary())})
        pq.write_table(table, path, row_group_size=row_group)
    val = folder / "val" / "part-00000.parquet"
    if not val.exists():
        data = rng.integers(0, 256, size=(64, sample_bytes), dtype=np.uint8)
        pq.write_table(pa.table({"id": pa.array(np.arange(64) + (1 << 40), pa.int64()),
                                 "tokens": pa.array([r.tobytes() for r in data], pa.binary())}), val)
    return folder


def checkpoint_workload(name: str, quick: bool) -> tuple[int, int, list[str]]:
    """The checkpoint benchmarks' run: (steps, checkpoint every, --set overrides). A 12.6M-parameter
    GPT (d_model 512, 4 layers, seq 128: a ~150 MB checkpoint of weights and AdamW state) on a
    synthetic corpus; --quick a tiny one."""
    import tempfile

    steps, every = (6, 3) if quick else (24, 4)
    model = (["model.d_model=128", "model.n_layer=2"] if quick
             else ["model.d_model=512", "model.n_layer=4", "model.n_head=8"])
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    data = make_corpus(root / "data", files=4, rows=400, sample_bytes=129)
    return steps, every, [*model, "model.seq_len=128", "data.prepare=none", "train.val_every=0",
                          f"data.path={data}", "checkpoint.preemption_check_every=0"]


class GcsServer:
    """The GCS API server on 127.0.0.1 with a bucket "bench"; sets STORAGE_EMULATOR_HOST here."""

    def __init__(self):
        from storage.emulator import GcsEmulator

        self.emulator = GcsEmulator()
        self.emulator.create_bucket("bench")
        self.url = self.emulator.url
        os.environ["STORAGE_EMULATOR_HOST"] = self.url

    def stop(self):
        self.emulator.stop()


def run_cli(args: list, emulator: str | None = None) -> launcher.Run:
    """`python -m ray_job.train ARGS` through the one launcher, with its own local Ray (or the
    cluster at BENCH_RAY_ADDRESS, as the smoke tests do)."""
    return launcher.run(args, ray_address=os.environ.get("BENCH_RAY_ADDRESS"), emulator=emulator,
                        timeout=3600)


def floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]
