"""train.strategy=fsdp on real Ray (2 CPU workers, gloo): every rank writes its own DCP shards
into the one named checkpoint; a stop/resume is bitwise equal to a straight run; a 2-worker
checkpoint resumes on 1 worker with the same sample sequence; a checkpoint missing a shard is
incomplete; a poisoned one (manifest re-signed) is refused before Ray and runs nothing; export
gives the trained weights. (The killed-worker test is parametrized over both strategies in
test_faults_and_elastic.py; exact state after loading at other world sizes and across
strategies is tests/unit/test_sharded.py.)"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import torch
from conftest import audit, read_json
from safetensors.torch import load_file

from configs.schema import ModelSection
from ray_job import launcher
from ray_job.resume import resolve_resume
from storage import manifest
from storage.location import resolve
from trainers import sharded
from trainers.model import GPT

FINAL = "checkpoint-epoch1-step24-files0"


def _ids(records, step, workers):
    return [i for rank in range(workers) for r in records
            if r["event"] == "batch" and r["step"] == step and r["rank"] == rank for i in r["ids"]]


def test_every_rank_writes_its_shards_into_one_named_checkpoint(fsdp_runs):
    folder = fsdp_runs.ckpt("fsdp-straight", FINAL)
    meta = read_json(folder / "metadata.json")
    assert meta["strategy"] == "fsdp" and meta["world_size"] == 2
    assert set(meta["shards"]) == {"0", "1"}
    assert "__0_0.distcp" in meta["shards"]["0"] and meta["shards"]["1"] == ["__1_0.distcp"]
    assert {p.name for p in folder.iterdir()} == set(meta["files"]) | {"metadata.json"}
    assert "model.safetensors" not in meta["files"]  # no rank wrote the whole model
    shards = [meta["files"][f"__{r}_0.distcp"]["size"] for r in (0, 1)]
    assert max(shards) / sum(shards) < 0.55, shards  # each rank about half of the state
    out = fsdp_runs.straight.out
    assert "🧩 fsdp: 2 blocks and the root sharded over 2 workers" in out
    assert f"☁️  Uploaded {FINAL}" in out and "from 2 ranks' shards" in out


def test_fsdp_stop_and_resume_is_bitwise_equal_to_straight(fsdp_runs):
    """The chain runs with train.activation_checkpointing=full (dropout on), the straight run
    without: recomputing each block's forward changes no loss and no weight."""
    assert all("♻️  Activation checkpointing: 2 blocks recompute their forward in backward" in r.out
               for r in fsdp_runs.chain)
    assert "Activation checkpointing" not in fsdp_runs.straight.out
    straight = read_json(fsdp_runs.ckpt("fsdp-straight", FINAL) / "training_metrics.json")
    chain = read_json(fsdp_runs.ckpt("fsdp-chain", FINAL) / "training_metrics.json")
    assert [s for s, _ in straight["loss_history"]] == list(range(1, 25))
    assert chain["loss_history"] == straight["loss_history"]  # floats compared exactly
    assert chain["lr_history"] == straight["lr_history"]
    assert [r[0] for r in chain["resumes"]] == [10]
    assert "✅ Resumed from checkpoint: checkpoint-epoch0-step10-files2" in fsdp_runs.chain[1].out
    for name in ("checkpoint-epoch0-step16-files4", FINAL):
        folders = [fsdp_runs.ckpt(run, name) for run in ("fsdp-straight", "fsdp-chain")]
        a, b = (sharded.full_model_state(str(f), set(read_json(f / "metadata.json")["files"])) for f in folders)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first = sharded.full_model_state(str(fsdp_runs.ckpt("fsdp-straight", "checkpoint-epoch0-step8-files2")),
                                     {".metadata", "__0_0.distcp", "__1_0.distcp"})
    assert any(not torch.equal(first[k], a[k]) for k in a)  # it trained


def test_fsdp_logs_the_global_grad_norm_as_ddp_does(fsdp_runs, runs):
    """The same 24 steps on the same data under fsdp and ddp (the shared straight runs): the
    logged gradient norm is the global one under both, equal within a relative 1e-4 (only the
    order of the reductions differs)."""
    from conftest import assert_same_grad_norms

    assert_same_grad_norms(fsdp_runs.storage / "fsdp-straight" / "tensorboard",
                           runs.storage / "straight" / "tensorboard", 24)


