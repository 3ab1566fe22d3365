"""Your own text (issue 11): a BPE tokenizer trained here with `tokenizers` on local text (nothing
downloaded), a dataset prepared with it by `python -m ray_job.prepare_data` through Ray Data on
the session's cluster, twice: from local files to a local folder, and from the same files in a
bucket (the GCS API server) to the bucket, with the same ids and bytes; read back against the
tokenizer applied here, then trained on for a few steps. Bad input: exit 2, one line, nothing
written, no Ray."""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from data.index import read_all
from data.prepare import MARKER, PARTIAL, VAL_ID_OFFSET
from ray_job import launcher

SEQ_LEN, VOCAB = 64, 400
ARGS = ["--format", "jsonl", "--seq-len", SEQ_LEN, "--val-fraction", 0.1, "--rows-per-file", 16,
        "--row-group-size", 4]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three JSONL files of this Python's stdlib sources (one document a line, a blank line and
    an extra field among them), and a byte-level BPE of VOCAB ids trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("own-text")
    (root / "text").mkdir()
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:12]
    texts = [Path(p).read_text(encoding="utf-8")[:4000] for p in sources]
    for k in range(3):  # written c, b, a: the command sorts them
        with open(root / "text" / f"{'abc'[2 - k]}.jsonl", "w") as f:
            for n, text in enumerate(texts[k * 4:(k + 1) * 4]):
                f.write(json.dumps({"text": text, "n": n}) + ("\n\n" if n == 1 else "\n"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def prepared(corpus, ray_address, gcs):
    """The same command twice: local files into corpus/a, the same files in the bucket into
    gs://ckpts/own-text/b (downloaded to corpus/b)."""
    local = launcher.run(["--input", corpus / "text" / "*.jsonl", "--tokenizer", corpus / "tokenizer.json",
                          "--out", corpus / "a", *ARGS], module="ray_job.prepare_data", ray_address=ray_address)
    assert local.rc == 0, local.out[-4000:]
    bucket = gcs.client().bucket("ckpts")
    for f in [*(corpus / "text").glob("*.jsonl"), corpus / "tokenizer.json"]:
        bucket.blob(f"own-text/in/{f.name}").upload_from_filename(str(f))
    remote = launcher.run(["--input", "gs://ckpts/own-text/in/*.jsonl", "--tokenizer",
                           "gs://ckpts/own-text/in/tokenizer.json", "--out", "gs://ckpts/own-text/b", *ARGS],
                          module="ray_job.prepare_data", ray_address=ray_address, emulator=gcs.url)
    assert remote.rc == 0, remote.out[-4000:]
    for blob in bucket.list_blobs(prefix="own-text/b/"):
        path = corpus / "b" / blob.name[len("own-text/b/"):]
        path.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(path))
    return local, remote


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_input_same_ids_and_bytes_tokens_as_the_tokenizer_gives(corpus, prepared):
    from tokenizers import Tokenizer

    a, b = _files(corpus / "a"), _files(corpus / "b")
    meta, meta_b = json.loads(a.pop(MARKER)), json.loads(b.pop(MARKER))
    assert a == b  # every parquet file and tokenizer.json, byte for byte
    assert meta_b["input"].pop("uri").startswith("gs://") and meta_b["tokenizer"].pop("path").startswith("gs://")
    meta_a = json.loads((corpus / "a" / MARKER).read_text())
    meta_a["input"].pop("uri"), meta_a["tokenizer"].pop("path")
    assert meta_a == meta_b  # dataset.json too, but for where the input was
    assert "MapBatches(tokenize_files)" in prepared[0].out  # Ray Data tokenized
    assert meta["token_dtype"] == "uint16" and meta["vocab_size"] <= VOCAB and meta["vocab_size"] > 256
    assert meta["seq_len"] == SEQ_LEN and meta["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert PARTIAL not in a and "tokenizer.json" in a and "train/part-00000.parquet" in a
    n_train, n_val = meta["train"]["samples"], meta["val"]["samples"]
    assert n_val == round((n_train + n_val) * 0.1) and meta["train"]["files"] == -(-n_train // 16)

    fs = pafs.LocalFileSystem()
    train_ids, train = read_all(fs, str(corpus / "a" / "train"), "uint16")
    val_ids, val = read_all(fs, str(corpus / "a" / "val"), "uint16")
    assert train_ids.tolist() == list(range(n_train))
    assert val_ids.tolist() == [VAL_ID_OFFSET + j for j in range(n_val)]
    # The stream, independently: files sorted, each line's text encoded, end-of-text after each.
    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    stream = []
    for path in sorted((corpus / "text").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                stream += tok.encode(json.loads(line)["text"], add_special_tokens=False).ids + [eos]
    samples = np.concatenate([train, val])
    assert samples.shape == (n_train + n_val, SEQ_LEN + 1) and samples.dtype == np.dtype("<u2")
    assert samples.reshape(-1).tolist() == stream[:samples.size]
    assert samples.max() > 255  # the width is needed


def test_trains_on_it_and_refuses_a_model_it_does_not_fit(corpus, prepared, ray_address, tmp_path):
    vocab = json.loads((corpus / "a" / MARKER).read_text())["vocab_size"]
    common = ["--config", "test", "--storage", tmp_path, "--set", f"data.path={corpus / 'a'}",
              "--set", "data.prepare=none", "--checkpoint-every", 4]
    small = launcher.run([*common, "--set", "model.vocab_size=256"], ray_address=ray_address)
    assert small.rc == 2 and small.err.strip().splitlines() == [small.err.strip()], small.err
    assert f"--set model.vocab_size={vocab}" in small.err and small.took < 15
    run = launcher.run([*common, "--set", f"model.vocab_size={vocab}", "--max-steps", 4], ray_address=ray_address)
    assert run.rc == 0, run.out[-4000:]
    [ckpt] = (tmp_path / "test").glob("checkpoint-epoch0-step4-files*")
    metrics = json.loads((ckpt / "training_metrics.json").read_text())
    assert json.dumps(metrics)  # validation ran on the uint16 val set at the last step
    assert any(np.isfinite(v) for _, v in metrics["val_history"]), metrics


BAD = {  # name: (arguments, what the one line says); --out is {out}, never written
    "missing input": (["--input", "{root}/nope/*.txt"], "matches no files"),
    "missing folder": (["--input", "{root}/nope"], "no such file or folder"),
    "empty input": (["--input", "{root}/empty"], "are empty"),
    "bad tokenizer": (["--input", "{root}/text", "--tokenizer", "{root}/text/a.jsonl"],
                      "not a Hugging Face tokenizers tokenizer.json"),
    "bad number": (["--input", "{root}/text", "--seq-len", "-3"], "--seq-len -3: must be a positive"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_written(case, corpus):
    args, message = BAD[case]
    (corpus / "empty").mkdir(exist_ok=True)
    (corpus / "empty" / "blank.txt").write_text("")
    argv = [a.replace("{root}", str(corpus)) for a in args] + ["--out", str(corpus / "never")]
    p = launcher.run(argv, module="ray_job.prepare_data", environ=launcher.env(), timeout=60)
    lines = p.err.strip().splitlines()
    assert p.rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.err
    assert message in lines[0] and "Traceback" not in p.out and p.took < 15
    assert not (corpus / "never").exists()
