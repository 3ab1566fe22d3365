"""`python -m ray_job.prepare_data`: your text in, the train/val parquet layout the trainer reads out.

    python -m ray_job.prepare_data --input 'gs://bucket/text/*.jsonl' --format jsonl \\
        --tokenizer tokenizer.json --seq-len 1024 --out gs://bucket/datasets/mine

    {out}/train/part-NNNNN.parquet   id int64, tokens binary: seq_len + 1 little-endian tokens
    {out}/val/part-NNNNN.parquet     the same; ids VAL_ID_OFFSET + j
    {out}/tokenizer.json             a copy of --tokenizer (a `tokenizers` file; none for bytes)
    {out}/dataset.json               written last: the dataset is complete only once it is there

Three stages:
  1. The driver checks everything it can before Ray starts or a byte is written: the numbers,
     --out (not a file, not a finished dataset, nothing foreign in it), --input (the files it
     matches, sorted by path, not all empty) and the tokenizer (it reads and parses; its vocab
     size fixes the token width: uint8 up to 256 ids, uint16 up to 65,536, else uint32).
  2. Ray Data reads and tokenizes, across the cluster: a read task per run of input files
     (~64 MB), each file tokenized in `map_batches` into one row (its documents' tokens, each
     document followed by the tokenizer's end-of-text token when it has one), materialized in
     the object store. A document is a text file, or a line of a JSONL file.
  3. The driver packs and writes. The files' tokens, in file order, are one stream cut into
     samples of seq_len + 1 tokens (a tail shorter than a sample is dropped); sample k has id k
     and the last n_val samples are the validation set (ids VAL_ID_OFFSET + j). How many
     samples there are is known from stage 2 before anything is written. Why on the driver: a
     sample's bytes depend on every token before it, across document and file boundaries, so
     packing is sequential; it is a copy and a parquet write per file (I/O), while the CPU
     work, tokenizing, ran in parallel. Then dataset.json, last.

Deterministic: the same input files and arguments give the same ids and bytes (files sorted by
path, documents in file order, Ray Data's output put back in file order and checked, ids by
position). Bad input (no such input, empty input, an unreadable tokenizer, bad numbers, --out
in the way) exits 2 with one line and writes nothing. An interrupted prepare leaves
dataset.partial.json (written before the first part file) and no dataset.json: the trainer
refuses that folder, and running the same command again replaces it.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_job.errors import UserError
from storage.location import Location, StorageUnreachable, join, probe, resolve

MARKER = "dataset.json"  # written last: the dataset is complete
PARTIAL = "dataset.partial.json"  # written first, deleted after MARKER: a prepare under way or cut short
TOKENIZER_COPY = "tokenizer.json"
VAL_ID_OFFSET = 1 << 40  # validation ids never collide with train ids
FORMAT = 1
TASK_BYTES = 64 << 20  # input bytes per read task: enough work per task, many tasks per cluster
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]")  # first one present wins
WIDTHS = {"uint8": 1, "uint16": 2, "uint32": 4}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BadInput(ValueError):
    """Input text that cannot be tokenized (not UTF-8, not JSON, no such field). A Ray task
    returns it as its file's `error` (Ray would ship only its traceback's text); the driver
    reports the first, in file order, as a user error."""


# --- pure parts: widths, counts, ids, packing ------------------------------------------------

def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned width holding every token id: uint8, uint16 or uint32."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"


def split_counts(samples: int, val_fraction: float, val_samples: int | None = None) -> tuple[int, int]:
    """(train, val) samples: val_samples exactly, else round(samples * val_fraction), at least one
    when the fraction is above 0; at least one train sample is left."""
    if val_samples is None:
        val_samples = round(samples * val_fraction)
        if val_fraction > 0:
            val_samples = max(1, val_samples)
    train = samples - val_samples
    if train < 1:
        raise UserError(f"the input makes {samples} samples, too few for {val_samples} validation "
                        "samples and at least one train sample; add text, lower --val-fraction "
                        "or --seq-len")
    return train, val_samples


@dataclass(frozen=True)
class Part:
    """One output file: `rows` samples from stream position `first`; ids from `first_id`."""

    kind: str  # "train" or "val"
    number: int
    first: int
    rows: int
    first_id: int

    @property
    def rel(self) -> str:
        return f"{self.kind}/part-{self.number:05d}.parquet"

    def ids(self) -> np.ndarray:
        return np.arange(self.first_id, self.first_id + self.rows, dtype=np.int64)


def layout(n_train: int, n_val: int, rows_per_file: int) -> list[Part]:
    """The files, in stream order: train samples 0..n_train-1 (id = position), then the
    validation samples (id = VAL_ID_OFFSET + j), rows_per_file to a file (the last one fewer)."""
    parts = []
    for kind, first, count, id0 in (("train", 0, n_train, 0), ("val", n_train, n_val, VAL_ID_OFFSET)):
        for number, lo in enumerate(range(0, count, rows_per_file)):
            parts.append(Part(kind, number, first + lo, min(rows_per_file, count - lo), id0 + lo))
    return parts


def pack(chunks: Iterable[np.ndarray], sample_tokens: int, samples: int) -> Iterator[np.ndarray]:
    """The concatenated chunks cut into rows of sample_tokens, yielded as [k, sample_tokens]
    arrays in order, `samples` rows in all; tokens past them are never used."""
    carry: np.ndarray | None = None
    done = 0
    for chunk in chunks:
        if done == samples:
            return
        buf = chunk if carry is None or not len(carry) else np.concatenate([carry, chunk])
        whole = min(len(buf) // sample_tokens, samples - done)
        if whole:
            yield buf[:whole * sample_tokens].reshape(whole, sample_tokens)
            done += whole
        carry = buf[whole * sample_tokens:]
    if done != samples:
        raise RuntimeError(f"the token stream ended after {done} samples, {samples} were counted")


def regroup(rows: Iterable[np.ndarray], sizes: list[int]) -> Iterator[np.ndarray]:
    """Row blocks in any sizes -> blocks of exactly sizes[0], sizes[1], ... rows, in order."""
    pending: list[np.ndarray] = []
    have = 0
    it = iter(sizes)
    want = next(it, None)
    for block in rows:
        pending.append(block)
        have += len(block)
        while want is not None and have >= want:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield joined[:want]
            rest = joined[want:]
            pending, have = ([rest] if len(rest) else []), len(rest)
            want = next(it, None)
    if want is not None:
        raise RuntimeError(f"the samples ran out before a file of {want} rows was filled")


def part_table(part: Part, samples: np.ndarray, dtype: str) -> pa.Table:
    """id int64 and tokens binary (each row seq_len + 1 little-endian tokens)."""
    data = np.ascontiguousarray(samples.astype(np.dtype(dtype).newbyteorder("<"), copy=False))
    row_bytes = data.shape[1] * data.itemsize
    offsets = np.arange(len(data) + 1, dtype=np.int32) * row_bytes
    tokens = pa.Array.from_buffers(pa.binary(), len(data), [None, pa.py_buffer(offsets),
                                                            pa.py_buffer(data.tobytes())])
    return pa.table({"id": pa.array(part.ids(), pa.int64()), "tokens": tokens})


# --- documents and tokenizers (these run in Ray tasks) -----------------------------------------

def documents(data: bytes, fmt: str, field: str, name: str, as_text: bool) -> list:
    """The documents of one input file, in order: the whole file (text), or the `field` of each
    non-empty JSONL line. as_text: str (for a tokenizers tokenizer) rather than bytes."""
    if fmt == "text":
        if not as_text:
            return [data] if data else []
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"{name} is not UTF-8 text (byte {e.start}); a tokenizers tokenizer "
                           "reads text: fix the file, or --tokenizer bytes") from None
        return [text] if text else []
    docs = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise BadInput(f"{name} line {number}: not JSON ({e}); --format jsonl reads one JSON "
                           "object per line") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise BadInput(f"{name} line {number}: no text field {field!r} (a string); --field "
                           "names the field that holds the text")
        if value:
            docs.append(value if as_text else value.encode("utf-8"))
    return docs


_ENCODERS: dict = {}  # sha256 -> tokenizers.Tokenizer, once per worker process


def encode(docs: list, tokenizer: dict, dtype: str) -> np.ndarray:
    """The documents' tokens, concatenated, each document followed by the end-of-text id if the
    tokenizer has one. tokenizer: TokenizerSpec.shipped()."""
    eos = tokenizer["eos_id"]
    if tokenizer["kind"] == "bytes":
        return np.frombuffer(b"".join(docs), dtype=np.uint8).astype(dtype, copy=False)
    enc = _ENCODERS.get(tokenizer["sha256"])
    if enc is None:
        from tokenizers import Tokenizer

        enc = _ENCODERS[tokenizer["sha256"]] = Tokenizer.from_str(tokenizer["json"])
    pieces = []
    for e in enc.encode_batch(docs, add_special_tokens=False):  # our separator, not the post-processor's
        pieces.append(np.asarray(e.ids, dtype=dtype))
        if eos is not None:
            pieces.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def tokenize_files(batch: pa.Table, tokenizer: dict, fmt: str, field: str, dtype: str) -> pa.Table:
    """Ray Data map_batches: input files (index, path, data) -> one row each (index, documents,
    count, tokens: the little-endian token bytes, error: why the file cannot be used, or "")."""
    index, docs_n, counts, out, errors = [], [], [], [], []
    for i, path, data in zip(batch.column("index").to_pylist(), batch.column("path").to_pylist(),
                             batch.column("data").to_pylist()):
        try:
            docs = documents(data, fmt, field, path, as_text=tokenizer["kind"] != "bytes")
            error = ""
        except BadInput as e:
            docs, error = [], str(e)
        tokens = encode(docs, tokenizer, dtype)
        index.append(i)
        docs_n.append(len(docs))
        counts.append(len(tokens))
        out.append(tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
        errors.append(error)
    return pa.table({"index": pa.array(index, pa.int64()), "documents": pa.array(docs_n, pa.int64()),
                     "count": pa.array(counts, pa.int64()), "tokens": pa.array(out, pa.large_binary()),
                     "error": pa.array(errors, pa.string())})


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "bytes" or "tokenizers"
    vocab_size: int
    eos_id: int | None = None
    eos_token: str | None = None
    path: str | None = None
    text: str | None = None  # the tokenizer.json, shipped to the tasks
    sha256: str | None = None

    def record(self) -> dict:
        """What dataset.json says about it."""
        out = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
               "eos_token": self.eos_token}
        if self.kind == "tokenizers":
            out.update({"path": self.path, "sha256": self.sha256, "file": TOKENIZER_COPY})
        return out

    def shipped(self) -> dict:
        return {"kind": self.kind, "eos_id": self.eos_id, "sha256": self.sha256, "json": self.text}


def load_tokenizer(arg: str) -> TokenizerSpec:
    """'bytes' (one token per byte), or a Hugging Face `tokenizers` tokenizer.json (local or gs://)."""
    if arg == "bytes":
        return TokenizerSpec("bytes", 256)
    where = f"--tokenizer {arg}"
    try:
        loc = resolve(arg)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{where}: no such file; give 'bytes' or a Hugging Face tokenizers "
                        "tokenizer.json")
    if info.type != pafs.FileType.File:
        raise UserError(f"{where} is a folder; give the tokenizer.json file in it")
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read it ({_first_line(e)})") from None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception for bad JSON or an unknown model
        raise UserError(f"{where}: not a Hugging Face tokenizers tokenizer.json ({_first_line(e)})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
        raise UserError(f"{where}: the tokenizer has an empty vocabulary")
    eos = next((t for t in EOS_TOKENS if t in vocab), None)
    return TokenizerSpec("tokenizers", max(vocab.values()) + 1, eos_id=vocab.get(eos) if eos else None,
                         eos_token=eos, path=loc.uri, text=text, sha256=hashlib.sha256(raw).hexdigest())


# --- the input files -----------------------------------------------------------------------------

def list_inputs(spec: str) -> tuple[Location, list[tuple[str, int]]]:
    """The files --input names, sorted by path, with their sizes: a file, a folder (every file
    below it, except names starting with '.' or '_'), or a glob (local: the shell's rules;
    gs://: '*' and '?' within a path segment, '**' across segments)."""
    where = f"--input {spec}"
    glob_at = next((i for i, c in enumerate(spec) if c in "*?["), None)
    base = spec if glob_at is None else spec[:spec.rfind("/", 0, glob_at) + 1] or "."
    try:
        loc = resolve(base)
        probe(loc)  # gs://: a missing bucket or no credentials in seconds
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    except StorageUnreachable as e:
        raise UserError(f"--input {e}") from None
    try:
        if glob_at is not None:
            files = _glob(loc, spec[len(base):] if base != "." else spec)
        else:
            info = loc.fs.get_file_info(loc.path)
            if info.type == pafs.FileType.File:
                files = [(loc.path, info.size)]
            else:
                sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
                files = [(i.path, i.size) for i in loc.fs.get_file_info(sel)
                         if i.type == pafs.FileType.File and not _hidden(i.path[len(loc.path):])]
                if not files and info.type == pafs.FileType.NotFound:
                    raise UserError(f"{where}: no such file or folder")
    except OSError as e:
        raise UserError(f"{where}: cannot list it ({_first_line(e)})") from None
    if not files:
        raise UserError(f"{where}: matches no files")
    if not any(size for _, size in files):
        raise UserError(f"{where}: the {len(files)} file(s) it matches are empty")
    return loc, sorted(files)


def _glob(loc: Location, pattern: str) -> list[tuple[str, int]]:
    if loc.fs.type_name == "local":
        found = glob.glob(join(loc.path, pattern), recursive=True)
        return [(p, os.path.getsize(p)) for p in found if os.path.isfile(p)]
    want = [s for s in pattern.split("/") if s]
    sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    return [(i.path, i.size) for i in loc.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and _match(want, [s for s in i.path[len(loc.path):].split("/") if s])]


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def _hidden(rel: str) -> bool:
    return any(s.startswith((".", "_")) for s in rel.split("/") if s)


def read_files(fs_uri: str, files: list[tuple[int, str]]) -> Iterator[pa.Table]:
    """A Ray Data read task: each file whole, one block per file, tagged with its index."""
    fs = resolve(fs_uri).fs
    for i, path in files:
        with fs.open_input_stream(path) as f:
            data = f.read()
        yield pa.table({"index": pa.array([i], pa.int64()), "path": pa.array([path]),
                        "data": pa.array([data], pa.large_binary())})


# --- --out ---------------------------------------------------------------------------------------

def check_out(out: Location, name: str = "--out") -> None:
    """Before anything runs: --out is a new or empty folder, or the leftovers of a prepare that
    was cut short (PARTIAL there), which this one replaces."""
    try:
        probe(out, writable=True)
        info = out.fs.get_file_info(out.path)
        if info.type == pafs.FileType.File:
            raise UserError(f"{name} {out.uri} is a file; give a folder for the dataset")
        if out.fs.get_file_info(join(out.path, MARKER)).type == pafs.FileType.File:
            raise UserError(f"{name} {out.uri} already holds a complete dataset ({MARKER}); give a "
                            f"new folder, or delete {out.uri} to prepare it again")
        found = [i.path[len(out.path):].strip("/") for i in out.fs.get_file_info(
            pafs.FileSelector(out.path, recursive=True, allow_not_found=True)) if i.type == pafs.FileType.File]
    except StorageUnreachable as e:
        raise UserError(f"{name} {e}") from None
    except OSError as e:
        raise UserError(f"{name} {out.uri}: cannot use it ({_first_line(e)})") from None
    if found and PARTIAL not in found:
        raise UserError(f"{name} {out.uri} is not empty (it holds {sorted(found)[0]}, ...); give a "
                        "new or empty folder")
    foreign = [f for f in found if not _ours(f)]
    if foreign:
        raise UserError(f"{name} {out.uri} holds {foreign[0]} beside an unfinished dataset; give a new "
                        "or empty folder")


def _ours(rel: str) -> bool:
    if rel in (PARTIAL, TOKENIZER_COPY, MARKER):
        return True
    folder, _, name = rel.partition("/")
    return folder in ("train", "val") and "/" not in name and fnmatch.fnmatchcase(name, "part-*.parquet*")


def _put(out: Location, rel: str, data: bytes) -> None:
    """A whole file or nothing: on local disk a temp name of its own, then a rename; a GCS
    object appears only once its upload completes."""
    final = join(out.path, rel)
    if out.fs.type_name != "local":
        with out.fs.open_output_stream(final) as f:
            f.write(data)
        return
    out.fs.create_dir(posixpath.dirname(final), recursive=True)
    tmp = f"{final}.{uuid.uuid4().hex}.tmp"  # never a shared temp name: two preparers at once
    with out.fs.open_output_stream(tmp) as f:
        f.write(data)
    out.fs.move(tmp, final)


# --- the command ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Options:
    input: str
    out: str
    format: str = "text"
    field: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 1024
    val_fraction: float = 0.01
    val_samples: int | None = None
    rows_per_file: int = 10_000
    row_group_size: int = 1_000

    def check(self) -> None:
        for flag, value in (("--seq-len", self.seq_len), ("--rows-per-file", self.rows_per_file),
                            ("--row-group-size", self.row_group_size)):
            if value < 1:
                raise UserError(f"{flag} {value}: must be a positive whole number")
        if not 0 <= self.val_fraction < 1:  # nan fails too
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.val_samples is not None and self.val_samples < 0:
            raise UserError(f"--val-samples {self.val_samples}: must be >= 0")
        if self.format not in ("text", "jsonl"):
            raise UserError(f"--format {self.format}: must be text or jsonl")
        if not self.field:
            raise UserError("--field: must not be empty")


def prepare(opts: Options, extra: dict | None = None, out_name: str = "--out", verbose: bool = True) -> dict:
    """Check, tokenize with Ray Data, pack and write; returns dataset.json's content. extra:
    more keys for dataset.json (the test corpus records what it was built for). verbose: Ray's
    and Ray Data's INFO lines and progress bars (a train job's test corpus: only with --verbose)."""
    opts.check()
    try:
        out = resolve(opts.out)
    except ValueError as e:
        raise UserError(f"{out_name} {opts.out}: {e}") from None
    check_out(out, out_name)
    source, files = list_inputs(opts.input)
    tokenizer = load_tokenizer(opts.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    sample_tokens = opts.seq_len + 1
    print(f"📚 {len(files)} input file(s), {sum(s for _, s in files):,} bytes; tokenizer "
          f"{tokenizer.path or 'bytes'} ({tokenizer.vocab_size:,} ids: {dtype}"
          f"{f', end-of-text {tokenizer.eos_token}' if tokenizer.eos_token else ''}); samples of "
          f"{sample_tokens} tokens", flush=True)

    with ray_session(verbose):
        ds = tokenized(source, files, tokenizer, opts, dtype)
        if not verbose:
            from ray.util.debug import log_once

            ds.context.enable_progress_bars = False
            log_once("ray_data_progress_manager_disabled")  # its "Progress bars disabled" warning: meant
        ds = ds.materialize()
        counts = sorted(ds.select_columns(["index", "documents", "count", "error"]).take_all(),
                        key=lambda r: r["index"])
        if [r["index"] for r in counts] != list(range(len(files))):
            raise RuntimeError(f"Ray Data returned {len(counts)} rows, not one for each of the "
                               f"{len(files)} input files")
        errors = [r["error"] for r in counts if r["error"]]
        if errors:
            more = f" (and {len(errors) - 1} more file(s))" if len(errors) > 1 else ""
            raise UserError(f"--input {opts.input}: {errors[0]}{more}")
        total = sum(int(r["count"]) for r in counts)
        documents_n = sum(int(r["documents"]) for r in counts)
        samples = total // sample_tokens
        if samples == 0:
            raise UserError(f"--input {opts.input}: {total} tokens in {documents_n} document(s), fewer "
                            f"than one sample of {sample_tokens} (--seq-len {opts.seq_len} + 1); add "
                            "text or lower --seq-len")
        n_train, n_val = split_counts(samples, opts.val_fraction, opts.val_samples)
        parts = layout(n_train, n_val, opts.rows_per_file)
        marker = {
            "format": FORMAT, "seq_len": opts.seq_len, "sample_tokens": sample_tokens,
            "vocab_size": tokenizer.vocab_size, "token_dtype": dtype, "byte_order": "little",
            "tokenizer": tokenizer.record(),
            "train": {"samples": n_train, "files": sum(p.kind == "train" for p in parts)},
            "val": {"samples": n_val, "files": sum(p.kind == "val" for p in parts),
                    "fraction": opts.val_fraction if opts.val_samples is None else None},
            "rows_per_file": opts.rows_per_file, "row_group_size": opts.row_group_size,
            "val_id_offset": VAL_ID_OFFSET,
            "input": {"uri": opts.input, "format": opts.format,
                      "field": opts.field if opts.format == "jsonl" else None,
                      "files": len(files), "bytes": sum(s for _, s in files),
                      "documents": documents_n, "tokens": total,
                      "tokens_dropped": total - samples * sample_tokens},
            **(extra or {}),
        }
        write(out, ds, parts, marker, sample_tokens, dtype, opts.row_group_size, tokenizer, verbose)
    print(f"✅ {out.uri}: {n_train:,} train samples in {marker['train']['files']} file(s), {n_val:,} "
          f"validation samples in {marker['val']['files']}; {MARKER} written last", flush=True)
    return marker


def tokenized(source: Location, files: list[tuple[str, int]], tokenizer: TokenizerSpec, opts: Options,
              dtype: str):
    """The Ray Dataset of tokenized files (one row per input file), in file order."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    groups, run, size = [], [], 0  # consecutive files, ~TASK_BYTES a task
    for i, (path, n) in enumerate(files):
        run.append((i, path))
        size += n
        if size >= TASK_BYTES:
            groups.append(run)
            run, size = [], 0
    if run:
        groups.append(run)
    sizes = dict(files)
    fs_uri = source.uri

    class InputFiles(Datasource):
        def get_name(self) -> str:
            return "ReadInputText"

        def estimate_inmemory_data_size(self) -> int:
            return sum(sizes.values())

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(_bind(read_files, fs_uri, g),
                             BlockMetadata(num_rows=len(g), size_bytes=sum(sizes[p] for _, p in g),
                                           input_files=[p for _, p in g], exec_stats=None))
                    for g in groups]

    ds = ray.data.read_datasource(InputFiles(), override_num_blocks=len(groups))
    ds.context.execution_options.preserve_order = True  # this pipeline's context, not the process's
    return ds.map_batches(tokenize_files, batch_size=None, batch_format="pyarrow",
                          fn_kwargs={"tokenizer": tokenizer.shipped(), "fmt": opts.format,
                                     "field": opts.field, "dtype": dtype})


def write(out: Location, ds, parts: list[Part], marker: dict, sample_tokens: int, dtype: str,
          row_group_size: int, tokenizer: TokenizerSpec, progress: bool = True) -> None:
    """PARTIAL, the part files in stream order (stale parts of a cut-short prepare removed),
    the tokenizer's copy, then MARKER; then PARTIAL goes."""
    from tqdm import tqdm

    _put(out, PARTIAL, _json({k: marker[k] for k in ("seq_len", "token_dtype", "train", "val", "input")}))
    keep = {p.rel for p in parts}
    for info in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True, allow_not_found=True)):
        rel = info.path[len(out.path):].strip("/")
        if info.type == pafs.FileType.File and _ours(rel) and rel.endswith(".parquet") and rel not in keep:
            out.fs.delete_file(info.path)  # a cut-short prepare's part that this layout has not
    expected = iter(range(marker["input"]["files"]))

    def chunks() -> Iterator[np.ndarray]:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            for i, blob in zip(batch.column("index").to_pylist(), batch.column("tokens").to_pylist()):
                if i != next(expected, None):  # Ray Data keeps the order under preserve_order; check
                    raise RuntimeError(f"Ray Data returned input file {i} out of order")
                yield np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<"))

    total = sum(p.rows for p in parts)
    bar = tqdm(total=total, desc="Writing samples", unit="sample", mininterval=1.0, file=sys.stdout,
               disable=not progress)
    rows = pack(chunks(), sample_tokens, total)
    for part, samples in zip(parts, regroup(rows, [p.rows for p in parts])):
        buf = io.BytesIO()
        pq.write_table(part_table(part, samples, dtype), buf, row_group_size=row_group_size)
        _put(out, part.rel, buf.getvalue())
        bar.update(part.rows)
    bar.close()
    if tokenizer.text is not None:
        _put(out, TOKENIZER_COPY, tokenizer.text.encode("utf-8"))
    _put(out, MARKER, _json(marker))  # last: from here on the dataset is complete
    try:
        out.fs.delete_file(join(out.path, PARTIAL))
    except FileNotFoundError:  # another prepare of the same folder was first
        pass


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _bind(fn, *args):
    def read():
        return fn(*args)
    read.__name__ = fn.__name__
    return read


