"""The train set through Ray Data: read once across the cluster, from the cursor, in the exact
global order, each rank dealt only its own slices.

The global order is the one data/order.py defines (files permuted per epoch by seed, rows
in file order; in global batch b rank r of W takes samples [bG + rL, bG + (r+1)L), L = G/W).
The stream starts at the resume point's cursor and runs, across epoch boundaries, to max_steps:

    read tasks          one per (epoch, file piece) in global order; each opens its file once
                        and reads from the row group holding its first row to the one holding
                        its last: files before the cursor and rows past the epoch's last whole
                        global batch are never read. Rows carry their epoch and position.
    map_batches +       k global batches at a time (exactly k*G rows: the fused operator's
    repartition(strict) exact bundler) reordered rank-major, then cut into blocks of k*L rows:
                        block j holds rank (j mod W)'s k slices.
    streaming_split     Train's DataConfig: with preserve_order each equal-sized block goes to the
                        split with the fewest rows so far, ties to the lowest index, so block j
                        goes to rank j mod W (ray/data/_internal/execution/operators/
                        output_splitter.py). Not a documented promise: every rank checks each
                        batch's positions (check_batch) and fails loudly if Ray ever deals
                        differently.

The stream is padded at its end to a whole chunk of k global batches with filler rows (epoch
and pos -1, never read from a file) that no rank reaches: the loop stops at max_steps.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from data.index import DataIndex, footer_digest
from data.order import ROW_OVERHEAD, EpochOrder, SampleOrder, window_permutation

BLOCK_BYTES_PER_RANK = 1 << 20  # ~1 MB per rank per block: several steps, a small fixed cost
READ_CPUS = 0.5  # reads wait on storage; and != the reorder's 1 CPU (see Stream.dataset)
SHUFFLE_CPUS = 1  # as the repartition after it: Ray fuses only ops with compatible remote args
ALIGN = -2  # epoch of the filler that pads an epoch's short last window to a whole window
PAD = -1  # epoch of the filler that pads the stream's end to a whole chunk


class DataOrderError(RuntimeError):
    """A rank was handed rows other than the ones the global order gives it."""


@dataclass(frozen=True)
class Piece:
    """Rows [first, end) of one file, read in the given epoch; pos is the epoch position of
    row `first`."""

    epoch: int
    path: str
    first: int
    end: int
    pos: int
    footer: str = ""  # the file's fingerprint in the run's index (data/index.py); "" unknown

    @property
    def rows(self) -> int:
        return self.end - self.first


def pieces(index: DataIndex, seed: int, global_batch: int, epoch: int, cursor: int,
           steps: int, window: int = 0) -> list[Piece]:
    """The file pieces holding the next `steps` global batches from (epoch, cursor), in order.

    window (data.shuffle=window): whole windows are read, from the cursor's window's first
    sample to the end of the window holding the last one, each exactly `window` rows (an
    epoch's short last window is followed by an ALIGN filler piece), so the shuffle stage gets
    one window per batch."""
    if cursor % global_batch:
        raise ValueError(f"cursor {cursor} is not a multiple of the global batch {global_batch}")
    out: list[Piece] = []
    while steps > 0:
        order = SampleOrder.make(index, seed, epoch, global_batch, window)
        per_epoch = order.steps(global_batch)
        if per_epoch == 0:
            raise ValueError(f"the dataset has {index.total_rows} samples, fewer than one global "
                             f"batch ({global_batch})")
        take = min(steps, per_epoch - cursor // global_batch)
        stop = cursor + take * global_batch
        last_start, read_to = order.window_bounds(stop - 1) if window else (cursor, stop)
        out += epoch_pieces(order.files, epoch, order.read_start(cursor), read_to)
        if window and read_to - last_start < window:
            out.append(Piece(ALIGN, "", 0, window - (read_to - last_start), -1))
        steps -= take
        epoch, cursor = epoch + 1, 0
    return out


def epoch_pieces(order: EpochOrder, epoch: int, start: int, stop: int) -> list[Piece]:
    """Epoch positions [start, stop) as file pieces, in order."""
    footers = order.index.footers
    return [Piece(epoch, order.index.files[order.order[pos]], first, end, order.starts[pos] + first,
                  footers[order.order[pos]] if footers else "")
            for pos, first, end in order.locate(start, stop)]


def steps_per_block(global_batch: int, world: int, row_bytes: int, steps: int,
                    configured: int = 0) -> int:
    """k: global batches per chunk; each rank gets k*L rows per block (~1 MB unless configured)."""
    per_rank_step = (global_batch // world) * (row_bytes + ROW_OVERHEAD)
    k = configured or max(1, math.ceil(BLOCK_BYTES_PER_RANK / per_rank_step))
    return max(1, min(k, steps))


def rank_major(batch: pa.Table, global_batch: int, world: int) -> pa.Table:
    """n whole global batches -> rank 0's n slices, then rank 1's, ... (n*G rows either way)."""
    rows = batch.num_rows
    if rows % global_batch:
        raise DataOrderError(f"a chunk of {rows} rows is not whole global batches of {global_batch}")
    per_rank = global_batch // world
    n = rows // global_batch
    order = (np.arange(n)[None, :, None] * global_batch + np.arange(world)[:, None, None] * per_rank
             + np.arange(per_rank)[None, None, :]).reshape(-1)
    return batch.take(pa.array(order))


def check_batch(batch: dict, rank: int, epoch: int, start: int, count: int) -> None:
    """The position guard: rank `rank` must get epoch `epoch`, positions [start, start+count)."""
    got_epoch = np.asarray(batch["epoch"])
    got_pos = np.asarray(batch["pos"])
    expected = np.arange(start, start + count)
    if len(got_pos) != count or (got_epoch != epoch).any() or (got_pos != expected).any():
        raise DataOrderError(
            f"rank {rank} was dealt the wrong rows: expected epoch {epoch} positions "
            f"[{start}, {start + count}), got {_describe(got_epoch, got_pos)}. Ray Data's split "
            "routing changed; training on these rows would break exactly-once data")


def _describe(epochs: np.ndarray, pos: np.ndarray) -> str:
    if len(pos) == 0:
        return "no rows"
    contiguous = (np.diff(pos) == 1).all() and (epochs == epochs[0]).all()
    if contiguous:
        return f"epoch {int(epochs[0])} positions [{int(pos[0])}, {int(pos[-1]) + 1})"
    shown = ", ".join(f"{int(e)}:{int(p)}" for e, p in list(zip(epochs, pos))[:8])
    return f"{len(pos)} rows (epoch:position) {shown}{', ...' if len(pos) > 8 else ''}"


def tokens_of(batch: dict, dtype: str = "uint8") -> np.ndarray:
    """[rows, seq_len+1] tokens from a batch's `tokens` column (numpy object array): uint8, or
    little-endian uint16/uint32 (LaunchPlan.token_dtype)."""
    col = batch["tokens"]
    return np.frombuffer(b"".join(col), dtype=np.dtype(dtype).newbyteorder("<")).reshape(len(col), -1)


SCHEMA = pa.schema([("id", pa.int64()), ("tokens", pa.binary()), ("epoch", pa.int32()),
                    ("pos", pa.int64())])


def read_piece(data_uri: str, piece: Piece, audit_dir: str | None) -> Iterator[pa.Table]:
    """A Ray Data read task: one file opened once, from the row group holding piece.first."""
    from storage.location import resolve

    fs = resolve(data_uri).fs
    with fs.open_input_file(piece.path) as handle:
        if piece.footer:  # the footer is read anyway: the file must be the one the run indexed
            footer = footer_digest(handle)
            if footer != piece.footer:
                raise DataOrderError(f"{piece.path} changed since this run indexed it (its parquet footer's "
                                     f"sha256 is {footer[:12]}..., the index says {piece.footer[:12]}...): "
                                     "training on it would break exact resume; restore the file")
        meta = pq.ParquetFile(handle).metadata
        bounds = [0]
        for g in range(meta.num_row_groups):
            bounds.append(bounds[-1] + meta.row_group(g).num_rows)
        groups = [g for g in range(meta.num_row_groups)
                  if bounds[g] < piece.end and bounds[g + 1] > piece.first]
        _audit(audit_dir, {"event": "open", "epoch": piece.epoch, "file": piece.path,
                           "first_row": piece.first, "row_groups": groups})
        f = pq.ParquetFile(handle, metadata=meta)
        for g in groups:
            table = f.read_row_group(g, columns=["id", "tokens"])
            lo, hi = max(piece.first, bounds[g]) - bounds[g], min(piece.end, bounds[g + 1]) - bounds[g]
            table = table.slice(lo, hi - lo)
            first_pos = piece.pos + bounds[g] + lo - piece.first
            yield pa.table({
                "id": table.column("id").cast(pa.int64()),
                "tokens": table.column("tokens").cast(pa.binary()),
                "epoch": pa.array(np.full(table.num_rows, piece.epoch, dtype=np.int32)),
                "pos": pa.array(np.arange(first_pos, first_pos + table.num_rows, dtype=np.int64)),
            }, schema=SCHEMA)


def filler(rows: int, row_bytes: int, epoch: int = PAD) -> Iterator[pa.Table]:
    """Rows that pad the stream to a whole chunk (PAD) or a short window to a whole one (ALIGN):
    read from nowhere, trained on by no one."""
    yield pa.table({
        "id": pa.array(np.full(rows, -1, dtype=np.int64)),
        "tokens": pa.array([bytes(row_bytes)] * rows, type=pa.binary()),
        "epoch": pa.array(np.full(rows, epoch, dtype=np.int32)),
        "pos": pa.array(np.full(rows, -1, dtype=np.int64)),
    }, schema=SCHEMA)


def window_shuffle(batch: pa.Table, window: int, seed: int, row_bytes: int, first: tuple[int, int],
                   last: tuple[int, int], pad: int) -> pa.Table:
    """One window, read in file order (then its ALIGN filler) -> its samples in trained order,
    with trained positions: offset o gets the sample at S[start + perm[o]], perm from (seed,
    epoch, window) as data/order.py's SampleOrder. Keeps positions from `first` (epoch,
    cursor) up to `last` (epoch, stop); after the stream's last window, `pad` PAD rows."""
    epochs = batch.column("epoch").to_numpy()
    real = batch.filter(pa.array(epochs >= 0)) if (epochs < 0).any() else batch
    pos = real.column("pos").to_numpy()
    epoch = int(epochs[0]) if len(epochs) else -1
    start = int(pos[0]) - int(pos[0]) % window if len(pos) else -1
    if (len(pos) == 0 or batch.num_rows != window or (real.column("epoch").to_numpy() != epoch).any()
            or (pos != np.arange(start, start + len(pos))).any()):
        raise DataOrderError(f"the shuffle stage got {batch.num_rows} rows that are not one whole window of "
                             f"{window} (epoch:position {_describe(epochs, batch.column('pos').to_numpy())})")
    perm = window_permutation(seed, epoch, start // window, len(pos))
    shuffled = real.take(pa.array(perm)).set_column(3, "pos", pa.array(np.arange(start, start + len(pos))))
    trained = np.arange(start, start + len(pos))
    keep = np.ones(len(pos), dtype=bool)
    if epoch == first[0]:
        keep &= trained >= first[1]
    if epoch == last[0]:
        keep &= trained < last[1]
    out = shuffled.filter(pa.array(keep)) if not keep.all() else shuffled
    if epoch == last[0] and start <= last[1] - 1 < start + len(pos) and pad:
        out = pa.concat_tables([out, *filler(pad, row_bytes)])
    return out


def _audit(folder: str | None, record: dict) -> None:
    """One JSON line per read event in {folder}/reads.jsonl (O_APPEND: lines stay whole)."""
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    line = (json.dumps({**record, "pid": os.getpid()}) + "\n").encode()
    fd = os.open(os.path.join(folder, "reads.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Stream:
    """What one launch attempt trains on: from (epoch, cursor), `steps` global batches."""

    data_uri: str
    index: DataIndex
    seed: int
    global_batch: int
    world: int
    row_bytes: int  # bytes per sample: seq_len + 1 tokens of LaunchPlan.token_dtype
    epoch: int
    cursor: int
    steps: int
    steps_per_block: int = 0  # 0: ~1 MB per rank per block
    audit_dir: str | None = None
    window: int = 0  # data.shuffle=window: samples per shuffle window; 0: file order

    def dataset(self):
        """The Ray Dataset; its split deals rank r exactly its slices, in step order."""
        import ray.data

        G, W = self.global_batch, self.world
        k = steps_per_block(G, W, self.row_bytes, self.steps, self.steps_per_block)
        pad = (-self.steps % k) * G
        todo = pieces(self.index, self.seed, G, self.epoch, self.cursor, self.steps, self.window)
        source = CursorDatasource(self, todo, pad=0 if self.window else pad)
        ds = ray.data.read_datasource(source, override_num_blocks=len(source.todo) + 1,
                                     num_cpus=READ_CPUS)
        if self.window:
            # One window per batch (every window in the stream is exactly `window` rows, see
            # pieces), shuffled; the fused strict repartition makes the batches exact, as below
            # (unfused, a task's last batch would be short: the stage's guard refuses that).
            last_epoch, stop = _end(self.index, self.seed, G, self.epoch, self.cursor, self.steps)
            # scheduling_strategy: see below. It is inherited by the strict repartition (so the
            # two still fuse), where another remote arg (memory, say) would keep them apart.
            # Ray 2.60 warns that remote args given this way go in 2.64 (we pin 2.60); the
            # guard in window_shuffle catches any change in how these stages fuse.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                ds = ds.map_batches(window_shuffle, batch_size=self.window, batch_format="pyarrow",
                                    num_cpus=SHUFFLE_CPUS, zero_copy_batch=True, scheduling_strategy="SPREAD",
                                    fn_kwargs={"window": self.window, "seed": self.seed,
                                               "row_bytes": self.row_bytes, "first": (self.epoch, self.cursor),
                                               "last": (last_epoch, stop), "pad": pad})
            # Ray fuses MapBatches -> strict StreamingRepartition only when batch_size is a
            # multiple of the target (operator_fusion.py _can_fuse): the target is the window.
            ds = ds.repartition(target_num_rows_per_block=self.window, strict=True)
        # Ray fuses map_batches with the strict repartition (operator_fusion.py), so the
        # fused task gets exactly k*G rows per batch. It must not fuse the read in too: the
        # exact bundler would then count each read task as one row and hand k*G of them to
        # one task, serializing the reads. Distinct num_cpus keep the read apart.
        # With a shuffle stage before it, its fused op would otherwise fuse with this one (equal
        # remote args) and hand rank_major whole windows, not k*G rows: a scheduling strategy of
        # its own keeps them apart (remote args must match to fuse; scheduling_strategy is
        # inherited only when unset: operator_fusion.py are_remote_args_compatible).
        apart = {"scheduling_strategy": "DEFAULT"} if self.window else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(rank_major, batch_size=k * G, batch_format="pyarrow",
                                fn_kwargs={"global_batch": G, "world": W}, zero_copy_batch=True, **apart)
        return ds.repartition(target_num_rows_per_block=k * (G // W), strict=True)


def _end(index: DataIndex, seed: int, global_batch: int, epoch: int, cursor: int, steps: int) -> tuple[int, int]:
    """(epoch, position) just past the stream's last trained sample."""
    while True:
        per_epoch = EpochOrder.make(index, seed, epoch).steps(global_batch)
        take = per_epoch - cursor // global_batch
        if steps <= take:
            return epoch, cursor + steps * global_batch
        steps -= take
        epoch, cursor = epoch + 1, 0


class CursorDatasource(Datasource):
    """One read task per piece, in the global order (Ray keeps it under preserve_order)."""

    def __init__(self, stream: Stream, todo: list[Piece], pad: int):
        super().__init__()
        self.stream, self.todo, self.pad = stream, todo, pad
        self._row_size = stream.row_bytes + ROW_OVERHEAD

    def get_name(self) -> str:
        return "TrainFromCursor"

    def estimate_inmemory_data_size(self) -> int:
        return (sum(p.rows for p in self.todo) + self.pad) * self._row_size

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        s = self.stream
        tasks = [ReadTask(_bind(read_piece, s.data_uri, p, s.audit_dir) if p.epoch != ALIGN
                          else _bind(filler, p.rows, s.row_bytes, ALIGN),
                          BlockMetadata(num_rows=p.rows, size_bytes=p.rows * self._row_size,
                                        input_files=[p.path] if p.path else [], exec_stats=None),
                          schema=SCHEMA)
                 for p in self.todo]
        if self.pad:
            tasks.append(ReadTask(_bind(filler, self.pad, s.row_bytes),
                                  BlockMetadata(num_rows=self.pad, size_bytes=self.pad * self._row_size,
                                                input_files=[], exec_stats=None),
                                  schema=SCHEMA))
        return tasks


def _bind(fn, *args):
    def read():
        return fn(*args)
    read.__name__ = fn.__name__
    return read
