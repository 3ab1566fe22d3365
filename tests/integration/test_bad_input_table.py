"""Property 7, table-driven (issue 10): every config or path mistake that is refused before Ray
starts gets exit 2, one line on stderr starting with "error:", no traceback, in seconds, and
leaves storage byte-for-byte as it was (no run folder, no data folder). Needs no Ray cluster:
the CLI runs without RAY_ADDRESS, and none of these may get as far as starting one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from ray_job import launcher
from ray_job.launcher import REPO

CKPT = "checkpoint-epoch0-step4-files1"

# name: (extra CLI args, what stderr must say). "{root}" is the test's folder (see root()).
# "{yaml:FILE}" is replaced by the path of a YAML file written from YAML_FILES below; it
# becomes the --config.
CASES = {
    # --- paths that escape --storage: run and config names are one safe folder name ---------
    "run-name ..": (["--run-name", ".."], "--run-name (checkpoint.run_name): '..' is not a folder name"),
    "run-name ../escaped": (["--run-name", "../escaped"], "--run-name (checkpoint.run_name): '../escaped'"),
    "run-name a/b": (["--run-name", "a/b"], "without '/'"),
    "run-name backslash": (["--run-name", "a\\b"], "without '/' or '\\'"),
    "run-name leading dot": (["--run-name", ".hidden"], "must not start with '.'"),
    "run-name newline": (["--run-name", "a\nb"], "control characters"),
    "run-name empty": (["--run-name", ""], "--run-name (checkpoint.run_name): must not be empty"),
    "set name=../escaped": (["--set", "name=../escaped"], "name: '../escaped'"),
    "set name=..": (["--set", "name=.."], "name: '..' is not a folder name"),
    "set name empty": (["--set", "name="], "name: must not be empty"),
    "set run_name=../x": (["--set", "checkpoint.run_name=../x"], "(checkpoint.run_name): '../x'"),
    "yaml name ../escaped": (["{yaml:named.yaml}"], "name: '../escaped'"),
    "yaml file .hidden.yaml": (["{yaml:.hidden.yaml}"], "name: '.hidden' must not start with '.'"),
    # --- config ranges ------------------------------------------------------------------------
    "worker range that cannot keep G": (["--min-workers", "1", "--num-workers", "4"],
                                        "--min-workers (scaling.min_workers): at 3 workers the global batch "
                                        "cannot be kept"),
    "tracker not installed": (["--set", "logging.trackers=[tensorboard,wandb]"],
                              "logging.trackers: wandb not installed here (pip install wandb)"),
    "tracker unknown": (["--set", "logging.trackers=[tensorbored]"], "logging.trackers: ['tensorbored']"),
    "lr=inf": (["--set", "optim.lr=inf"], "optim.lr: must be a positive number, got inf"),
    "lr=nan": (["--set", "optim.lr=nan"], "optim.lr: must be a positive number, got nan"),
    "lr=0": (["--set", "optim.lr=0"], "optim.lr:"),
    "lr<0": (["--set", "optim.lr=-1e-3"], "optim.lr:"),
    "weight_decay<0": (["--set", "optim.weight_decay=-5"], "optim.weight_decay: must be >= 0"),
    "min_lr_ratio>1": (["--set", "optim.min_lr_ratio=5"], "optim.min_lr_ratio: must be in [0, 1]"),
    "min_lr_ratio<0": (["--set", "optim.min_lr_ratio=-0.5"], "optim.min_lr_ratio: must be in [0, 1]"),
    "grad_clip<0": (["--set", "optim.grad_clip=-1"], "optim.grad_clip: must be >= 0"),
    "val_batch_size=0": (["--set", "train.val_batch_size=0"], "train.val_batch_size: must be positive"),
    "shuffle_seed<0": (["--set", "data.shuffle_seed=-1"], "data.shuffle_seed: must be >= 0"),
    "keep_best without keep_last": (["--set", "checkpoint.keep_best=2"],
                                    "checkpoint.keep_best: needs checkpoint.keep_last > 0"),
    # --- YAML files -----------------------------------------------------------------------------
    "yaml parse error": (["{yaml:parse.yaml}"], "not valid YAML at line"),
    "yaml not UTF-8": (["{yaml:latin1.yaml}"], "not UTF-8 text"),
    "yaml base list": (["{yaml:baselist.yaml}"], "unknown base ['test']"),
    "yaml top-level list": (["{yaml:list.yaml}"], "expected a mapping at the top level"),
    "yaml python tag": (["{yaml:tag.yaml}"], "not valid YAML"),
    # lr: 1e-3 (a string in YAML 1.1) is accepted as a number: the refusal is the next mistake's
    "yaml lr 1e-3 is a number": (["{yaml:lr.yaml}", "--set", "optim.grad_clip=-1"],
                                 "optim.grad_clip: must be >= 0"),
    "lease_stale_s<10": (["--set", "checkpoint.lease_stale_s=5"], "checkpoint.lease_stale_s: must be at least 10"),
    # --- --storage that cannot be written (read-only and full: tests/unit/test_storage_probe.py) --
    "storage is a file": (["--storage", "{root}/afile"],
                          "{root}/afile/test: is under a file ({root}/afile), not a folder"),
    "storage under a file": (["--storage", "{root}/afile/runs"], "is under a file ({root}/afile)"),
    "run folder is a file": (["--run-name", "plainfile"], "{root}/storage/plainfile: is a file, not a folder"),
    # --- --resume that is not a checkpoint folder: refused by its name, never walked ------------
    "resume a file": (["--resume", "{root}/afile"], "{root}/afile is a file; give the checkpoint folder"),
    "resume metadata.json": (["--resume", "{root}/storage/existing-run/" + CKPT + "/metadata.json"],
                             f"(--resume {{root}}/storage/existing-run/{CKPT}?)"),
    "resume /": (["--resume", "/"], "--resume /: / is not a checkpoint folder"),
    "resume a huge folder": (["--resume", "/usr"], "--resume /usr: /usr is not a checkpoint folder"),
    "resume gs:// no credentials": (["--resume", f"gs://some-bucket/runs/r/{CKPT}"],
                                    "no Google Cloud credentials found"),
    # --- data: a fresh run reads one sample of the first train and val file before Ray ----------
    "data is a file": (["--set", "data.path={root}/afile"], "data.path {root}/afile is a file"),
    "prepare=none missing": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/missing"],
                             "does not exist; with data.prepare=none it must already hold"),
    "prepare=none empty": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/empty"],
                           "no train/*.parquet files there (data.prepare=none"),
    "not parquet": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/notparquet"],
                    "part-00000.parquet is not a readable parquet file"),
    "unreadable": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/unreadable"],
                   "part-00000.parquet cannot be opened"),
    "wrong columns": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/columns"],
                      "has columns ['a', 'b']; expected id (int64) and tokens (bytes)"),
    "tokens not bytes": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/intlists"],
                         "tokens is list<element: int64>, expected bytes"),
    "no val": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/noval"],
               "no val/*.parquet files there, and validation is on"),
    "corpus for another seq_len": (["--set", "data.path={root}/datasets/corpus", "--set", "model.seq_len=128"],
                                   "holds a test corpus prepared with seq_len 64 (this config: 128)"),
    "corpus of another size": (["--set", "data.path={root}/datasets/corpus", "--set", "data.train_files=8"],
                               "prepared with train_files 6 (this config: 8)"),
    "old corpus, other seq_len": (["--set", "data.path={root}/datasets/legacy", "--set", "model.seq_len=32"],
                                  "holds samples of 65 tokens, but model.seq_len=32 needs 33"),
    "prepare=none, other seq_len": (["--set", "data.prepare=none", "--set", "data.path={root}/datasets/corpus",
                                     "--set", "model.seq_len=128"], "holds samples of 65 tokens"),
    "vocab_size 10 on bytes": (["--set", "data.path={root}/datasets/corpus", "--set", "model.vocab_size=10"],
                               "model.vocab_size=10: the data holds bytes"),
    "batch larger than the data": (["--set", "data.path={root}/datasets/corpus",
                                    "--set", "train.global_batch_size=1024"], "fewer than one global batch"),
    # --- one launch per run: a live launch's lease refuses a second one, which writes nothing ----
    "run leased by a live launch": (["--run-name", "leased", "--set", "data.path={root}/datasets/corpus"],
                                    "is in use by another launch (host elsewhere, pid 4242"),
}

YAML_FILES = {
    "named.yaml": b"name: ../escaped\n",
    ".hidden.yaml": b"train:\n  max_steps: 5\n",
    "parse.yaml": b"optim: {lr: [1,\n",
    "latin1.yaml": b"name: caf\xe9\n",
    "baselist.yaml": b"base: [test]\n",
    "list.yaml": b"- base\n- test\n",
    "tag.yaml": b"x: !!python/object/apply:os.system ['touch pwned']\n",
    "lr.yaml": b"optim:\n  lr: 1e-3\n",
}


def _snapshot(root: Path) -> dict:
    """Every folder (with its mtime: a folder made and removed again shows) and file (bytes)."""
    snap = {}
    for folder, _, files in os.walk(root):
        snap[folder] = ("dir", os.stat(folder).st_mtime_ns)
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                snap[path] = ("file", f.read(), os.stat(path).st_mtime_ns)
    return snap


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input-table")
    (root / "storage" / "existing-run").mkdir(parents=True)  # something that must stay put
    (root / "storage" / "existing-run" / "note.txt").write_bytes(b"untouched")
    (root / "configs").mkdir()
    for name, data in YAML_FILES.items():
        (root / "configs" / name).write_bytes(data)
    (root / "afile").write_bytes(b"a file where a folder belongs")
    (root / "storage" / "plainfile").write_bytes(b"a file where a run folder belongs")
    (root / "storage" / "existing-run" / CKPT).mkdir()
    (root / "storage" / "existing-run" / CKPT / "metadata.json").write_bytes(b"{}")
    _datasets(root / "datasets")
    return root


def _datasets(d: Path) -> None:
    """Data folders, each wrong in one way, and a good test corpus (prepared as a run would)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from configs import load
    from data import corpus as data_prep
    from storage.location import resolve

    data_prep.prepare(resolve(str(d / "corpus")), load("test"))  # 65-byte samples, corpus.json
    shutil.copytree(d / "corpus", d / "legacy")  # prepared before corpus.json was recorded
    (d / "legacy" / data_prep.MARKER).unlink()
    for name in ("empty", "notparquet/train", "unreadable/train/part-00000.parquet", "columns/train",
                 "intlists/train", "noval/train"):
        (d / name).mkdir(parents=True)
    (d / "notparquet" / "train" / "part-00000.parquet").write_text("id,tokens\n1,abc\n")
    pq.write_table(pa.table({"a": [1], "b": [2]}), d / "columns" / "train" / "part-00000.parquet")
    pq.write_table(pa.table({"id": pa.array(range(64), pa.int64()), "tokens": [[1, 2]] * 64}),
                   d / "intlists" / "train" / "part-00000.parquet")
    pq.write_table(pa.table({"id": pa.array(range(64), pa.int64()),
                             "tokens": pa.array([b"x" * 65] * 64, pa.binary())}),
                   d / "noval" / "train" / "part-00000.parquet")


