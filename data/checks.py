"""The data set, checked on the driver before Ray starts, so that a wrong path or a corpus made
for another model costs seconds, not a cluster start and a worker traceback.

A fresh run: data.path is a folder (missing is fine only when data.prepare=stdlib builds the
test corpus there), every train/*.parquet footer reads, and one row of the first train file
has seq_len + 1 tokens (inputs plus the next-token targets). Any run with validation: the same
for val/. A dataset made by `python -m ray_job.prepare_data` counts only once its dataset.json
(written last) is there: it gives the token width and must say this model's seq_len and a vocab
that fits model.vocab_size; its train file and sample counts must match the folder. A folder
without one is read as byte tokens (ids 0-255: model.vocab_size at least 256), unless a prepare
was cut short there (dataset.partial.json): refused.
A resume takes its train files from the checkpoint, by their names relative to the data path,
found under this run's data.path (the dataset may have moved), and checks that each is the
file it trained on: the same size and parquet footer (fingerprint). Only each file's footer is
read here; a missing or changed file is refused, naming it and what differs.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from configs.schema import Config
from data.prepare import FORMAT, MARKER, PARTIAL, WIDTHS
from data.prepare import token_dtype as width_for
from ray_job.errors import UserError
from storage.location import Location, join


def fresh_index(data: Location, cfg: Config, verbose: bool = False):
    """The train index of a fresh run (preparing the test corpus when asked), checked."""
    from data import corpus as data_prep
    from data.index import build_index

    info = data.fs.get_file_info(data.path)
    if info.type == pafs.FileType.File:
        raise UserError(f"data.path {data.uri} is a file; give the folder that holds "
                        "train/*.parquet and val/*.parquet")
    if cfg.data.prepare == "stdlib":
        try:
            data_prep.prepare(data, cfg, verbose)
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
    dtype = token_dtype(data, cfg, index)
    check_sample(data, cfg, index.files[0], "train", dtype)
    check_val(data, cfg, dtype)
    return index


def resume_index(data: Location, metadata: dict, checkpoint: str):
    """The checkpoint's train index resolved under data.path, every file checked against what
    the checkpoint trained on: the files of the epoch already trained on by size alone
    (a listing: never opened, the resume does not read them; a read task checks their footer
    when a later epoch opens them), every other by size and parquet footer (row counts for
    checkpoints from before fingerprints, whose absolute paths are found by name under train/)."""
    import posixpath
    from concurrent.futures import ThreadPoolExecutor

    from data.index import DataIndex, footer_fingerprint
    from storage.manifest import rel_name_problem

    saved = metadata["data_index"]
    legacy = not saved.get("footers")
    names = ["train/" + posixpath.basename(n) for n in saved["files"]] if legacy else list(saved["files"])
    for name in names:
        problem = rel_name_problem(name)
        if problem is not None:
            raise UserError(f"--resume {checkpoint}: its data index names {name!r} ({problem}): not a file "
                            "under data.path")
    index = DataIndex.from_json({**saved, "files": names}, data.path)

    from data.order import SampleOrder

    skip = set()
    if not legacy and metadata.get("sample_order"):
        so = metadata["sample_order"]
        order = SampleOrder.make(index, so["seed"], metadata["epoch"], metadata["global_batch_size"], so["window"])
        skip = {index.files[i] for i in order.files.order[:order.files_done(metadata["samples_in_epoch"])]}

    def fingerprint(path: str):
        try:
            if path in skip:
                info = data.fs.get_file_info(path)
                if info.type == pafs.FileType.NotFound:
                    return None
                i = index.files.index(path)
                return info.size, index.footers[i], index.rows[i]
            return footer_fingerprint(data.fs, path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return e

    with ThreadPoolExecutor(16) as pool:  # one small read per file: many at once on gs://
        prints = list(pool.map(fingerprint, index.files))
    fix = (f"resume with the data.path {checkpoint} trained on (--set data.path=...), or restore the "
           "files; a dataset prepared again is a new one: start a new run on it")
    for i, (name, got) in enumerate(zip(names, prints)):
        where = f"data.path {data.uri}: {name}, which {checkpoint} trained on,"
        if got is None:
            raise UserError(f"{where} is missing; {fix}")
        if isinstance(got, BaseException):
            raise UserError(f"{where} does not read as parquet ({_first_line(got)}); {fix}")
        size, footer, rows = got
        if legacy:
            if rows != index.rows[i]:
                raise UserError(f"{where} has {rows} rows, the checkpoint's index {index.rows[i]}; {fix}")
        elif size != index.sizes[i]:
            raise UserError(f"{where} has {size} bytes, the checkpoint's index {index.sizes[i]}: it changed; {fix}")
        elif footer != index.footers[i]:
            raise UserError(f"{where} has another parquet footer (sha256 {footer[:12]}..., the checkpoint's "
                            f"{index.footers[i][:12]}...): it was rewritten; {fix}")
    return DataIndex(index.files, index.rows, tuple(names), tuple(p[0] for p in prints),
                     tuple(p[1] for p in prints))


def token_dtype(data: Location, cfg: Config, index=None) -> str:
    """The width of the tokens at data: dataset.json's, checked against the model (and, given
    the train index, against the files there), or uint8 for byte tokens without one."""
    marker = _marker(data)
    if marker is None:
        if data.fs.get_file_info(join(data.path, PARTIAL)).type == pafs.FileType.File:
            raise UserError(f"data.path {data.uri} is an unfinished dataset: {PARTIAL} is there and "
                            f"{MARKER} (written last) is not, so its prepare was cut short; run "
                            f"python -m ray_job.prepare_data again with --out {data.uri}")
        if cfg.model.vocab_size < 256:
            raise UserError(f"model.vocab_size={cfg.model.vocab_size}: the data holds bytes (token ids "
                            "0-255), so it must be at least 256; --set model.vocab_size=256")
        return "uint8"
    dtype = check_dataset(marker, cfg, data.uri)
    if index is not None:
        want = (int(marker["train"]["files"]), int(marker["train"]["samples"]))
        if (len(index.files), index.total_rows) != want:
            raise UserError(f"data.path {data.uri}: {MARKER} records {want[0]} train files of {want[1]} "
                            f"samples, but train/ holds {len(index.files)} files of {index.total_rows}: "
                            "the folder changed after it was prepared; restore it or prepare it again")
    return dtype


def check_dataset(marker, cfg: Config, uri: str) -> str:
    """dataset.json against the model: the same seq_len, every token id below model.vocab_size.
    Returns the token width."""
    try:
        seq_len, vocab, dtype = int(marker["seq_len"]), int(marker["vocab_size"]), marker["token_dtype"]
        tokenizer = marker["tokenizer"]
        kind = tokenizer["kind"]
        ok = (marker["format"] == FORMAT and dtype in WIDTHS and width_for(vocab) == dtype
              and int(marker["train"]["files"]) >= 0 and int(marker["train"]["samples"]) >= 0)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"data.path {uri}: {MARKER} there is not a dataset record this version reads; "
                        "prepare the data again with python -m ray_job.prepare_data")
    if seq_len != cfg.model.seq_len:
        raise UserError(
            f"data.path {uri} holds samples of {seq_len + 1} tokens ({MARKER}: seq_len {seq_len}), but "
            f"model.seq_len={cfg.model.seq_len} needs {cfg.model.seq_len + 1} (seq_len + 1: inputs and "
            f"next-token targets); --set model.seq_len={seq_len}, or prepare the data with --seq-len "
            f"{cfg.model.seq_len}")
    if vocab > cfg.model.vocab_size:
        if kind == "bytes":
            raise UserError(f"model.vocab_size={cfg.model.vocab_size}: the data holds bytes (token ids "
                            "0-255), so it must be at least 256; --set model.vocab_size=256")
        raise UserError(f"model.vocab_size={cfg.model.vocab_size}: the data at {uri} was tokenized by "
                        f"{tokenizer.get('path')} into {vocab} token ids, so it must be at least "
                        f"{vocab}; --set model.vocab_size={vocab}")
    return dtype


def _marker(data: Location) -> dict | None:
    path = join(data.path, MARKER)
    if data.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with data.fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"data.path {data.uri}: {MARKER} there is unreadable ({_first_line(e)}); "
                        "prepare the data again with python -m ray_job.prepare_data") from None


def check_val(data: Location, cfg: Config, dtype: str | None = None) -> None:
    """With validation on, val/*.parquet must be there with samples of the right length."""
    if not cfg.train.val_every:
        return
    files = _parquet_files(data, "val")
    if not files:
        raise UserError(f"data.path {data.uri}: no val/*.parquet files there, and validation is "
                        f"on (train.val_every={cfg.train.val_every}); add them, or --set "
                        "train.val_every=0")
    check_sample(data, cfg, files[0], "val", dtype or token_dtype(data, cfg))


def check_sample(data: Location, cfg: Config, path: str, kind: str, dtype: str = "uint8") -> None:
    """Read the schema and one row of path: id and tokens columns, tokens are bytes holding
    model.seq_len + 1 tokens of dtype."""
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
                            "reads tokens packed in bytes (python -m ray_job.prepare_data writes them)")
        length = None
        try:
            for batch in pf.iter_batches(batch_size=1, columns=["tokens"]):  # one row, not a file
                if batch.num_rows:
                    length = len(batch.column(0)[0].as_py())
                    break
        except (OSError, ValueError) as e:
            raise UserError(f"{where} is unreadable ({_first_line(e)})") from None
    want = cfg.model.seq_len + 1
    if length is not None:
        length, odd = divmod(length, WIDTHS[dtype])
        if odd:
            raise UserError(f"{where} holds a sample of {length * WIDTHS[dtype] + odd} bytes, not whole "
                            f"{dtype} tokens ({MARKER} says {dtype}); prepare the data again")
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