@contextmanager
def ray_session(verbose: bool = True):
    """Ray for this prepare: the one running in this process, else RAY_ADDRESS's cluster (as
    `ray job submit` gives), else a local Ray, shut down at the end. ray_job.train prepares the
    test corpus with this before its own Ray starts, so the train job's Ray keeps its settings.
    Not verbose: Ray's and Ray Data's INFO lines stay out of the output (as in ray_job/launch.py)."""
    if (os.environ.get("RAY_ADDRESS") and "RAY_AUTH_MODE" not in os.environ
            and os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
        os.environ["RAY_AUTH_MODE"] = "token"  # read when ray is imported (as in ray_job/launch.py)
    import ray
    import ray.data  # configures the "ray.data" logger on import: quieted below, after it

    data_log = logging.getLogger("ray.data")
    level = data_log.level
    if not verbose:
        data_log.setLevel(logging.WARNING)  # this process runs the plan: its lines are logged here
    started = not ray.is_initialized()
    if started:
        env = {} if verbose else {"RAY_DATA_LOG_LEVEL": "WARNING"}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a submitted job ships its working dir
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
        if os.environ.get("STORAGE_EMULATOR_HOST"):  # read tasks must see the driver's GCS
            env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
        kwargs = {} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
        if not verbose:
            kwargs["logging_level"] = logging.WARNING
        ray.init(runtime_env={"env_vars": env} if env else None, **kwargs)
    try:
        yield
    finally:
        data_log.setLevel(level)
        if started:
            ray.shutdown()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ray_job.prepare_data",
                description="Turn text (local or gs://) into the train/val parquet layout the "
                            "trainer reads, with Ray Data.")
    p.add_argument("--input", required=True, help="a file, a folder, or a glob; local or gs://")
    p.add_argument("--out", required=True, help="a new (or empty) folder, local or gs://")
    p.add_argument("--format", default="text", choices=("text", "jsonl"),
                   help="text: a file is a document; jsonl: a line is a document (default text)")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default text)")
    p.add_argument("--tokenizer", default="bytes",
                   help="'bytes' (256 ids) or a Hugging Face tokenizers tokenizer.json (default bytes)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="model.seq_len; samples hold seq_len + 1 tokens (default 1024)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of the samples, taken from the end, for validation (default 0.01)")
    p.add_argument("--val-samples", type=int, help="exactly this many validation samples instead")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="samples per parquet file (default 10000)")
    p.add_argument("--row-group-size", type=int, default=1_000,
                   help="samples per row group: a resume decodes from the one holding its cursor (default 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = Options(input=args.input, out=args.out, format=args.format, field=args.field,
                   tokenizer=args.tokenizer, seq_len=args.seq_len, val_fraction=args.val_fraction,
                   val_samples=args.val_samples, rows_per_file=args.rows_per_file,
                   row_group_size=args.row_group_size)
    try:
        prepare(opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {opts.out} is unfinished ({MARKER} not written): run the same "
              "command again to replace it", file=sys.stderr)
        return 130
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
