"""Resume skip cost: time from resume to the first batch at 0%, 50% and 90% of an epoch.

Ours: the service's Ray Data read task at the cursor (data/stream.py read_piece: files
before it are never opened, the partial file is read from the row group holding the cursor),
to its first block. Ray Data's own pipeline start-up, the same at any cursor, is measured by
bench_ingest.py. Against: what a user of HF Accelerate
gets, `skip_first_batches` over an iterable torch DataLoader reading the same parquet files in
the same order (it reads and drops every skipped batch).

    python benchmarks/bench_resume_skip.py            # ~330 MB of parquet
    python benchmarks/bench_resume_skip.py --quick    # seconds, for the test suite
Targets: ours@90% within 1.2x of ours@0%; ours at least 20x faster than skip_first_batches@90%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from accelerate import skip_first_batches
from torch.utils.data import DataLoader, IterableDataset

from data import stream as ingest
from data.index import build_index
from data.order import EpochOrder


class ParquetRows(IterableDataset):
    """The plain way: stream the epoch's files in order, row by row."""

    def __init__(self, plan: EpochOrder):
        self.paths = [plan.index.files[i] for i in plan.order]

    def __iter__(self):
        for path in self.paths:
            for batch in pq.ParquetFile(path).iter_batches(columns=["id", "tokens"]):
                for i, t in zip(batch.column("id").to_pylist(), batch.column("tokens").to_pylist()):
                    yield i, torch.frombuffer(bytearray(t), dtype=torch.uint8)


def ours(uri, plan, batch, cursor) -> float:
    started = time.perf_counter()
    piece = ingest.epoch_pieces(plan, 0, cursor, cursor + batch)[0]
    blocks = ingest.read_piece(uri, piece, None)
    next(blocks)
    took = time.perf_counter() - started
    blocks.close()
    return took


def accelerate_skip(plan, batch, skip) -> float:
    started = time.perf_counter()
    loader = skip_first_batches(DataLoader(ParquetRows(plan), batch_size=batch), num_batches=skip)
    next(iter(loader))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", help="reuse a corpus folder")
    args = ap.parse_args()
    files, rows, sample = (4, 400, 257) if args.quick else (40, 8000, 1025)  # ~330 MB
    folder = Path(args.data or tempfile.mkdtemp(prefix="bench-skip-"))
    _common.make_corpus(folder, files, rows, sample)
    fs = pafs.LocalFileSystem()
    index = build_index(fs, str(folder))
    plan = EpochOrder.make(index, seed=0, epoch=0)
    batch = 32
    steps = plan.steps(batch)
    repeats = 1 if args.quick else 15  # ours is ~1 ms: the median of many, interleaved
    ours(str(folder), plan, batch, 0)  # warm the page cache and imports the same for every position
    size_mb = sum(p.stat().st_size for p in (folder / "train").glob("*.parquet")) / 2**20
    print(f"corpus: {files} files x {rows} rows x {sample} B = {size_mb:.0f} MB; batch {batch}; "
          f"{steps} batches an epoch")
    results = {}
    for frac in (0.0, 0.5, 0.9):
        skip = int(frac * steps)
        ours_s = statistics.median(ours(str(folder), plan, batch, skip * batch) for _ in range(repeats))
        theirs_s = statistics.median(accelerate_skip(plan, batch, skip) for _ in range(min(repeats, 3)))
        results[frac] = (ours_s, theirs_s)
        print(f"  at {frac:4.0%} ({skip:5d} batches skipped): ours {ours_s * 1000:8.1f} ms   "
              f"accelerate skip_first_batches {theirs_s * 1000:9.1f} ms   ratio {theirs_s / ours_s:7.1f}x")
    flat = results[0.9][0] / results[0.0][0]
    speedup = results[0.9][1] / results[0.9][0]
    print(f"ours@90% / ours@0%: {flat:.2f} (target <= 1.2)  {'OK' if flat <= 1.2 else 'MISSED'}")
    print(f"skip_first_batches@90% / ours@90%: {speedup:.1f}x (target >= 20)  "
          f"{'OK' if speedup >= 20 else 'MISSED'}")


if __name__ == "__main__":
    main()