def test_export_gives_the_trained_weights(fsdp_runs, tmp_path):
    """The exported model.safetensors, loaded into a plain GPT in this process, gives the
    validation loss the sharded run measured at that step."""
    out = tmp_path / "export"
    p = launcher.run(["export", FINAL, "--storage", fsdp_runs.storage, "--run-name", "fsdp-straight", "--out", out],
                     module="ray_job.checkpoints")
    assert p.rc == 0, p.out
    assert f"Wrote {out / 'model.safetensors'}" in p.out and "(fsdp, 2 workers)" in p.out
    config = json.loads((out / "config.json").read_text())
    model = GPT(ModelSection(**{k: v for k, v in config["model"].items() if k != "shard_modules"}))
    model.load_state_dict(load_file(out / "model.safetensors"))
    model.eval()
    val = pq.read_table(sorted((fsdp_runs.data / "val").glob("*.parquet"))).column("tokens").to_pylist()
    tokens = torch.from_numpy(np.stack([np.frombuffer(t, np.uint8) for t in val]).astype(np.int64))
    with torch.no_grad():
        losses = [(model(b[:, :-1], b[:, 1:]).item(), len(b)) for b in torch.split(tokens, 16)]
    ours = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    recorded = read_json(fsdp_runs.ckpt("fsdp-straight", FINAL) / "metadata.json")["val_loss"]
    assert abs(ours - recorded) < 1e-5, (ours, recorded)
    again = launcher.run(["export", FINAL, "--storage", fsdp_runs.storage, "--run-name", "fsdp-straight",
                          "--out", out], module="ray_job.checkpoints")
    assert again.rc == 2 and "exists" in again.err  # never overwrites


def test_two_worker_shards_resume_on_one_worker(fsdp_runs, ray_address):
    """DCP reshards 2 -> 1: the same global sample sequence from the cursor, training goes on,
    close to (not bitwise equal to) the 2-worker run, and the log says so."""
    trail = fsdp_runs.audit / "fsdp-one"
    source = fsdp_runs.ckpt("fsdp-chain", "checkpoint-epoch0-step10-files2")
    p = launcher.run(["--config", "test", "--storage", fsdp_runs.storage, "--run-name", "fsdp-one",
                      "--set", f"data.path={fsdp_runs.data}", "--set", "train.strategy=fsdp", "--num-workers", 1,
                      "--max-steps", 14, "--resume", source, "--audit-dir", trail], ray_address=ray_address)
    assert p.rc == 0, p.out[-4000:]
    assert "this run has 1: data order and cursor carry over" in p.out
    assert "not bitwise equal to, a run on 2 workers" in p.out
    straight = audit(fsdp_runs.audit / "fsdp-straight")
    ours = audit(trail)
    for step in range(11, 15):
        assert _ids(ours, step, 1) == _ids(straight, step, 2), step
    one = read_json(fsdp_runs.ckpt("fsdp-one", "checkpoint-epoch0-step14-files3") / "training_metrics.json")
    two = read_json(fsdp_runs.ckpt("fsdp-straight", FINAL) / "training_metrics.json")
    assert one["loss_history"][:10] == two["loss_history"][:10]
    diffs = [abs(a - b) / b for (_, a), (_, b) in zip(one["loss_history"][10:14], two["loss_history"][10:14])]
    assert len(diffs) == 4 and max(diffs) < 0.05, diffs  # dropout streams differ: close, not equal
    assert read_json(fsdp_runs.ckpt("fsdp-one", "checkpoint-epoch0-step14-files3") / "metadata.json")["shards"] \
        .keys() == {"0"}


def test_missing_shard_is_incomplete_skipped_by_latest_and_refused_by_name(fsdp_runs, tmp_path):
    run = tmp_path / "fsdp-missing"
    shutil.copytree(fsdp_runs.storage / "fsdp-straight", run)
    (run / FINAL / "__1_0.distcp").unlink()  # rank 1's upload never landed
    listed = launcher.run(["list", "--storage", tmp_path, "--run-name", "fsdp-missing", "--json"],
                          module="ray_job.checkpoints")
    status = {r["name"]: r["status"] for r in json.loads(listed.out)}
    assert status[FINAL] == "incomplete" and status["checkpoint-epoch0-step16-files4"] == "complete"
    assert resolve_resume("latest", resolve(str(run))).name == "checkpoint-epoch0-step16-files4"
    named = launcher.run(["--config", "test", "--storage", tmp_path, "--run-name", "fsdp-missing",
                          "--set", f"data.path={fsdp_runs.data}", "--set", "train.strategy=fsdp",
                          "--resume", FINAL, "--max-steps", 30])
    assert named.rc == 2 and "is incomplete (__1_0.distcp is missing)" in named.err, named.out[-2000:]


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _resign(folder) -> None:
    """What an attacker who can write the bucket does: metadata.json's manifest re-hashed."""
    meta = read_json(folder / "metadata.json")
    (folder / "metadata.json").unlink()
    manifest.write_metadata(str(folder), {k: v for k, v in meta.items() if k not in ("files", "format_version")})


