"""The global sample order and each rank's slice of it, read by offset.

The order of an epoch is fixed by the file list, the seed and the epoch: files in a seeded
permutation, rows in file order. Training consumes that sequence in global batches of G
samples; in global batch b, rank r of W takes samples [b*G + r*G/W, b*G + (r+1)*G/W). The
cursor is one number, the global samples consumed in the epoch, so a run can resume on any
number of workers with the same G. trainers/ingest.py reads the train set from the cursor
through Ray Data (files before it never opened, the partial file from the row group holding
the cursor); this module only says where each sample lives.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

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
    def from_json(cls, data: dict) -> DataIndex:
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
class EpochOrder:
    """Where every global sample of one epoch lives."""

    index: DataIndex
    order: tuple[int, ...]  # file indices in this epoch's order
    starts: tuple[int, ...]  # global offset of each ordered file's first row

    @classmethod
    def make(cls, index: DataIndex, seed: int, epoch: int) -> EpochOrder:
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


def read_all(fs: pafs.FileSystem, folder: str, dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Every row of every parquet file in folder (validation data): (ids, tokens uint8).

    The files are listed here, not by pyarrow's dataset discovery, which would recurse and skip
    names starting with '_' or '.': only folder/*.parquet, in sorted order, all of them."""
    selector = pafs.FileSelector(folder, recursive=False)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet"))
    table = pq.read_table(paths, filesystem=fs, columns=["id", "tokens"], partitioning=None)
    tokens = table.column("tokens").to_pylist()
    arr = np.frombuffer(b"".join(tokens), dtype=np.dtype(dtype).newbyteorder("<")).reshape(len(tokens), -1)
    return table.column("id").to_numpy(), arr
