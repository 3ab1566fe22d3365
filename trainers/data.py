"""The global sample order and each rank's slice of it, read by offset.

The order of an epoch is fixed by the file list, the seed and the epoch: files in a seeded
permutation, rows in file order. Training consumes that sequence in global batches of G
samples; in global batch b, rank r of W takes samples [b*G + r*G/W, b*G + (r+1)*G/W). The
cursor is one number, the global samples consumed in the epoch, so a run can resume on any
number of workers with the same G. Resuming at cursor c opens no file that ends before c and
reads the partial file from the row group holding row c onward (O(1) skip).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.location import join


@dataclass(frozen=True)
class DataIndex:
    """The train files (path on fs, row count) in canonical (sorted) order."""

    files: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def to_json(self) -> dict:
        return {"files": list(self.files), "rows": list(self.rows)}

    @classmethod
    def from_json(cls, data: dict) -> "DataIndex":
        return cls(tuple(data["files"]), tuple(int(r) for r in data["rows"]))


def build_index(fs: pafs.FileSystem, data_path: str) -> DataIndex:
    """List {data_path}/train/*.parquet and read each footer's row count (no data read)."""
    selector = pafs.FileSelector(join(data_path, "train"), recursive=False)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet"))
    rows = []
    for path in paths:
        with fs.open_input_file(path) as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    return DataIndex(tuple(paths), tuple(rows))


def epoch_order(num_files: int, seed: int, epoch: int) -> list[int]:
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_files)]


@dataclass(frozen=True)
class EpochPlan:
    """Where every global sample of one epoch lives."""

    index: DataIndex
    order: tuple[int, ...]  # file indices in this epoch's order
    starts: tuple[int, ...]  # global offset of each ordered file's first row

    @classmethod
    def make(cls, index: DataIndex, seed: int, epoch: int) -> "EpochPlan":
        order = tuple(epoch_order(len(index.files), seed, epoch))
        starts, total = [], 0
        for i in order:
            starts.append(total)
            total += index.rows[i]
        return cls(index, order, tuple(starts))

    def steps(self, global_batch: int) -> int:
        """Whole global batches in the epoch; the remainder rows are dropped every epoch."""
        return self.index.total_rows // global_batch

    def files_done(self, cursor: int) -> int:
        """Files (in epoch order) whose every row lies before the cursor."""
        done = 0
        for pos, i in enumerate(self.order):
            if self.starts[pos] + self.index.rows[i] <= cursor:
                done += 1
            else:
                break
        return done

    def locate(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Global samples [start, stop) as (file position in order, first row, end row)."""
        pieces = []
        pos = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            file_start = self.starts[pos]
            file_end = file_start + self.index.rows[self.order[pos]]
            end = min(stop, file_end)
            if end > start:
                pieces.append((pos, start - file_start, end - file_start))
            start = end
            pos += 1
        return pieces


class _File:
    """One parquet file, read a row group at a time, only from the groups asked for."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self._handle = fs.open_input_file(path)
        self._pq = pq.ParquetFile(self._handle)
        meta = self._pq.metadata
        self._bounds = [0]
        for g in range(meta.num_row_groups):
            self._bounds.append(self._bounds[-1] + meta.row_group(g).num_rows)
        self._cached: dict[int, tuple[np.ndarray, list[bytes]]] = {}

    def rows(self, first: int, end: int) -> tuple[np.ndarray, list[bytes]]:
        ids, tokens = [], []
        g = bisect.bisect_right(self._bounds, first) - 1
        while first < end:
            if g not in self._cached:
                self._cached = {g: self._read_group(g)}  # keep one group: bounded memory
            g_ids, g_tokens = self._cached[g]
            lo, hi = first - self._bounds[g], min(end, self._bounds[g + 1]) - self._bounds[g]
            ids.append(g_ids[lo:hi])
            tokens.extend(g_tokens[lo:hi])
            first = self._bounds[g] + hi
            g += 1
        return np.concatenate(ids), tokens

    def _read_group(self, g: int) -> tuple[np.ndarray, list[bytes]]:
        table = self._pq.read_row_group(g, columns=["id", "tokens"])
        return table.column("id").to_numpy(), table.column("tokens").to_pylist()

    def close(self) -> None:
        self._handle.close()


class RankStream:
    """Rank r's batches of one epoch from a global cursor; records every file it opens."""

    def __init__(self, fs: pafs.FileSystem, plan: EpochPlan, global_batch: int, world: int,
                 rank: int, cursor: int):
        if cursor % global_batch:
            raise ValueError(f"cursor {cursor} is not a multiple of the global batch {global_batch}")
        self.fs, self.plan, self.global_batch = fs, plan, global_batch
        self.world, self.rank, self.cursor = world, rank, cursor
        self.opened: list[str] = []
        self._open: dict[int, _File] = {}

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (ids [L], tokens [L, seq_len+1] uint8) per global batch, L = G / W."""
        per_rank = self.global_batch // self.world
        for b in range(self.cursor // self.global_batch, self.plan.steps(self.global_batch)):
            lo = b * self.global_batch + self.rank * per_rank
            ids, tokens = [], []
            for pos, first, end in self.plan.locate(lo, lo + per_rank):
                f = self._file(pos)
                i, t = f.rows(first, end)
                ids.append(i)
                tokens.extend(t)
            arr = np.frombuffer(b"".join(tokens), dtype=np.uint8).reshape(len(tokens), -1)
            yield np.concatenate(ids), arr

    def _file(self, pos: int) -> _File:
        if pos not in self._open:
            for old in [p for p in self._open if p < pos]:  # the order only moves forward
                self._open.pop(old).close()
            path = self.plan.index.files[self.plan.order[pos]]
            self.opened.append(path)
            self._open[pos] = _File(self.fs, path)
        return self._open[pos]

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def read_all(fs: pafs.FileSystem, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of every parquet file in folder (validation data): (ids, tokens uint8)."""
    selector = pafs.FileSelector(folder, recursive=False)
    ids, tokens = [], []
    for path in sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet")):
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["id", "tokens"])
        ids.append(table.column("id").to_numpy())
        tokens.extend(table.column("tokens").to_pylist())
    arr = np.frombuffer(b"".join(tokens), dtype=np.uint8).reshape(len(tokens), -1)
    return np.concatenate(ids), arr