def _poison_bytes_item(folder, evil) -> str:
    """Point one non-tensor item (an AdamW param_groups entry) at a pickle of evil appended to
    rank 0's shard, rewriting .metadata with DCP's own classes."""
    with open(folder / ".metadata", "rb") as f:
        md = sharded.parse_dcp_metadata(f)
    index = next(i for i in md.storage_data if i.fqn.endswith(".lr") and i.fqn.startswith("optim.param_groups"))
    info = md.storage_data[index]
    buf = io.BytesIO()
    torch.save(evil, buf)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    info.offset, info.length = offset, len(buf.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return index.fqn


def test_poisoned_sharded_checkpoint_is_refused_before_ray_and_runs_nothing(fsdp_runs, tmp_path):
    marker = tmp_path / "ran"
    cases = {}
    for case in ("metadata", "bytes-item"):
        folder = tmp_path / case / "checkpoint-epoch0-step16-files4"
        shutil.copytree(fsdp_runs.ckpt("fsdp-straight", "checkpoint-epoch0-step16-files4"), folder)
        if case == "metadata":
            (folder / ".metadata").write_bytes(pickle.dumps(Evil(str(marker)), protocol=4))
        else:
            cases["fqn"] = _poison_bytes_item(folder, Evil(str(marker)))
        _resign(folder)
        assert manifest.check(resolve(str(folder)), verify_hashes=True).ok  # hashes alone would pass it
        storage = tmp_path / f"{case}-runs"
        p = launcher.run(["--config", "test", "--storage", storage, "--run-name", "fork",
                          "--set", f"data.path={fsdp_runs.data}", "--set", "train.strategy=fsdp",
                          "--resume", folder, "--max-steps", 20])
        assert p.rc == 2, p.out[-2000:]
        lines = p.err.strip().splitlines()
        assert len(lines) == 1 and "is refused" in lines[0] and "nothing of it was run" in lines[0], p.err
        cases[case] = lines[0]
        assert not (storage / "fork").exists() or not any((storage / "fork").iterdir())  # nothing written
        exported = launcher.run(["export", folder.name, "--storage", folder.parent.parent, "--run-name", case,
                                 "--out", tmp_path / f"{case}-export"], module="ray_job.checkpoints")
        assert exported.rc == 2 and "refused" in exported.err, exported.out
    assert "refers to posix.system: not allowed" in cases["metadata"]
    assert f"{cases['fqn']} is not plain data" in cases["bytes-item"]
    assert not marker.exists()


def test_fsdp_on_gcs_every_rank_uploads_its_shards_and_export_reads_the_bucket(fsdp_runs, gcs, ray_address, tmp_path):
    """A fork into the bucket: every rank uploads its shards there and rank 0 commits there; the
    run goes on bitwise; export downloads and verifies the shards from gs://. (The restore's
    download is the same fetch_files, exercised by the DDP GCS tests.)"""
    args = ["--config", "test", "--storage", "gs://ckpts/fsdp", "--run-name", "f", "--set",
            f"data.path={fsdp_runs.data}", "--set", "train.strategy=fsdp"]
    fork = launcher.run(args + ["--resume", fsdp_runs.ckpt("fsdp-chain", "checkpoint-epoch0-step10-files2"),
                                "--max-steps", 24], ray_address=ray_address, emulator=gcs.url)
    assert fork.rc == 0, fork.out[-4000:]
    bucket = gcs.client().bucket("ckpts")
    names = {b.name.rsplit("/", 1)[1] for b in bucket.list_blobs(prefix=f"fsdp/f/{FINAL}/")}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "metadata.json"} <= names
    metrics = json.loads(bucket.blob(f"fsdp/f/{FINAL}/training_metrics.json").download_as_bytes())
    straight = read_json(fsdp_runs.ckpt("fsdp-straight", FINAL) / "training_metrics.json")
    assert metrics["loss_history"] == straight["loss_history"]
    out = tmp_path / "export"
    exported = launcher.run(["export", FINAL, "--storage", "gs://ckpts/fsdp", "--run-name", "f", "--out", out],
                            module="ray_job.checkpoints", emulator=gcs.url)
    assert exported.rc == 0, exported.out
    local = sharded.full_model_state(str(fsdp_runs.ckpt("fsdp-straight", FINAL)),
                                     set(read_json(fsdp_runs.ckpt("fsdp-straight", FINAL) / "metadata.json")["files"]))
    ours = load_file(out / "model.safetensors")
    assert ours.keys() == local.keys() and all(torch.equal(ours[k], local[k]) for k in local)
