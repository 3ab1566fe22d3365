"""The data set, checked on the driver before Ray starts, so that a wrong path or a corpus made
for another model costs seconds, not a cluster start and a worker traceback.

A fresh run: data.path is a folder (missing is fine only when data.prepare=stdlib builds the
test corpus there), every train/*.parquet footer reads, and one row of the first train file
has seq_len + 1 bytes (inputs plus the next-token targets). Any run with validation: the same
for val/. The tokens are bytes (ids 0-255), so model.vocab_size must be at least 256.
A resume takes its train files from the checkpoint (checked when that run started, with the
same model.seq_len, which check_compatible enforces) and opens none of them here: files
already trained on are never read again.
"""

from __future__ import annotations

from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from configs.schema import Config
from ray_job.errors import UserError
from storage.location import Location, join


def fresh_index(data: Location, cfg: Config):
    """The train index of a fresh run (preparing the test corpus when asked), checked."""
    from ray_job import data_prep
    from trainers.data import build_index

    info = data.fs.get_file_info(data.path)
    if info.type == pafs.FileType.File:
        raise UserError(f"data.path {data.uri} is a file; give the folder that holds "
                        "train/*.parquet and val/*.parquet")
    if cfg.data.prepare == "stdlib":
        try:
            data_prep.prepare(data, cfg)
        except OSError as e:
            raise UserError(f"data.path {data.uri}: cannot prepare the test corpus there "
                            f"({_first_line(e)}); give a writable folder") from None
    elif info.type == pafs.FileType.NotFound:
        raise UserError(f"data.path {data.uri} does not exist; with data.prepare=none it must "
                        "already hold train/*.parquet and val/*.parquet (check the path, or "
                        "--set data.prepare=stdlib to build the test corpus there)")
    files = _parquet_files(data, "train")
    if not files:
        raise UserError(f"data.path {data.uri}: no train/*.parquet files there"
                        + ("" if cfg.data.prepare == "stdlib" else
                           " (data.prepare=none: the data must already be there)"))
    try:
        index = build_index(data.fs, data.path)
    except (OSError, ValueError):  # a footer that does not read: say which file
        for path in files:
            with _opened(data, path, "train"):
                pass
        raise
    check_sample(data, cfg, index.files[0], "train")
    check_val(data, cfg)
    return index


def check_val(data: Location, cfg: Config) -> None:
    """With validation on, val/*.parquet must be there with samples of the right length."""
    if not cfg.train.val_every:
        return
    files = _parquet_files(data, "val")
    if not files:
        raise UserError(f"data.path {data.uri}: no val/*.parquet files there, and validation is "
                        f"on (train.val_every={cfg.train.val_every}); add them, or --set "
                        "train.val_every=0")
    check_sample(data, cfg, files[0], "val")


def check_sample(data: Location, cfg: Config, path: str, kind: str) -> None:
    """Read the schema and one row of path: id and tokens columns, tokens are bytes of
    model.seq_len + 1, and model.vocab_size covers bytes."""
    where = f"data.path {data.uri}: {kind} file {path}"
    with _opened(data, path, kind) as pf:
        schema = pf.schema_arrow
        if "id" not in schema.names or "tokens" not in schema.names:
            raise UserError(f"{where} has columns {schema.names}; expected id (int64) and "
                            "tokens (bytes)")
        kind_of = schema.field("tokens").type
        if not (pa.types.is_binary(kind_of) or pa.types.is_large_binary(kind_of)
                or pa.types.is_fixed_size_binary(kind_of)):
            raise UserError(f"{where}: tokens is {kind_of}, expected bytes (binary): this trainer "
                            "reads byte-level tokens")
        length = None
        try:
            for batch in pf.iter_batches(batch_size=1, columns=["tokens"]):  # one row, not a file
                if batch.num_rows:
                    length = len(batch.column(0)[0].as_py())
                    break
        except (OSError, ValueError) as e:
            raise UserError(f"{where} is unreadable ({_first_line(e)})") from None
    if cfg.model.vocab_size < 256:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size}: the data holds bytes (token ids "
                        "0-255), so it must be at least 256; --set model.vocab_size=256")
    want = cfg.model.seq_len + 1
    if length is not None and length != want:
        raise UserError(
            f"{where} holds samples of {length} tokens, but model.seq_len={cfg.model.seq_len} needs "
            f"{want} (seq_len + 1: inputs and next-token targets); --set model.seq_len={length - 1}, "
            "or use data made for this seq_len (another --set data.path)")


def _parquet_files(data: Location, kind: str) -> list[str]:
    sel = pafs.FileSelector(join(data.path, kind), recursive=False, allow_not_found=True)
    try:
        infos = data.fs.get_file_info(sel)
    except OSError as e:  # e.g. train is a file
        raise UserError(f"data.path {data.uri}: cannot list {kind}/ ({_first_line(e)})") from None
    return sorted(i.path for i in infos if i.path.endswith(".parquet"))


@contextmanager
def _opened(data: Location, path: str, kind: str):
    try:
        f = data.fs.open_input_file(path)
    except OSError as e:  # a folder named *.parquet, no access
        raise UserError(f"data.path {data.uri}: {kind} file {path} cannot be opened "
                        f"({_first_line(e)}); fix or remove it") from None
    with f:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, ValueError) as e:  # not parquet (ArrowInvalid is a ValueError)
            raise UserError(f"data.path {data.uri}: {kind} file {path} is not a readable parquet "
                            f"file ({_first_line(e)}); fix or remove it") from None
        yield pf


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
