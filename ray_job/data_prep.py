"""Prepare the test corpus from text already on every machine: this Python's stdlib sources.

Byte-level tokens, fixed-length samples of seq_len + 1 bytes, a unique int64 id per sample,
written as train/part-NNNNN.parquet and val/part-00000.parquet, then ``corpus.json``, last:
what the corpus was built with (seq_len, sizes). Written once; each file lands atomically
(a temp name of its own, then a move), so an interrupted prepare is redone, never half-used,
and two launches preparing one folder at once write the same bytes. A corpus built for
another config is refused (a run must not silently train on 64-token samples when it asked
for 128), with the fix in the message.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sysconfig
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from configs.schema import Config
from ray_job.errors import UserError
from storage.location import Location, join

VAL_ID_OFFSET = 1 << 40  # validation ids never collide with train ids
MARKER = "corpus.json"


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
    _put(loc, rel, buf.getvalue())


def _put(loc: Location, rel: str, data: bytes) -> None:
    final = join(loc.path, rel)
    tmp = f"{final}.{uuid.uuid4().hex}.tmp"  # never a shared temp name: two preparers at once
    if os.path.dirname(rel):
        loc.fs.create_dir(join(loc.path, os.path.dirname(rel)), recursive=True)
    with loc.fs.open_output_stream(tmp) as out:
        out.write(data)
    loc.fs.move(tmp, final)


def built_with(cfg: Config) -> dict:
    """What a corpus for cfg is built from; corpus.json records it."""
    d = cfg.data
    return {"format": 1, "source": "stdlib", "seq_len": cfg.model.seq_len,
            "sample_bytes": cfg.model.seq_len + 1, "train_files": d.train_files,
            "samples_per_file": d.samples_per_file, "val_samples": d.val_samples,
            "row_group_size": d.row_group_size}


def _recorded(loc: Location) -> dict | None:
    path = join(loc.path, MARKER)
    if loc.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with loc.fs.open_input_stream(path) as f:
            recorded = json.loads(f.read())
    except ValueError:  # UnicodeDecodeError is one
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"data.path {loc.uri}: {MARKER} there is unreadable; delete {loc.uri} to "
                        "rebuild the corpus, or use another --set data.path")
    return recorded


def is_prepared(loc: Location, cfg: Config) -> bool:
    """corpus.json is there (and says cfg's corpus), or, from before it was recorded, a whole
    corpus: train files and the val file (written last then). Refuses a corpus built for
    another config."""
    recorded = _recorded(loc)
    if recorded is not None:
        wanted = built_with(cfg)
        diffs = [f"{k} {recorded.get(k)!r} (this config: {v!r})" for k, v in wanted.items()
                 if recorded.get(k) != v and k != "sample_bytes"]
        if diffs:
            keys = {"seq_len": "model.seq_len"}
            fix = " ".join(f"--set {keys.get(k, 'data.' + k)}={recorded.get(k)}"
                           for k in wanted if k not in ("format", "source", "sample_bytes")
                           and recorded.get(k) != wanted[k])
            raise UserError(
                f"data.path {loc.uri} holds a test corpus prepared with {'; '.join(diffs)}; use a "
                f"new folder for this config (--set data.path=NEW_FOLDER, prepared there), match "
                f"the corpus ({fix}), or delete {loc.uri} to rebuild it")
        return True
    sel = pafs.FileSelector(join(loc.path, "train"), allow_not_found=True)
    found = [i for i in loc.fs.get_file_info(sel) if i.path.endswith(".parquet")]
    val = loc.fs.get_file_info(join(loc.path, "val", "part-00000.parquet"))
    return len(found) > 0 and val.type == pafs.FileType.File


def prepare(loc: Location, cfg: Config) -> None:
    """Write the test corpus at loc unless it is already there (refused if built otherwise)."""
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
    _put(loc, MARKER, json.dumps(built_with(cfg), indent=2, sort_keys=True).encode())  # last
