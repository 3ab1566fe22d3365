"""The per-rank parquet reader the service used before Ray Data ingest, kept as a baseline
for the benchmarks only: each rank reads and decodes every row group of the remaining files
and keeps its slice, so W ranks read the epoch W times."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.order import EpochOrder


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
        self.rows_read = 0  # rows decoded, the measure of read amplification

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
        self.rows_read += table.num_rows
        return table.column("id").to_numpy(), table.column("tokens").to_pylist()

    def close(self) -> None:
        self._handle.close()


class RankStream:
    """Rank r's batches of one epoch from a global cursor; records every file it opens."""

    def __init__(self, fs: pafs.FileSystem, plan: EpochOrder, global_batch: int, world: int,
                 rank: int, cursor: int):
        if cursor % global_batch:
            raise ValueError(f"cursor {cursor} is not a multiple of the global batch {global_batch}")
        self.fs, self.plan, self.global_batch = fs, plan, global_batch
        self.world, self.rank, self.cursor = world, rank, cursor
        self.opened: list[str] = []
        self.rows_read = 0
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
                self._close(self._open.pop(old))
            path = self.plan.index.files[self.plan.order[pos]]
            self.opened.append(path)
            self._open[pos] = _File(self.fs, path)
        return self._open[pos]

    def _close(self, f: _File) -> None:
        self.rows_read += f.rows_read
        f.close()

    def close(self) -> None:
        for f in self._open.values():
            self._close(f)
        self._open.clear()


