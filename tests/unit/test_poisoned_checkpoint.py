"""A stranger's checkpoint runs no code (trainers/checkpointer.py's claim): an optimizer.pt and
an RNG file that would run a command when unpickled, in a checkpoint whose manifest was signed
again over them (so every size and hash checks out), are refused by the loader, and the command
never runs. The same files, not poisoned, load: the refusal is the payload's, not the format's.
And the driver refuses every such checkpoint (ddp files, a DCP index) before Ray starts, exit 2
and one line (ray_job/vet.py; issue 23 item 9)."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint_files import realistic_meta

from storage import manifest
from storage.location import resolve
from trainers import checkpointer


class RunsACommand:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _signed_checkpoint(folder, optimizer_bytes: bytes, rng_bytes: bytes) -> dict:
    """A ddp checkpoint folder with these two files, the manifest signed over them."""
    os.makedirs(folder)
    model, optimizer = _model_and_optimizer()
    save_file(model.state_dict(), os.path.join(folder, manifest.MODEL))
    files = {manifest.OPTIMIZER: optimizer_bytes, manifest.rng_file(0): rng_bytes,
             manifest.SCHEDULER: b"", manifest.METRICS: b"{}"}
    for rel, data in files.items():
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
    meta = manifest.write_metadata(str(folder), realistic_meta(os.path.basename(str(folder)), world_size=1))
    result = manifest.check(resolve(str(folder)), verify_hashes=True)
    assert result.ok, result.reason  # sizes and hashes all check out: only the loader stands guard
    return meta


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("poisoned", ["optimizer", "rng"])
def test_a_poisoned_file_under_a_signed_manifest_is_refused_and_runs_nothing(tmp_path, poisoned):
    marker = tmp_path / "the-command-ran"
    _, optimizer = _model_and_optimizer()
    good_optimizer, good_rng = _bytes(optimizer.state_dict()), checkpointer._capture_rng()
    payload = _bytes({"state": {}, "param_groups": RunsACommand(str(marker))})
    folder = tmp_path / "checkpoint-epoch0-step8-files2"
    meta = _signed_checkpoint(folder, payload if poisoned == "optimizer" else good_optimizer,
                              payload if poisoned == "rng" else good_rng)
    model, optimizer = _model_and_optimizer()
    with pytest.raises(pickle.UnpicklingError):
        if poisoned == "optimizer":
            checkpointer.load_model_and_optimizer(model, optimizer, False, str(folder), meta)
        else:
            checkpointer._restore_rng(os.path.join(folder, manifest.rng_file(0)))
    assert not marker.exists(), "the checkpoint ran a command"


def test_the_same_files_not_poisoned_load(tmp_path):
    _, optimizer = _model_and_optimizer()
    folder = tmp_path / "checkpoint-epoch0-step8-files2"
    meta = _signed_checkpoint(folder, _bytes(optimizer.state_dict()), checkpointer._capture_rng())
    model, optimizer = _model_and_optimizer()
    checkpointer.load_model_and_optimizer(model, optimizer, False, str(folder), meta)
    checkpointer._restore_rng(os.path.join(folder, manifest.rng_file(0)))
    assert optimizer.state_dict()["state"][0]["step"] == 1


# --- refused on the driver, before Ray (issue 23 item 9) ----------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Byte-token data like the test preset's corpus: 6 train files x 64 samples of 65 tokens,
    and a val file (written here: the real preparation starts Ray Data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path_factory.mktemp("corpus") / "data"
    for split, files, rows in (("train", 6, 64), ("val", 1, 32)):
        (data / split).mkdir(parents=True)
        for i in range(files):
            ids = range(i * rows, (i + 1) * rows)
            pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                                     "tokens": pa.array([bytes([n % 256]) * 65 for n in ids], pa.binary())}),
                           data / split / f"part-{i:05d}.parquet")
    return data


def launch_checkpoint(run_dir, data, step: int, samples_in_epoch: int, sets=(), poison=None) -> str:
    """A checkpoint of the test preset (--set sets; ddp, or fsdp written by DCP in this process)
    as a launch writes it (trainers/commit.py's metadata over its files), resumable by
    ray_job.train.prepare; poison: {file: old bytes -> new bytes} applied before the manifest is
    signed. Returns its folder."""
    import torch.distributed.checkpoint as dcp

    from configs import load, parse_set, with_overrides
    from data.index import build_index
    from data.order import SampleOrder, shuffle_window
    from storage.names import CheckpointName
    from trainers import sharded
    from trainers.commit import checkpoint_metadata
    from trainers.launch_plan import LaunchPlan

    cfg = with_overrides(load("test"), parse_set([f"data.path={data}", *sets]))
    index = build_index(resolve(str(data)).fs, str(data))
    G, world = cfg.train.global_batch_size, cfg.scaling.num_workers
    order = SampleOrder.make(index, cfg.data.shuffle_seed, 0, G, shuffle_window(cfg))
    name = str(CheckpointName(epoch=0, step=step, files=order.files_done(samples_in_epoch)))
    folder = os.path.join(str(run_dir), name)
    os.makedirs(folder)
    model, optimizer = _model_and_optimizer()
    files = {manifest.SCHEDULER: _bytes({"last_epoch": step}),
             manifest.METRICS: b'{"loss_history": [], "lr_history": [], "val_history": []}',
             **{manifest.rng_file(r): checkpointer._capture_rng() for r in range(world)}}
    shards = None
    if cfg.train.strategy == "fsdp":  # one process writes every rank's shard file: no_dist
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=folder, no_dist=True)
        shards = {str(r): [sharded.shard_file(0)] for r in range(world)}
    else:
        save_file(model.state_dict(), os.path.join(folder, manifest.MODEL))
        files[manifest.OPTIMIZER] = _bytes(optimizer.state_dict())
    for rel, blob in files.items():
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(blob)
    for rel, change in (poison or {}).items():
        with open(os.path.join(folder, rel), "rb") as f:
            blob = change(f.read())
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(blob)
    plan = LaunchPlan(config=cfg, launch_id="0" * 32, run_uri=str(run_dir), data_index=index)
    progress = {"name": name, "step": step, "epoch": 0, "samples_in_epoch": samples_in_epoch,
                "files_processed": order.files_done(samples_in_epoch), "best_loss": 2.5, "best_val_loss": None}
    meta = checkpoint_metadata(plan, progress, world, {}, shards)
    manifest.write_metadata(folder, {k: v for k, v in meta.items() if k not in ("files", "format_version")})
    assert manifest.check(resolve(folder), verify_hashes=True).ok  # hashes alone would pass it
    return folder


def _tree(root) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(root) for f in names} | {d: "dir" for d, _, _ in os.walk(root)}


POISONED = {  # what --resume must refuse before Ray: (strategy, file, what the line says)
    "optimizer.pt": ("ddp", manifest.OPTIMIZER, "optimizer.pt does not load as plain data: UnpicklingError: "
                     "Trying to load unsupported GLOBAL posix.system"),
    "scheduler_state.pt": ("ddp", manifest.SCHEDULER, "scheduler_state.pt does not load as plain data"),
    "rng_state_rank1.pt": ("ddp", manifest.rng_file(1), "rng_state_rank1.pt does not load as plain data"),
    # an allowed class's attribute set by BUILD (tests/unit/test_sharded.py: every way, unit by unit)
    "fsdp .metadata": ("fsdp", ".metadata", "DCP .metadata sets state on "
                       "torch.distributed.checkpoint.metadata.Metadata: only on an instance it made"),
}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's no_dist save, on purpose
@pytest.mark.parametrize("case", list(POISONED))
def test_a_poisoned_checkpoint_is_refused_before_ray_exit_2_one_line_nothing_written(
        tmp_path, corpus, case, monkeypatch, capsys):
    """Through ray_job.train.main with a stand-in for Ray's launch (it records a start): the
    refusal comes before any of Ray, in one line, nothing is written anywhere, nothing ran and
    no class changed. Before issue 23 a poisoned ddp file got as far as the workers (exit 1)."""
    import sys
    import types

    from test_sharded import ON_WHAT
    from torch.distributed.checkpoint.metadata import Metadata

    import ray_job
    from ray_job import train

    strategy, rel, says = POISONED[case]
    marker = tmp_path / "the-command-ran"
    payload = _bytes({"state": {}, "param_groups": RunsACommand(str(marker))})
    change = (lambda old: ON_WHAT["class"] + old) if strategy == "fsdp" else (lambda old: payload)
    sets = [f"train.strategy={strategy}"]
    folder = launch_checkpoint(tmp_path / "elsewhere" / "old", corpus, 8, 128, sets, poison={rel: change})
    started = []
    fake = types.ModuleType("ray_job.launch")
    fake.init_ray = lambda cfg, **kw: started.append("ray")
    monkeypatch.setitem(sys.modules, "ray_job.launch", fake)
    monkeypatch.setattr(ray_job, "launch", fake, raising=False)
    before, eq = _tree(tmp_path), Metadata.__eq__
    try:
        code = train.main(["--config", "test", "--storage", str(tmp_path / "runs"), "--run-name", "fork",
                           "--set", f"data.path={corpus}", "--set", f"train.strategy={strategy}",
                           "--resume", folder, "--max-steps", "20"])
    finally:
        changed, Metadata.__eq__ = Metadata.__eq__ is not eq, eq
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not started, (code, err)
    assert len(err) == 1 and err[0].startswith(f"error: --resume {folder}: checkpoint {folder} is refused ("), err
    assert says in err[0] and err[0].endswith("nothing of it was run. Resume from a checkpoint this service wrote")
    assert _tree(tmp_path) == before and not marker.exists() and not changed


def test_a_clean_ddp_checkpoint_passes_the_driver_checks(tmp_path, corpus):
    from ray_job import train

    folder = launch_checkpoint(tmp_path / "elsewhere" / "old", corpus, 8, 128)
    _, _, _, plan = train.prepare(["--config", "test", "--storage", str(tmp_path / "runs"), "--run-name", "fork",
                                   "--set", f"data.path={corpus}", "--resume", folder, "--max-steps", "20"])
    assert plan.resume.step == 8 and plan.resume.samples_in_epoch == 128


def test_a_storage_that_fails_while_vetting_is_said_as_such_not_as_a_refusal(tmp_path, corpus):
    """ray_job/vet.py: a read that fails is the storage's fault (retry), not the checkpoint's."""
    import types

    from ray_job import vet
    from ray_job.errors import UserError

    def broken(path):
        raise OSError(f"connection reset reading {path}")

    folder = launch_checkpoint(tmp_path / "old", corpus, 8, 128)
    meta = manifest.check(resolve(folder)).metadata
    broken = types.SimpleNamespace(fs=types.SimpleNamespace(open_input_file=broken),
                                   path=str(folder), uri=str(folder))
    with pytest.raises(UserError, match="optimizer.pt of .* could not be read to be checked .OSError: "
                                        "connection reset reading .*; check the storage and try again"):
        vet.checkpoint("x", broken, meta)
    vet.checkpoint("x", resolve(folder), meta)  # the same files, read: they pass
