"""The global sample order and each rank's slice of it, read by offset.

The order of an epoch is fixed by the file list, the seed and the epoch, never by the worker
count:

    file order (EpochOrder)   files in a seeded permutation of (seed, epoch), rows in file
                              order: the sequence S, positions 0..N-1. Only its first
                              P = (N // G) * G samples are trained (whole global batches).
    windows (SampleOrder)     data.shuffle=window: S[0, P) cut into windows of
                              data.shuffle_window samples (a multiple of G; the epoch's last
                              window may be shorter), each shuffled by a permutation drawn
                              from (seed, epoch, window). Trained position p of window w holds
                              S[w*window + perm_w[p - w*window]]. data.shuffle=files: S as is.
                              The last window's end depends on G: a resume with another G
                              inside a window it cuts otherwise is refused (ray_job/resume.py).

Training consumes the trained sequence in global batches of G samples; in global batch b, rank
r of W takes positions [b*G + r*G/W, b*G + (r+1)*G/W). The cursor is one number, the global
samples consumed in the epoch, so a run can resume on any number of workers with the same G.
data/stream.py reads the train set from the cursor through Ray Data (windows before the
cursor's window never opened; that window read from the row group holding its first sample);
this module only says where each sample lives.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from data.index import DataIndex


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


SHUFFLE_BYTES = 256 << 20  # default window: about this much of samples (small corpora: the whole epoch)
ROW_OVERHEAD = 8 + 4 + 8  # id, epoch, pos beside the tokens (data/stream.py's rows)


def shuffle_window(cfg, token_dtype: str = "uint8") -> int:
    """Samples per shuffle window (0: data.shuffle=files): data.shuffle_window or about
    SHUFFLE_BYTES of samples, rounded down to whole global batches (at least one)."""
    if cfg.data.shuffle != "window":
        return 0
    G = cfg.train.global_batch_size
    if cfg.data.shuffle_window:
        return max(1, cfg.data.shuffle_window // G) * G
    row = (cfg.model.seq_len + 1) * np.dtype(token_dtype).itemsize + ROW_OVERHEAD
    return max(1, SHUFFLE_BYTES // (row * G)) * G


def sample_order(cfg, token_dtype: str = "uint8") -> dict:
    """What fixes the order of every epoch beside the data (metadata.json's "sample_order"); a
    checkpoint from before data.shuffle existed trained in file order."""
    return {"shuffle": cfg.data.shuffle, "window": shuffle_window(cfg, token_dtype), "seed": cfg.data.shuffle_seed}


def window_in_progress(total_rows: int, window: int, global_batch: int, cursor: int) -> tuple[int, int] | None:
    """[start, end) of the shuffle window that a resume at `cursor` continues, under global batch
    G: the epoch's last window ends at P = (N // G) * G, so its end, and with its length its
    permutation, depend on G. None when no window is in progress (data.shuffle=files, or the
    cursor at a window's start: nothing of it trained yet)."""
    if not window or cursor % window == 0:
        return None
    start = cursor - cursor % window
    return start, min(start + window, total_rows // global_batch * global_batch)


def window_permutation(seed: int, epoch: int, window: int, length: int) -> np.ndarray:
    """The shuffle of one window: a pure function of (seed, epoch, window index, its length)."""
    return np.random.default_rng([seed, epoch, window, 0x5AFE]).permutation(length)


@dataclass(frozen=True)
class SampleOrder:
    """The trained order of one epoch: the file order, then shuffled within windows."""

    files: EpochOrder
    seed: int
    epoch: int
    trained: int  # P: the epoch's whole global batches, in samples
    window: int  # samples per window, a multiple of G; 0: no shuffle (data.shuffle=files)

    @classmethod
    def make(cls, index: DataIndex, seed: int, epoch: int, global_batch: int, window: int = 0) -> SampleOrder:
        if window % global_batch:
            raise ValueError(f"shuffle window {window} is not a multiple of the global batch {global_batch}")
        files = EpochOrder.make(index, seed, epoch)
        return cls(files, seed, epoch, files.steps(global_batch) * global_batch, window)

    def steps(self, global_batch: int) -> int:
        return self.trained // global_batch

    def window_bounds(self, position: int) -> tuple[int, int]:
        """[start, end) of the window holding trained position `position` (files: [position, P))."""
        if not self.window:
            return position, self.trained
        start = position - position % self.window
        return start, min(start + self.window, self.trained)

    def windows(self) -> list[tuple[int, int]]:
        return [self.window_bounds(s) for s in range(0, self.trained, self.window or self.trained or 1)]

    def permutation(self, start: int) -> np.ndarray:
        """Within the window starting at `start`: offset o holds the sample at S[start + perm[o]]."""
        lo, hi = self.window_bounds(start)
        if not self.window:
            return np.arange(hi - lo)
        return window_permutation(self.seed, self.epoch, lo // self.window, hi - lo)

    def sources(self, start: int, stop: int) -> np.ndarray:
        """The S positions (file order) of trained positions [start, stop)."""
        out = []
        p = start
        while p < stop:
            lo, hi = self.window_bounds(p)
            end = min(stop, hi)
            out.append(lo + self.permutation(lo)[p - lo:end - lo])
            p = end
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def read_start(self, cursor: int) -> int:
        """Where a resume at `cursor` starts reading S: its window's first sample (every window
        is read whole, once, to be shuffled; files before it are never opened)."""
        return self.window_bounds(cursor)[0] if self.window else cursor

    def files_done(self, cursor: int) -> int:
        """Files (in epoch order) wholly in the windows before the cursor's: trained on in full
        and never opened again by a resume (the F of checkpoint-epoch{E}-step{S}-files{F})."""
        return self.files.files_done(self.read_start(cursor))
