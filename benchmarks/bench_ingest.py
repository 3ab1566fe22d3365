"""Ray Data ingest (data/stream.py), each figure a ratio measured side by side in one run,
on the default order (data.shuffle=window; windows of WINDOW samples here, 4 an epoch):

0. Mixing: the share of a global batch's samples whose file-order successor is in the same
   batch (file order: about (G-1)/G; target <= 2 G / window), and distinct source files per
   global batch / min(G, files in the window). Extra rows decoded at a mid-window resume (the
   cursor's window is read whole; bound: one window).
1. Read amplification: rows decoded per epoch, all ranks together, / rows in the epoch, at
   W = 2 and 4. Ray Data path (from the read tasks' audit) vs the old per-rank reader
   (benchmarks/_baseline_reader.py). Target: 1.0 vs W.
2. Resume start-up: time from building the dataset at the cursor to every rank holding its
   first batch, at 90% vs 0% of an epoch (median of interleaved repeats). Target: <= 1.2.
3. Steady state: ingest rows/s per rank (W = 2, an epoch drained as the loop does, without
   training) vs the rows/s per rank the training loop consumes on bench_training's model
   (a plain PyTorch loop's steps/s x G / W, as if training scaled perfectly). Target: >= 5.

4. Quality, once: validation loss after the same steps of the test preset (the stdlib corpus,
   whose files follow the package layout: neighbouring samples share a module) with
   data.shuffle=window vs files, through the service (not in --quick).

    python benchmarks/bench_ingest.py            # ~64 MB corpus
    python benchmarks/bench_ingest.py --quick    # seconds, for the test suite
Joins BENCH_RAY_ADDRESS if set, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import _common
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from _baseline_reader import RankStream
from ray.data import ExecutionOptions

from data.index import build_index
from data.order import EpochOrder, SampleOrder
from data.stream import Stream, check_batch

G = 16
WINDOW = 16000  # samples per shuffle window: 4 files' worth, 4 windows an epoch (quick: 2 files, 2)


def drain(stream: Stream) -> tuple[float, float, int]:
    """Split the stream over stream.world consumers (threads, as Train's workers each iterate
    their shard); (seconds to every rank's first batch, seconds for the rest, rows per rank)."""
    ds = stream.dataset()
    ds.context.execution_options = ExecutionOptions(preserve_order=True)
    started = time.perf_counter()
    shards = ds.streaming_split(stream.world, equal=True)
    L = G // stream.world
    first, last, rows = [0.0] * stream.world, [0.0] * stream.world, [0] * stream.world

    ids = [[] for _ in range(stream.world)]

    def consume(r: int) -> None:
        epoch, cursor = stream.epoch, stream.cursor
        steps_per_epoch = stream.index.total_rows // G
        for step, batch in enumerate(shards[r].iter_batches(batch_size=L, batch_format="numpy")):
            if step == stream.steps:
                break  # the padding past the last step
            if step == 0:
                first[r] = time.perf_counter()
            check_batch(batch, r, epoch, cursor + r * L, L)
            rows[r] += len(batch["id"])
            ids[r].append(batch["id"].tolist())
            cursor += G
            if cursor == steps_per_epoch * G:
                epoch, cursor = epoch + 1, 0
        last[r] = time.perf_counter()

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(stream.world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(rows)) == 1 and rows[0] == stream.steps * L, rows
    drain.ids = [[i for r in range(stream.world) for i in ids[r][b]] for b in range(stream.steps)]
    return max(first) - started, max(last) - max(first), rows[0]


def rows_decoded(audit: Path) -> int:
    total = 0
    for line in (audit / "reads.jsonl").read_text().splitlines():
        r = json.loads(line)
        meta = pq.ParquetFile(r["file"]).metadata
        total += sum(meta.row_group(g).num_rows for g in r["row_groups"])
    return total


def baseline_rows_decoded(index, world: int) -> int:
    plan = EpochOrder.make(index, 0, 0)
    total = 0
    for rank in range(world):
        stream = RankStream(pafs.LocalFileSystem(), plan, G, world, rank, 0)
        for _ in stream:
            pass
        stream.close()
        total += stream.rows_read
    return total


def loop_rows_per_s(quick: bool) -> tuple[float, str]:
    """bench_training's model and batch in a plain PyTorch loop: the rate a loop eats data."""
    import bench_training

    cfg = bench_training.bench_config()
    folder = _common.make_corpus(Path(tempfile.mkdtemp(prefix="bench-loop-")), 2, 200,
                                 cfg.model.seq_len + 1)
    steps_per_s = bench_training.plain_loop(cfg, folder, 4 if quick else 12)
    return steps_per_s * cfg.train.global_batch_size, f"{steps_per_s:.3f} steps/s x G {cfg.train.global_batch_size}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    files, rows, sample = (4, 240, 257) if args.quick else (16, 4000, 1025)
    folder = _common.make_corpus(Path(tempfile.mkdtemp(prefix="bench-ingest-")), files, rows,
                                 sample, row_group=64)
    index = build_index(pafs.LocalFileSystem(), str(folder))
    steps = index.total_rows // G
    if os.environ.get("BENCH_RAY_ADDRESS"):
        ray.init(address=os.environ["BENCH_RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"corpus: {files} files x {rows} rows x {sample} B, row groups of 64; global batch {G}; "
          f"{steps} steps an epoch")

    window = min(WINDOW, steps * G) if not args.quick else 480

    def stream(world: int, cursor_steps: int, audit: str | None = None, shuffle: bool = True) -> Stream:
        return Stream(data_uri=str(folder), index=index, seed=0, global_batch=G, world=world,
                      row_bytes=sample, epoch=0, cursor=cursor_steps * G,
                      steps=steps - cursor_steps, audit_dir=audit, window=window if shuffle else 0)

    print(f"0. mixing (shuffle windows of {window} samples, {steps * G // window} an epoch)")
    order = SampleOrder.make(index, 0, 0, G, window)
    file_of, seq = {}, []  # every sample's file; the file-order sequence S
    for i in order.files.order:
        ids = pq.read_table(index.files[i], columns=["id"]).column("id").to_pylist()
        file_of.update({x: i for x in ids})
        seq += ids
    successor = dict(zip(seq, seq[1:]))
    mixing = {}
    for shuffle in (False, True):
        drain(stream(2, 0, shuffle=shuffle))
        batches = drain.ids
        share = statistics.mean(sum(successor.get(x) in set(b) for x in b) / G for b in batches)
        files_in_window = statistics.mean(len({file_of[x] for x in seq[w:w + window]})
                                          for w in range(0, len(batches) * G, window))
        spread = statistics.mean(len({file_of[x] for x in b}) for b in batches) / min(G, files_in_window)
        mixing[shuffle] = share
        print(f"  {'window' if shuffle else 'files '}: successor in the same batch {share:.3f}   "
              f"distinct files per batch / min(G, files in a window) {spread:.2f}")
    print(f"successor share window {mixing[True]:.3f} vs files {mixing[False]:.3f} (target window <= "
          f"{2 * G / window:.3f})  {'OK' if mixing[True] <= 2 * G / window else 'MISSED'}")
    audit = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    mid = (int(0.9 * steps * G) // window) * window + window // 2  # mid-window, 90% into the epoch
    drain(stream(2, mid // G, str(audit)))
    extra = rows_decoded(audit) - (steps * G - mid)
    print(f"  resume at {mid} of {steps * G} (mid-window): rows decoded but not trained {extra} "
          f"({extra * sample / 2**20:.1f} MB); bound: one window = {window} rows")

    print("1. rows decoded per epoch, all ranks / rows in the epoch")
    epoch_rows = steps * G
    for world in (2, 4):
        audit = Path(tempfile.mkdtemp(prefix="bench-audit-"))
        drain(stream(world, 0, str(audit)))
        ours = rows_decoded(audit) / epoch_rows
        theirs = baseline_rows_decoded(index, world) / epoch_rows
        print(f"  W={world}: Ray Data path {ours:.2f}   per-rank reader {theirs:.2f}   "
              f"{'OK' if ours <= 1.0 + 64 / epoch_rows and theirs >= world - 0.01 else 'MISSED'}")

    print("2. resume start-up: dataset built at the cursor -> every rank's first batch (W=2)")
    repeats = 2 if args.quick else 5
    starts: dict[float, list[float]] = {0.0: [], 0.9: []}
    rates = []
    for _ in range(repeats):
        for frac in starts:  # interleaved: the machine's noise hits both alike
            first, rest, per_rank = drain(stream(2, int(frac * steps)))
            starts[frac].append(first)
            if frac == 0.0:
                rates.append((per_rank - G // 2) / rest)
    s0, s90 = statistics.median(starts[0.0]), statistics.median(starts[0.9])
    print(f"  at 0%: {s0:.3f} s   at 90%: {s90:.3f} s   (median of {repeats})")
    print(f"start@90% / start@0%: {s90 / s0:.2f} (target <= 1.2)  {'OK' if s90 / s0 <= 1.2 else 'MISSED'}")

    print("3. steady state (W=2)")
    ingest = statistics.median(rates)
    loop, how = loop_rows_per_s(args.quick)
    per_rank_loop = loop / 2
    print(f"  ingest {ingest:,.0f} rows/s per rank; the loop consumes {per_rank_loop:,.1f} rows/s "
          f"per rank ({how} / 2)")
    ratio = ingest / per_rank_loop
    print(f"ingest / loop rows/s per rank: {ratio:.1f} (target >= 5)  {'OK' if ratio >= 5 else 'MISSED'}")
    if not args.quick:
        ray.shutdown()
        quality()


def quality() -> None:
    """Validation loss after the same steps, window vs files, through the service."""
    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    losses = {}
    for shuffle in ("files", "window"):
        run = _common.run_cli(["--config", "test", "--storage", root, "--run-name", shuffle, "--max-steps", 72,
                               "--checkpoint-every", 72, "--set", f"data.shuffle={shuffle}",
                               "--set", "data.shuffle_window=0", "--set", "train.val_every=72"])
        assert run.rc == 0, run.out[-3000:]
        newest = max((root / shuffle).glob("checkpoint-*"), key=lambda p: int(p.name.split("step")[1].split("-")[0]))
        losses[shuffle] = json.loads((newest / "metadata.json").read_text())["val_loss"]
    print(f"4. validation loss after 72 steps (3 epochs) of the test preset: files {losses['files']:.4f}   "
          f"window (the whole epoch) {losses['window']:.4f}")


if __name__ == "__main__":
    main()
