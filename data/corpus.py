"""Prepare the test corpus from text already on every machine: this Python's stdlib sources.

One use of `python -m ray_job.prepare_data` (ray_job/prepare_data.py), not a second path: the
stdlib's *.py files, concatenated in sorted order and cut to exactly the bytes the config needs,
go to a temp file, and the prepare command's code turns that into the dataset through Ray Data
with the bytes tokenizer: samples of seq_len + 1 bytes, train_files files of samples_per_file
samples (ids 0, 1, ...), then val_samples validation samples (ids VAL_ID_OFFSET + j), row groups
of row_group_size. dataset.json, written last, records what the corpus was built for under
"stdlib"; a corpus built for another config is refused (a run must not silently train on
64-token samples when it asked for 128), with the fix in the message. An interrupted prepare
(dataset.partial.json, no dataset.json) is redone, never half-used; each file lands whole, so
two launches preparing one folder at once write the same bytes.

The temp file is on the driver: on a multi-node cluster the read task must run where it is
(a local Ray, or a shared disk); a cluster's own data is prepared from gs:// with the command.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import tempfile

import pyarrow.fs as pafs

from configs.schema import Config
from data import prepare as prepare_data
from ray_job.errors import UserError
from storage.location import Location, join

VAL_ID_OFFSET = prepare_data.VAL_ID_OFFSET
MARKER = prepare_data.MARKER  # dataset.json: what the corpus was built for is under "stdlib"
LEGACY_MARKER = "corpus.json"  # before the prepare command: the same record, on its own


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


def built_with(cfg: Config) -> dict:
    """What a corpus for cfg is built from; dataset.json records it under "stdlib"."""
    d = cfg.data
    return {"format": 1, "source": "stdlib", "seq_len": cfg.model.seq_len,
            "sample_bytes": cfg.model.seq_len + 1, "train_files": d.train_files,
            "samples_per_file": d.samples_per_file, "val_samples": d.val_samples,
            "row_group_size": d.row_group_size}


def _recorded(loc: Location) -> dict | None:
    """What the test corpus at loc was built for: dataset.json's "stdlib" record (None for a
    dataset prepared from other text), or an older corpus's corpus.json."""
    for name in (MARKER, LEGACY_MARKER):
        path = join(loc.path, name)
        if loc.fs.get_file_info(path).type != pafs.FileType.File:
            continue
        try:
            with loc.fs.open_input_stream(path) as f:
                recorded = json.loads(f.read())
        except ValueError:  # UnicodeDecodeError is one
            recorded = None
        if not isinstance(recorded, dict):
            raise UserError(f"data.path {loc.uri}: {name} there is unreadable; delete {loc.uri} to "
                            "rebuild the corpus, or use another --set data.path")
        return recorded.get("stdlib") if name == MARKER else recorded
    return None


def is_prepared(loc: Location, cfg: Config) -> bool:
    """dataset.json is there (and, for a test corpus, says cfg's corpus), or, from before it was
    recorded, a whole corpus: train files and the val file (written last then). A prepare cut
    short is not. Refuses a corpus built for another config."""
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
    if loc.fs.get_file_info(join(loc.path, prepare_data.PARTIAL)).type == pafs.FileType.File:
        return False  # cut short: prepared again, replacing it
    if loc.fs.get_file_info(join(loc.path, MARKER)).type == pafs.FileType.File:
        return True  # a dataset prepared from other text; data_check checks it against the model
    sel = pafs.FileSelector(join(loc.path, "train"), allow_not_found=True)
    found = [i for i in loc.fs.get_file_info(sel) if i.path.endswith(".parquet")]
    val = loc.fs.get_file_info(join(loc.path, "val", "part-00000.parquet"))
    return len(found) > 0 and val.type == pafs.FileType.File


def prepare(loc: Location, cfg: Config, verbose: bool = False) -> None:
    """Write the test corpus at loc unless it is already there (refused if built otherwise).
    verbose: Ray's and Ray Data's lines too (a train job's --verbose)."""
    if is_prepared(loc, cfg):
        return
    d = cfg.data
    needed = (d.train_files * d.samples_per_file + d.val_samples) * (cfg.model.seq_len + 1)
    with tempfile.TemporaryDirectory(prefix="stdlib-corpus-") as tmp:
        text = os.path.join(tmp, "stdlib.txt")  # one document: no separator, today's bytes
        with open(text, "wb") as f:
            f.write(_corpus_bytes(needed))
        opts = prepare_data.Options(input=text, out=loc.uri, tokenizer="bytes", seq_len=cfg.model.seq_len,
                                    val_samples=d.val_samples, rows_per_file=d.samples_per_file,
                                    row_group_size=d.row_group_size)
        prepare_data.prepare(opts, extra={"stdlib": built_with(cfg)}, out_name="data.path", verbose=verbose)
