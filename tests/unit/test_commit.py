"""trainers/commit.py without Ray: rank 0's commit writes metadata.json only when every writing
rank reported its files and storage holds each at its size; otherwise the checkpoint stays
incomplete. The reports are what trainers/checkpointer.py's writer threads gather."""

from __future__ import annotations

import dataclasses
import os

import pytest

from configs import load
from data.index import DataIndex
from storage import manifest
from storage.location import resolve
from storage.manifest import Status
from trainers.commit import Committer
from trainers.launch_plan import LaunchPlan

NAME = "checkpoint-epoch0-step8-files2"
RANK0 = {".metadata": b"m" * 30, "__0_0.distcp": b"a" * 200, "scheduler_state.pt": b"s",
         "rng_state_rank0.pt": b"r0", "rng_state_rank1.pt": b"r1", "training_metrics.json": b"{}"}
RANK1 = {"__1_0.distcp": b"b" * 210}


def _plan(tmp_path, strategy="fsdp") -> LaunchPlan:
    cfg = load("test")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy=strategy))
    index = DataIndex(tuple(f"/data/train/part-{i}.parquet" for i in range(6)), (64,) * 6)
    return LaunchPlan(config=cfg, launch_id="L" * 32, run_uri=str(tmp_path / "run"), data_index=index)


def _upload(tmp_path, files: dict, rank: int) -> dict:
    """What one rank's upload function does: its files into the named folder; returns the
    metrics it reports."""
    local = tmp_path / f"local{rank}"
    local.mkdir()
    for rel, data in files.items():
        (local / rel).write_bytes(data)
    listed = manifest.digest_folder(str(local))
    dest = tmp_path / "run" / NAME
    dest.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (dest / rel).write_bytes(data)
    metrics = {"rank": rank, "world_size": 2, "files": listed, "write_s": 0.1, "upload_s": 0.2}
    if rank == 0:
        metrics["commit"] = {"name": NAME, "step": 8, "epoch": 0, "samples_in_epoch": 128, "files_processed": 2,
                             "best_loss": 3.0, "best_val_loss": None, "train_loss": 3.0, "val_loss": None,
                             "created_at": "2026-12-01T00:00:00Z", "preempted": False}
    return metrics


def test_commit_after_every_ranks_shards_gives_a_complete_checkpoint(tmp_path, capsys):
    reports = [_upload(tmp_path, RANK0, 0), _upload(tmp_path, RANK1, 1)]
    assert Committer(_plan(tmp_path)).commit(NAME, reports)
    result = manifest.check(resolve(str(tmp_path / "run" / NAME)), verify_hashes=True)
    assert result.ok, result.reason
    meta = result.metadata
    assert meta["strategy"] == "fsdp" and meta["world_size"] == 2 and meta["launch_id"] == "L" * 32
    assert meta["shards"] == {"0": sorted(RANK0), "1": ["__1_0.distcp"]}
    assert meta["config"]["train"]["strategy"] == "fsdp" and meta["data_index"]["rows"] == [64] * 6
    assert "☁️  Uploaded checkpoint-epoch0-step8-files2" in capsys.readouterr().out
    # Ray may hand the same round again after a retry: committed once, never rewritten
    assert not Committer(_plan(tmp_path)).commit(NAME, reports)


@pytest.mark.parametrize("lose", ["rank 1 never reported", "rank 1's file is not in storage",
                                  "rank 1's file is short"])
def test_a_rank_that_did_not_finish_leaves_the_checkpoint_incomplete(tmp_path, capsys, lose):
    reports = [_upload(tmp_path, RANK0, 0), _upload(tmp_path, RANK1, 1)]
    shard = tmp_path / "run" / NAME / "__1_0.distcp"
    if lose == "rank 1 never reported":
        reports = reports[:1]  # e.g. Ray relaxed the round to the survivors of a preempted node
    elif lose == "rank 1's file is not in storage":
        shard.unlink()
    else:
        shard.write_bytes(b"b" * 100)
    assert not Committer(_plan(tmp_path)).commit(NAME, reports)
    assert not os.path.exists(tmp_path / "run" / NAME / "metadata.json")
    assert manifest.check(resolve(str(tmp_path / "run" / NAME))).status is Status.INCOMPLETE
    assert "is not committed" in capsys.readouterr().out


def test_ddp_commits_rank_0s_files_alone(tmp_path):
    files = {"model.safetensors": b"w" * 50, "optimizer.pt": b"o" * 90, "scheduler_state.pt": b"s",
             "rng_state_rank0.pt": b"r0", "rng_state_rank1.pt": b"r1", "training_metrics.json": b"{}"}
    reports = [_upload(tmp_path, files, 0), {"rank": 1, "world_size": 2}]  # rank 1 reports no checkpoint
    assert Committer(_plan(tmp_path, "ddp")).commit(NAME, reports)
    result = manifest.check(resolve(str(tmp_path / "run" / NAME)), verify_hashes=True)
    assert result.ok and result.metadata["strategy"] == "ddp" and "shards" not in result.metadata


@pytest.mark.parametrize("stored", [True, False], ids=["identities", "hashes"])
def test_a_same_size_file_of_another_writer_is_never_committed(tmp_path, capsys, stored):
    """Rank 1 uploaded its shard; then another writer of the same name put a file of the same
    size and other bytes in its place (today's race). Sizes agree; the commit checks that the
    file is the object rank 1 uploaded (its inode here: identities), or, where a report has no
    identity, its sha256, and leaves the checkpoint incomplete."""
    from storage import transfer

    reports = [_upload(tmp_path, RANK0, 0), _upload(tmp_path, RANK1, 1)]
    dest = resolve(str(tmp_path / "run" / NAME))
    for report in reports:
        if stored:
            report["stored"] = transfer.upload_files(str(tmp_path / f"local{report['rank']}"), dest, "L" * 32)
    shard = tmp_path / "run" / NAME / "__1_0.distcp"
    shard.unlink()
    shard.write_bytes(b"x" * len(RANK1["__1_0.distcp"]))  # another writer's, same size
    assert not Committer(_plan(tmp_path)).commit(NAME, reports)
    assert not os.path.exists(tmp_path / "run" / NAME / "metadata.json")
    assert "__1_0.distcp in storage is not the file its rank uploaded" in capsys.readouterr().out
