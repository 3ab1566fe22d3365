"""Prepare the test corpus from text already on every machine: this Python's stdlib sources.

Byte-level tokens, fixed-length samples of seq_len + 1 bytes, a unique int64 id per sample,
written as train/part-NNNNN.parquet and val/part-00000.parquet. Written once; each file lands
atomically (a temp name, then a move), so an interrupted prepare is redone, never half-used.
"""

from __future__ import annotations

import glob
import io
import os
import sysconfig

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from configs.schema import Config
from storage.location import Location, join

VAL_ID_OFFSET = 1 << 40  # validation ids never collide with train ids


def _corpus_bytes(needed: int) -> bytes:
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    out, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        total += len(data)
        if total >= needed:
            return b"".join(out)[:needed]
    raise RuntimeError(f"the stdlib at {root} holds {total} bytes, fewer than the {needed} needed")


def _write(loc: Location, rel: str, ids: list[int], samples: list[bytes], row_group: int) -> None:
    table = pa.table({"id": pa.array(ids, pa.int64()), "tokens": pa.array(samples, pa.binary())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group)
    final = join(loc.path, rel)
    tmp = final + ".tmp"
    loc.fs.create_dir(join(loc.path, os.path.dirname(rel)), recursive=True)
    with loc.fs.open_output_stream(tmp) as out:
        out.write(buf.getvalue())
    loc.fs.move(tmp, final)


def is_prepared(loc: Location, cfg: Config) -> bool:
    sel = pafs.FileSelector(join(loc.path, "train"), allow_not_found=True)
    found = [i for i in loc.fs.get_file_info(sel) if i.path.endswith(".parquet")]
    val = loc.fs.get_file_info(join(loc.path, "val", "part-00000.parquet"))
    return len(found) > 0 and val.type == pafs.FileType.File


def prepare(loc: Location, cfg: Config) -> None:
    """Write the test corpus at loc unless it is already there."""
    if is_prepared(loc, cfg):
        return
    d, sample = cfg.data, cfg.model.seq_len + 1
    n_train = d.train_files * d.samples_per_file
    corpus = _corpus_bytes((n_train + d.val_samples) * sample)
    samples = [corpus[i * sample:(i + 1) * sample] for i in range(n_train + d.val_samples)]
    for f in tqdm(range(d.train_files), desc="Preparing the test corpus", unit="file"):
        lo = f * d.samples_per_file
        ids = list(range(lo, lo + d.samples_per_file))
        _write(loc, f"train/part-{f:05d}.parquet", ids, samples[lo:lo + d.samples_per_file],
               d.row_group_size)
    val_ids = [VAL_ID_OFFSET + i for i in range(d.val_samples)]
    _write(loc, "val/part-00000.parquet", val_ids, samples[n_train:], d.row_group_size)