SETUP = {  # before the snapshot: state the case needs that must be fresh when it runs
    "run leased by a live launch": lambda root: _live_lease(root / "storage" / "leased"),
}


def _live_lease(run: Path) -> None:
    from storage.lease import Holder

    run.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (run / ".lease.json").write_bytes(Holder("other-launch", "elsewhere", 4242, now - 3600, now, "w").to_bytes())


def _env() -> dict:
    """No cluster, no emulator, no credentials: these cases must fail before any of them matter."""
    env = launcher.env()
    for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        env.pop(key, None)
    return env


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_ray_exit_2_one_line_nothing_written(case, root):
    extra, message = CASES[case]
    message = message.replace("{root}", str(root))
    config = ["--config", "test"]
    args = []
    for arg in extra:
        if arg.startswith("{yaml:"):
            config = ["--config", str(root / "configs" / arg[len("{yaml:"):-1])]
        else:
            args.append(arg.replace("{root}", str(root)))
    argv = [*config, "--storage", str(root / "storage"), "--set", f"data.path={root / 'data'}", *args]
    if case in SETUP:
        SETUP[case](root)
    before = _snapshot(root)
    p = launcher.run(argv, environ=_env(), timeout=60)
    assert p.rc == 2, (p.rc, p.err[-2000:])
    lines = p.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.err
    assert message in lines[0], lines[0]
    assert "Traceback" not in p.out
    assert p.took < 10, f"{case}: refused after {p.took:.1f}s"
    assert _snapshot(root) == before  # storage, data and config files byte-for-byte unchanged
    assert not (root / "data").exists() and not (root / "escaped").exists()
    assert not (REPO / "pwned").exists()
