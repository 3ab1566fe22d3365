"""Property 7 (local part): bad input gets exit 2, one clear line, no traceback, and nothing in
storage is written or deleted. Runs against a copy of the shared runs' checkpoints."""

import os
import shutil

import pytest

from ray_job import launcher


def _tree(root):
    snap = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            snap[p] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.fixture(scope="module")
def store(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(runs.storage / "chain", root / "chain")
    run = root / "chain"
    os.remove(run / "checkpoint-epoch0-step16-files4" / "metadata.json")  # a save that never finished
    model = run / "checkpoint-epoch0-step8-files2" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    model.write_bytes(bytes(data))
    return root


def _args(store, runs, *extra):
    return ["--config", "test", "--storage", store, "--run-name", "chain",
            "--set", f"data.path={runs.data}", *extra]


CASES = {
    "unknown config": (["--config", "nope"], "unknown config"),
    "unknown key": (["--set", "train.bogus=1"], "Unknown config key 'train.bogus'"),
    "bad value": (["--max-steps", "0"], "--max-steps (train.max_steps): must be positive"),
    "malformed name": (["--resume", "checkpoint-epoch0-stepX-files1"], "is not a checkpoint name"),
    "missing name": (["--resume", "checkpoint-epoch0-step999-files9"],
                     "No files found for checkpoint checkpoint-epoch0-step999-files9"),
    "max steps below": (["--resume", "latest", "--max-steps", "30"],
                        "--max-steps 30 is not above the resumed step 40"),
    "incomplete": (["--resume", "checkpoint-epoch0-step16-files4", "--run-name", "chain"],
                   "is incomplete (metadata.json is missing"),
    "corrupt": (["--resume", "checkpoint-epoch0-step8-files2"], "is corrupt (model.safetensors sha256"),
    "incompatible model": (["--resume", "latest", "--max-steps", "50", "--set", "model.d_model=32"],
                           "incompatible model (d_model: checkpoint 64 vs config 32)"),
    "new global batch": (["--resume", "latest", "--max-steps", "50", "--set", "train.global_batch_size=32"],
                         "pass --allow-new-global-batch to change it on purpose"),
    "older than newest": (["--resume", "checkpoint-epoch0-step10-files2"],
                          "already has newer checkpoints"),
    "fresh over existing": ([], "already has checkpoints (newest: checkpoint-epoch1-step40-files4)"),
    "unsupported scheme": (["--storage", "s3://bucket/x"], "unsupported scheme"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exit_2_one_line_nothing_touched(case, store, runs):
    extra, message = CASES[case]
    before = _tree(store)
    args = _args(store, runs, *extra)
    if case == "unknown config":
        args = ["--config", "nope", "--storage", store]
    result = launcher.run(args)  # no RAY_ADDRESS: bad input must fail before Ray is ever touched
    assert result.rc == 2, result.out[-3000:]
    assert message in result.err, result.err
    assert "Traceback" not in result.out
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert _tree(store) == before


def test_missing_name_lists_what_exists(store, runs):
    result = launcher.run(_args(store, runs, "--resume", "checkpoint-epoch0-step999-files9"))
    assert "checkpoint-epoch1-step40-files4" in result.err and "checkpoint-epoch0-step8-files2" in result.err
    assert "--resume latest" in result.err
