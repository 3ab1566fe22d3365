"""data/prepare.py without Ray: token widths, train/val counts, ids by position, packing
across document and file boundaries, the writer (fed a stand-in for the tokenized dataset),
documents and tokenizers, the input and --out checks, and the bad-input contract of main().
data_check's reading of dataset.json too: what the trainer refuses before Ray starts."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from configs import load, with_overrides
from data import checks as data_check
from data import index as data_mod
from data import prepare as pd
from data import stream as ingest
from data.index import build_index
from ray_job.errors import UserError
from storage.location import resolve


@pytest.mark.parametrize("vocab, dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"), (400, "uint16"),
                                          (65536, "uint16"), (65537, "uint32"), (200_000, "uint32")])
def test_token_width_is_the_narrowest_that_holds_every_id(vocab, dtype):
    assert pd.token_dtype(vocab) == dtype
    assert np.iinfo(dtype).max >= vocab - 1


def test_train_val_counts():
    assert pd.split_counts(100, 0.1) == (90, 10)
    assert pd.split_counts(100, 0.001) == (99, 1)  # a fraction above 0 gives at least one
    assert pd.split_counts(100, 0.0) == (100, 0)
    assert pd.split_counts(416, 0.5, val_samples=32) == (384, 32)  # exact count wins
    with pytest.raises(UserError, match="too few"):
        pd.split_counts(1, 0.5)
    with pytest.raises(UserError, match="too few"):
        pd.split_counts(10, 0.0, val_samples=10)


def test_layout_ids_are_positions_and_val_ids_are_offset():
    parts = pd.layout(130, 7, 64)
    assert [(p.rel, p.first, p.rows) for p in parts] == [
        ("train/part-00000.parquet", 0, 64), ("train/part-00001.parquet", 64, 64),
        ("train/part-00002.parquet", 128, 2), ("val/part-00000.parquet", 130, 7)]
    ids = np.concatenate([p.ids() for p in parts])
    assert ids[:130].tolist() == list(range(130))
    assert ids[130:].tolist() == [pd.VAL_ID_OFFSET + j for j in range(7)]
    assert [p.rel for p in pd.layout(5, 0, 10)] == ["train/part-00000.parquet"]


def test_pack_cuts_the_stream_across_chunk_boundaries_and_drops_the_tail():
    rng = np.random.default_rng(1)
    sizes = [0, 3, 130, 1, 0, 64, 65, 7, 200]
    chunks = [rng.integers(0, 60000, n, dtype=np.uint16) for n in sizes]
    stream = np.concatenate(chunks)
    for L in (1, 5, 65, 64):
        n = len(stream) // L
        got = np.concatenate(list(pd.pack(iter(chunks), L, n)))
        assert got.shape == (n, L) and (got.reshape(-1) == stream[:n * L]).all()
        fewer = np.concatenate(list(pd.pack(iter(chunks), L, n // 2)))
        assert fewer.shape == (n // 2, L) and (fewer.reshape(-1) == stream[:(n // 2) * L]).all()
    with pytest.raises(RuntimeError, match="ended after"):
        list(pd.pack(iter(chunks), 65, len(stream) // 65 + 1))


def test_regroup_gives_exact_file_sizes_in_order():
    rows = np.arange(100 * 3).reshape(100, 3)
    blocks = [rows[a:b] for a, b in [(0, 1), (1, 40), (40, 41), (41, 99), (99, 100)]]
    out = list(pd.regroup(iter(blocks), [30, 30, 30, 10]))
    assert [len(b) for b in out] == [30, 30, 30, 10]
    assert (np.concatenate(out) == rows).all()
    with pytest.raises(RuntimeError, match="ran out"):
        list(pd.regroup(iter(blocks), [60, 60]))


def test_part_table_stores_little_endian_tokens_as_binary():
    part = pd.Part("train", 0, 0, 2, 0)
    samples = np.array([[1, 258, 65535], [0, 7, 256]], dtype=np.uint16)
    table = part_table_roundtrip(part, samples, "uint16")
    assert table.schema.field("tokens").type == pa.binary()
    assert table.column("tokens").to_pylist()[0] == b"\x01\x00\x02\x01\xff\xff"
    toks = ingest.tokens_of({"tokens": np.array(table.column("tokens").to_pylist(), dtype=object)}, "uint16")
    assert toks.tolist() == samples.tolist()


def part_table_roundtrip(part, samples, dtype) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(pd.part_table(part, samples, dtype), buf)
    return pq.read_table(io.BytesIO(buf.getvalue()))


class Tokenized:
    """A stand-in for the materialized Ray Dataset: one block per input file, in order."""

    def __init__(self, files: list[np.ndarray], dtype: str):
        self.blocks = [pa.table({"index": [i], "tokens": pa.array([a.astype(dtype).tobytes()], pa.large_binary())})
                       for i, a in enumerate(files)]

    def iter_batches(self, **_):
        return iter(self.blocks)


def _write(out_dir, files, seq_len, n_val, rows, rg, dtype="uint8", extra=None):
    out = resolve(str(out_dir))
    L = seq_len + 1
    samples = sum(len(f) for f in files) // L
    parts = pd.layout(samples - n_val, n_val, rows)
    marker = {"seq_len": seq_len, "token_dtype": dtype,
              "train": {"samples": samples - n_val, "files": sum(p.kind == "train" for p in parts)},
              "val": {"samples": n_val}, "input": {"files": len(files)}, **(extra or {})}
    pd.write(out, Tokenized(files, dtype), parts, marker, L, dtype, rg, pd.TokenizerSpec("bytes", 256))
    return marker


def test_writer_gives_todays_test_corpus_byte_for_byte(tmp_path):
    """The stdlib corpus as the old data_prep wrote it: 6 x 64 samples of 65 bytes, row groups of
    10, then 32 val samples; ids by position and VAL_ID_OFFSET + j. The writer reproduces it."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 256, 416 * 65, dtype=np.uint8)
    files = [stream[:1000], stream[1000:1000], stream[1000:20_000], stream[20_000:]]  # one empty
    _write(tmp_path / "out", files, 64, 32, 64, 10)
    samples = [stream[i * 65:(i + 1) * 65].tobytes() for i in range(416)]
    for f in range(6):
        ids = list(range(f * 64, (f + 1) * 64))
        want = io.BytesIO()
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                                 "tokens": pa.array(samples[f * 64:(f + 1) * 64], pa.binary())}),
                       want, row_group_size=10)
        assert (tmp_path / "out" / "train" / f"part-{f:05d}.parquet").read_bytes() == want.getvalue()
    val = pq.read_table(tmp_path / "out" / "val" / "part-00000.parquet")
    assert val.column("id").to_pylist() == [pd.VAL_ID_OFFSET + j for j in range(32)]
    assert val.column("tokens").to_pylist() == samples[384:]
    meta = pq.ParquetFile(tmp_path / "out" / "train" / "part-00000.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [10] * 6 + [4]
    assert sorted(os.listdir(tmp_path / "out")) == ["dataset.json", "train", "val"]  # partial gone


def test_writer_replaces_a_cut_short_prepare_and_keeps_the_marker_last(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / pd.PARTIAL).write_text("{}")
    for n in range(9):  # a cut-short prepare with smaller files: parts 2..8 are stale
        (out / "train" / f"part-{n:05d}.parquet").write_bytes(b"stale")
    pd.check_out(resolve(str(out)))  # leftovers of a prepare: accepted
    stream = np.arange(50 * 9, dtype=np.uint16) * 7
    _write(out, [stream], 8, 5, 20, 4, dtype="uint16")
    assert sorted(os.listdir(out / "train")) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not (out / pd.PARTIAL).exists()
    ids, toks = data_mod.read_all(pafs.LocalFileSystem(), str(out / "train"), "uint16")
    assert ids.tolist() == list(range(45))
    assert (toks.reshape(-1) == stream[:45 * 9]).all()


def test_check_out_refuses_what_is_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        pd.check_out(resolve(str(tmp_path / "afile")))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / pd.MARKER).write_text("{}")
    with pytest.raises(UserError, match="already holds a complete dataset"):
        pd.check_out(resolve(str(tmp_path / "done")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty"):
        pd.check_out(resolve(str(tmp_path / "other")))
    (tmp_path / "other" / pd.PARTIAL).write_text("{}")
    with pytest.raises(UserError, match="holds notes.txt beside an unfinished dataset"):
        pd.check_out(resolve(str(tmp_path / "other")))
    pd.check_out(resolve(str(tmp_path / "new" / "deeper")))  # not there yet: fine
    (tmp_path / "empty").mkdir()
    pd.check_out(resolve(str(tmp_path / "empty")))


def test_documents_text_and_jsonl():
    assert pd.documents(b"ab\ncd", "text", "text", "f", as_text=False) == [b"ab\ncd"]
    assert pd.documents("é".encode(), "text", "text", "f", as_text=True) == ["é"]
    assert pd.documents(b"", "text", "text", "f", as_text=True) == []
    lines = b'{"text": "one"}\n\n{"text": ""}\n{"text": "two", "n": 1}\n'
    assert pd.documents(lines, "jsonl", "text", "f", as_text=True) == ["one", "two"]
    assert pd.documents(lines, "jsonl", "text", "f", as_text=False) == [b"one", b"two"]
    with pytest.raises(pd.BadInput, match="f is not UTF-8 text"):
        pd.documents(b"\xff\xfe", "text", "text", "f", as_text=True)
    with pytest.raises(pd.BadInput, match="f line 2: not JSON"):
        pd.documents(b'{"text": "a"}\n{oops\n', "jsonl", "text", "f", as_text=True)
    with pytest.raises(pd.BadInput, match="f line 1: no text field 'body'"):
        pd.documents(b'{"text": "a"}\n', "jsonl", "body", "f", as_text=True)


def bpe(path, vocab=300, eos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "def f(x): return x"], trainer)
    tok.save(str(path))
    return tok


def test_tokenizers_file_loads_and_encodes_with_end_of_text(tmp_path):
    tok = bpe(tmp_path / "tokenizer.json")
    spec = pd.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert spec.kind == "tokenizers" and spec.eos_token == "<|endoftext|>" and spec.eos_id == 0
    assert spec.vocab_size == max(tok.get_vocab().values()) + 1 and pd.token_dtype(spec.vocab_size) == "uint16"
    got = pd.encode(["the fox", "lazy dog"], spec.shipped(), "uint16")
    want = tok.encode("the fox").ids + [0] + tok.encode("lazy dog").ids + [0]
    assert got.dtype == np.uint16 and got.tolist() == want
    assert pd.encode([], spec.shipped(), "uint16").tolist() == []
    assert pd.encode([b"ab", b"c"], pd.TokenizerSpec("bytes", 256).shipped(), "uint8").tolist() == [97, 98, 99]
    out = pd.tokenize_files(pa.table({"index": [3], "path": ["p"], "data": pa.array([b"the fox"], pa.large_binary())}),
                            spec.shipped(), "text", "text", "uint16")
    assert out.column("index").to_pylist() == [3] and out.column("documents").to_pylist() == [1]
    assert np.frombuffer(out.column("tokens")[0].as_py(), "<u2").tolist() == tok.encode("the fox").ids + [0]
    bpe(tmp_path / "plain.json", eos=False)
    assert pd.load_tokenizer(str(tmp_path / "plain.json")).eos_id is None


def test_bad_tokenizers_are_user_errors(tmp_path):
    (tmp_path / "garbage.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "binary.json").write_bytes(b"\xff\x00")
    with pytest.raises(UserError, match="not a Hugging Face tokenizers tokenizer.json"):
        pd.load_tokenizer(str(tmp_path / "garbage.json"))
    with pytest.raises(UserError, match="cannot read it"):
        pd.load_tokenizer(str(tmp_path / "binary.json"))
    with pytest.raises(UserError, match="no such file"):
        pd.load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="is a folder"):
        pd.load_tokenizer(str(tmp_path))


def test_inputs_are_listed_sorted_and_checked(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden", "_SUCCESS", "e.md"):
        (tmp_path / "d" / name).write_text("x")
    base = str(tmp_path / "d")
    names = lambda files: [os.path.relpath(p, base) for p, _ in files]  # noqa: E731
    assert names(pd.list_inputs(base)[1]) == ["a.txt", "b.txt", "e.md", "sub/c.txt"]
    assert names(pd.list_inputs(base + "/*.txt")[1]) == ["a.txt", "b.txt"]
    assert names(pd.list_inputs(base + "/**/*.txt")[1]) == ["a.txt", "b.txt", "sub/c.txt"]
    assert names(pd.list_inputs(base + "/b.txt")[1]) == ["b.txt"]
    with pytest.raises(UserError, match="no such file or folder"):
        pd.list_inputs(base + "/missing")
    with pytest.raises(UserError, match="matches no files"):
        pd.list_inputs(base + "/*.jsonl")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(UserError, match="are empty"):
        pd.list_inputs(str(tmp_path / "empty"))
    assert pd._match(["**", "*.txt"], ["a", "b", "c.txt"]) and not pd._match(["*.txt"], ["a", "c.txt"])


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("hello " * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tok.json").write_text("{}")
    out = tmp_path / "out"
    ok = ["--input", str(tmp_path / "text.txt"), "--out", str(out)]
    cases = [
        (["--input", str(tmp_path / "nope.txt"), "--out", str(out)], "no such file or folder"),
        (["--input", str(tmp_path / "empty.txt"), "--out", str(out)], "are empty"),
        ([*ok, "--tokenizer", str(tmp_path / "tok.json")], "not a Hugging Face tokenizers"),
        ([*ok, "--tokenizer", str(tmp_path / "none.json")], "no such file"),
        ([*ok, "--seq-len", "0"], "--seq-len 0: must be a positive"),
        ([*ok, "--val-fraction", "1.5"], "--val-fraction 1.5: must be in [0, 1)"),
        ([*ok, "--val-fraction", "nan"], "--val-fraction nan"),
        ([*ok, "--rows-per-file", "-1"], "--rows-per-file -1"),
        ([*ok, "--row-group-size", "0"], "--row-group-size 0"),
        ([*ok, "--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
        ([*ok, "--format", "csv"], "argument --format: invalid choice"),
        (["--input", str(tmp_path / "text.txt"), "--out", str(tmp_path / "text.txt")], "is a file"),
    ]
    for argv, message in cases:
        try:
            rc = pd.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
        assert message in lines[0], (message, lines[0])
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "text.txt", "tok.json"]


def test_a_bad_file_becomes_its_rows_error_not_a_task_failure():
    spec = pd.TokenizerSpec("bytes", 256).shipped()
    batch = pa.table({"index": [0, 1], "path": ["good.jsonl", "bad.jsonl"],
                      "data": pa.array([b'{"text": "ab"}\n', b'{"text": "a"}\n{oops\n'], pa.large_binary())})
    out = pd.tokenize_files(batch, spec, "jsonl", "text", "uint8")
    assert out.column("count").to_pylist() == [2, 0]
    assert out.column("error").to_pylist()[0] == ""
    assert out.column("error").to_pylist()[1].startswith("bad.jsonl line 2: not JSON")


# --- what the trainer reads: dataset.json, checked before Ray -----------------------------------

def cfg(**model):
    return with_overrides(load("test"), {"model": model})


def marker(**over):
    m = {"format": 1, "seq_len": 64, "vocab_size": 300, "token_dtype": "uint16",
         "tokenizer": {"kind": "tokenizers", "path": "/x/tokenizer.json"},
         "train": {"samples": 100, "files": 2}, "val": {"samples": 4, "files": 1}}
    m.update(over)
    return m


def test_dataset_record_against_the_model():
    assert data_check.check_dataset(marker(), cfg(vocab_size=300), "D") == "uint16"
    assert data_check.check_dataset(marker(), cfg(vocab_size=512), "D") == "uint16"  # room to spare
    with pytest.raises(UserError, match=r"data.path D holds samples of 65 tokens .*model.seq_len=32 needs 33"):
        data_check.check_dataset(marker(), cfg(vocab_size=300, seq_len=32), "D")
    with pytest.raises(UserError, match=r"model.vocab_size=256: .*/x/tokenizer.json into 300 token ids.*"
                                        r"--set model.vocab_size=300"):
        data_check.check_dataset(marker(), cfg(vocab_size=256), "D")
    with pytest.raises(UserError, match="model.vocab_size=10: the data holds bytes"):
        data_check.check_dataset(marker(vocab_size=256, token_dtype="uint8", tokenizer={"kind": "bytes"}),
                                 cfg(vocab_size=10), "D")
    for broken in (marker(format=2), marker(token_dtype="uint8"), marker(token_dtype="int16"),
                   marker(seq_len="x"), {k: v for k, v in marker().items() if k != "tokenizer"}, []):
        with pytest.raises(UserError, match="not a dataset record this version reads"):
            data_check.check_dataset(broken, cfg(vocab_size=300), "D")


def test_trainer_refuses_an_unfinished_or_changed_dataset(tmp_path):
    loc = resolve(str(tmp_path))
    assert data_check.token_dtype(loc, cfg()) == "uint8"  # no record: byte tokens, as before
    with pytest.raises(UserError, match="at least 256"):
        data_check.token_dtype(loc, cfg(vocab_size=100))
    (tmp_path / pd.PARTIAL).write_text("{}")
    with pytest.raises(UserError, match="is an unfinished dataset: dataset.partial.json is there"):
        data_check.token_dtype(loc, cfg())
    stream = np.arange(30 * 65, dtype=np.uint16) % 300
    _write(tmp_path, [stream], 64, 2, 10, 5, dtype="uint16",
           extra={"format": 1, "vocab_size": 300, "tokenizer": {"kind": "tokenizers", "path": "t"}})
    index = build_index(loc.fs, loc.path)
    assert data_check.token_dtype(loc, cfg(vocab_size=300), index) == "uint16"
    data_check.check_sample(loc, cfg(vocab_size=300), index.files[0], "train", "uint16")
    with pytest.raises(UserError, match="holds samples of 130 tokens"):  # read as bytes, it is twice as long
        data_check.check_sample(loc, cfg(vocab_size=300), index.files[0], "train", "uint8")
    os.remove(index.files[-1])
    with pytest.raises(UserError, match="records 3 train files of 28 samples, but train/ holds 2 files of 20"):
        data_check.token_dtype(loc, cfg(vocab_size=300), build_index(loc.fs, loc.path))
    (tmp_path / pd.MARKER).write_text("{not json")
    with pytest.raises(UserError, match="dataset.json there is unreadable"):
        data_check.token_dtype(loc, cfg(vocab_size=300))


def test_read_all_and_filler_widths(tmp_path):
    _write(tmp_path, [np.arange(4 * 3, dtype=np.uint32) * 100_000], 2, 1, 10, 10, dtype="uint32")
    ids, toks = data_mod.read_all(pafs.LocalFileSystem(), str(tmp_path / "val"), "uint32")
    assert ids.tolist() == [pd.VAL_ID_OFFSET] and toks.tolist() == [[900_000, 1_000_000, 1_100_000]]
    filler = next(ingest.filler(2, 3 * 4))
    assert ingest.tokens_of({"tokens": np.array(filler.column("tokens").to_pylist(), dtype=object)},
                            "uint32").shape == (2, 3)
    assert json.loads((tmp_path / pd.MARKER).read_text())["token_dtype"] == "uint32"
