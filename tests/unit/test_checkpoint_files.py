"""storage.manifest, storage.listing and storage.transfer on a local folder (and a pyarrow
SubTreeFileSystem standing in for a bucket)."""

import base64
import hashlib
import json
import os

import pyarrow.fs as pafs
import pytest

from storage import gcs, listing, manifest, marker, transfer
from storage.location import Location, resolve
from storage.manifest import CheckpointError, Status
from storage.names import CheckpointName

FILES = {
    "model.safetensors": os.urandom(3000) + b"\x00" * 17,
    "optimizer.pt": os.urandom(5000),
    "scheduler_state.pt": b"sched",
    "rng_state_rank0.pt": os.urandom(64),
    "rng_state_rank1.pt": os.urandom(65),
    "training_metrics.json": b'{"loss_history": []}',
    "shards/part-0.bin": os.urandom(100),
    "empty.bin": b"",
}
FLAT = {k: v for k, v in FILES.items() if "/" not in k}  # what trainers/checkpointer.py writes


def realistic_meta(name="checkpoint-epoch0-step8-files2", **over):
    """metadata.json as trainers/loop.py writes it (before write_metadata adds the manifest):
    2 workers, a 6-file x 64-sample index, global batch 16, consistent with the name."""
    n = CheckpointName.parse(name)
    meta = {
        "name": name, "run_name": "r", "launch_id": "0" * 32, "created_at": "2025-01-01T00:00:00Z",
        "step": n.step, "epoch": n.epoch, "files_processed": n.files,
        "samples_in_epoch": 16 * (n.step % 24), "world_size": 2, "global_batch_size": 16,
        "config": {"name": "test", "model": {"vocab_size": 256, "seq_len": 64, "n_layer": 2,
                                              "n_head": 2, "d_model": 64, "dropout": 0.1}},
        "data_index": {"files": [f"/data/train/part-{i}.parquet" for i in range(6)], "rows": [64] * 6},
        "best_loss": 2.5, "best_val_loss": None, "train_loss": 2.6, "val_loss": None,
        "resumed_from": None, "versions": {"torch": "x", "ray": "y"}, "preempted": False,
    }
    meta.update(over)
    return meta


def make_local(folder, files=FILES, extra_meta=None):
    """A finished local checkpoint folder: the data files, then write_metadata."""
    os.makedirs(folder, exist_ok=True)
    for rel, data in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    if extra_meta is None:
        base = os.path.basename(str(folder))
        extra_meta = realistic_meta(base if CheckpointName.try_parse(base) else
                                    "checkpoint-epoch0-step8-files2")
    return manifest.write_metadata(str(folder), extra_meta)


def put_checkpoint(run_dir, name, files=FILES):
    """A complete checkpoint named `name` directly in run_dir (written in place)."""
    return make_local(os.path.join(run_dir, name), files, realistic_meta(name))


def md5_b64(data):
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def flip_byte(path, offset=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# --- write_metadata --------------------------------------------------------------------------

def test_write_metadata_manifest_lists_every_file_with_size_and_sha(tmp_path):
    folder = tmp_path / "local"
    os.makedirs(folder)
    with open(folder / "leftover.tmp", "wb") as f:  # temp files are not part of the checkpoint
        f.write(b"partial")
    returned = make_local(folder, extra_meta={"step": 8, "epoch": 0, "note": "x"})
    on_disk = json.loads((folder / "metadata.json").read_text())
    assert on_disk == returned
    assert on_disk["step"] == 8 and on_disk["epoch"] == 0 and on_disk["note"] == "x"
    assert on_disk["format_version"] == manifest.FORMAT_VERSION
    listed = on_disk["files"]
    assert set(listed) == set(FILES)  # nested path uses '/', metadata.json and *.tmp excluded
    for rel, data in FILES.items():
        assert listed[rel]["size"] == len(data)
        assert listed[rel]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed[rel]["md5"] == md5_b64(data)  # what GCS reports for an object
    assert not os.path.exists(folder / "metadata.json.tmp")


def test_write_metadata_again_replaces_manifest(tmp_path):
    folder = tmp_path / "local"
    make_local(folder)
    with open(folder / "late.bin", "wb") as f:
        f.write(b"late file")
    meta = manifest.write_metadata(str(folder), {"step": 9})
    assert meta["step"] == 9
    assert meta["files"]["late.bin"]["size"] == 9
    assert meta["files"]["late.bin"]["sha256"] == hashlib.sha256(b"late file").hexdigest()
    assert "metadata.json" not in meta["files"]


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    assert manifest.sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()


# --- upload ----------------------------------------------------------------------------------

def files_in(folder):
    """{path relative to folder: bytes} of every file under folder: what a reader finds there."""
    return {os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/"): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_upload_copies_every_file_and_metadata_last(tmp_path, monkeypatch):
    local = tmp_path / "local"
    meta = make_local(local, FLAT)
    dest = resolve(str(tmp_path / "run")).child("checkpoint-epoch0-step8-files2")
    dest_dir = tmp_path / "run" / "checkpoint-epoch0-step8-files2"
    link = marker.link_create_only  # on local disk metadata.json appears through a hard link
    commits = []

    def recorded_link(tmp, final):  # what a reader finds the moment before metadata.json appears
        if final.endswith("/metadata.json"):  # (data files appear through it too, create-only)
            commits.append((final, {r: d for r, d in files_in(dest_dir).items()
                                    if not r.startswith("metadata.json") and not r.endswith(".tmp")},
                            os.path.exists(final)))
        link(tmp, final)

    monkeypatch.setattr(marker, "link_create_only", recorded_link)
    transfer.upload(str(local), dest)
    assert len(commits) == 1  # the commit marker appears once, and last
    final, present, already = commits[0]
    assert final == dest.path + "/metadata.json" and not already
    assert present == FLAT  # every data file was whole before it
    left = os.listdir(dest_dir)
    assert not [n for n in left if n.endswith(".tmp")]  # no temp file stays behind
    assert files_in(dest_dir) == {**FLAT, "metadata.json": (local / "metadata.json").read_bytes()}
    assert json.loads((dest_dir / "metadata.json").read_text()) == meta
    result = manifest.check(dest, verify_hashes=True)
    assert result.status is Status.COMPLETE, result.reason
    assert result.metadata == meta


def test_upload_refuses_to_overwrite_a_complete_checkpoint(tmp_path):
    local = tmp_path / "local"
    make_local(local, FLAT)
    dest = resolve(str(tmp_path / "run")).child("checkpoint-epoch0-step8-files2")
    transfer.upload(str(local), dest)
    before = {rel: (tmp_path / "run" / "checkpoint-epoch0-step8-files2" / rel).read_bytes() for rel in FLAT}
    other = tmp_path / "other"
    make_local(other, {"model.safetensors": b"different"})
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        transfer.upload(str(other), dest)
    after = {rel: (tmp_path / "run" / "checkpoint-epoch0-step8-files2" / rel).read_bytes() for rel in FLAT}
    assert after == before


def test_upload_completes_a_partial_destination(tmp_path):
    """A destination without metadata.json (an interrupted upload) is not a checkpoint: finish it."""
    local = tmp_path / "local"
    make_local(local, FLAT)
    dest_dir = tmp_path / "run" / "checkpoint-epoch0-step8-files2"
    os.makedirs(dest_dir)
    (dest_dir / "model.safetensors").write_bytes(b"half")
    dest = resolve(str(tmp_path / "run")).child("checkpoint-epoch0-step8-files2")
    assert manifest.check(dest).status is Status.INCOMPLETE
    transfer.upload(str(local), dest)
    assert (dest_dir / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert manifest.check(dest, verify_hashes=True).ok


def test_a_second_writer_never_changes_a_checkpoint_the_first_committed(tmp_path, monkeypatch):
    """Two writers of one name (a launch whose lease was taken over while its workers still
    upload): the loser got past the first look before the winner committed, then uploads its
    own files. It is refused, and the winner's checkpoint still verifies, hashes included."""
    ours, theirs = tmp_path / "winner", tmp_path / "loser"
    make_local(ours, FLAT)
    make_local(theirs, {rel: data + b" (another state)" for rel, data in FLAT.items()})
    dest = resolve(str(tmp_path / "run")).child("checkpoint-epoch0-step8-files2")
    transfer.upload(str(ours), dest)
    looked = transfer.read_marker
    first_look = [True]

    def stale_first_look(at):  # what the loser saw before the winner committed
        if first_look:
            first_look.pop()
            return marker.Marker("absent")
        return looked(at)

    monkeypatch.setattr(transfer, "read_marker", stale_first_look)
    with pytest.raises(CheckpointError, match="refusing to overwrite the existing checkpoint"):
        transfer.upload_files(str(theirs), dest)
    result = manifest.check(dest, verify_hashes=True)
    assert result.ok, result.reason
    folder = tmp_path / "run" / "checkpoint-epoch0-step8-files2"
    assert {rel: (folder / rel).read_bytes() for rel in FLAT} == FLAT
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_a_leftover_file_of_a_writer_that_lost_the_run_is_replaced_before_the_commit(tmp_path):
    """An uncommitted folder holding another writer's file (a killed launch's): removed and
    written again; the same bytes (this writer's own retry) are kept as they are."""
    local = tmp_path / "local"
    make_local(local, FLAT)
    folder = tmp_path / "run" / "checkpoint-epoch0-step8-files2"
    os.makedirs(folder)
    (folder / "model.safetensors").write_bytes(b"a killed launch's")
    same = next(rel for rel in FLAT if rel != "model.safetensors" and "/" not in rel)
    (folder / same).write_bytes(FLAT[same])
    dest = resolve(str(tmp_path / "run")).child("checkpoint-epoch0-step8-files2")
    transfer.upload(str(local), dest)
    assert manifest.check(dest, verify_hashes=True).ok


def test_upload_to_a_non_local_filesystem(tmp_path):
    local = tmp_path / "local"
    make_local(local, FLAT)
    os.makedirs(tmp_path / "bucket")
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    dest = Location(fs, "runs/r/checkpoint-epoch0-step8-files2", "sub://runs/r/checkpoint-epoch0-step8-files2")
    transfer.upload(str(local), dest)
    for rel, data in FLAT.items():
        assert (tmp_path / "bucket" / "runs/r/checkpoint-epoch0-step8-files2" / rel).read_bytes() == data
    assert manifest.check(dest, verify_hashes=True).ok


def test_upload_nested_files_to_local_storage(tmp_path):
    local = tmp_path / "local"
    make_local(local)  # includes shards/part-0.bin
    dest = resolve(str(tmp_path / "run")).child("checkpoint-epoch0-step8-files2")
    transfer.upload(str(local), dest)
    assert manifest.check(dest, verify_hashes=True).ok


# --- check -----------------------------------------------------------------------------------

@pytest.fixture
def complete(tmp_path):
    run = tmp_path / "run"
    put_checkpoint(run, "checkpoint-epoch0-step8-files2")
    folder = run / "checkpoint-epoch0-step8-files2"
    return folder, resolve(str(folder))


def test_check_complete(complete):
    folder, loc = complete
    for verify in (False, True):
        result = manifest.check(loc, verify_hashes=verify)
        assert result.status is Status.COMPLETE and result.ok, result.reason
        assert set(result.metadata["files"]) == set(FILES)


def test_check_extra_unlisted_file_is_still_complete(complete):
    folder, loc = complete
    (folder / "unlisted.txt").write_bytes(b"hello")
    assert manifest.check(loc, verify_hashes=True).ok


def test_check_incomplete_without_metadata(complete):
    folder, loc = complete
    os.remove(folder / "metadata.json")
    result = manifest.check(loc)
    assert result.status is Status.INCOMPLETE and not result.ok
    assert "metadata.json" in result.reason


def test_check_incomplete_for_missing_folder(tmp_path):
    result = manifest.check(resolve(str(tmp_path / "nope")))
    assert result.status is Status.INCOMPLETE


@pytest.mark.parametrize("rel", ["optimizer.pt", "shards/part-0.bin", "empty.bin"])
def test_check_incomplete_when_a_listed_file_is_missing(complete, rel):
    folder, loc = complete
    os.remove(folder / rel)
    result = manifest.check(loc, verify_hashes=True)
    assert result.status is Status.INCOMPLETE
    assert rel in result.reason


@pytest.mark.parametrize("delta", [-1, +1])
def test_check_corrupt_when_size_differs(complete, delta):
    folder, loc = complete
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] if delta < 0 else data + b"!")
    result = manifest.check(loc)
    assert result.status is Status.CORRUPT and not result.ok
    assert "model.safetensors" in result.reason
    assert str(len(data)) in result.reason and str(len(data) + delta) in result.reason


def test_check_same_size_byte_flip_needs_hashes(complete):
    folder, loc = complete
    flip_byte(folder / "optimizer.pt", 1234)
    assert manifest.check(loc, verify_hashes=False).status is Status.COMPLETE
    result = manifest.check(loc, verify_hashes=True)
    assert result.status is Status.CORRUPT
    assert "optimizer.pt" in result.reason


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"null", b'{"step": 1}', b"\xff\xfe"])
def test_check_unreadable_metadata_is_corrupt(complete, content):
    folder, loc = complete
    (folder / "metadata.json").write_bytes(content)
    result = manifest.check(loc)
    assert result.status is Status.CORRUPT
    assert "metadata.json" in result.reason


@pytest.mark.parametrize("files", [[], {"model.safetensors": 5}, {"model.safetensors": {"sha256": "x"}}])
def test_check_malformed_manifest_is_corrupt_not_an_exception(complete, files):
    folder, loc = complete
    (folder / "metadata.json").write_text(json.dumps({"files": files}))
    assert manifest.check(loc).status is Status.CORRUPT


def fake_gcs_md5s(root):
    def md5s(prefix_path):
        folder = os.path.join(root, prefix_path)
        out = {}
        for dirpath, _, names in os.walk(folder):
            for n in names:
                full = os.path.join(dirpath, n)
                with open(full, "rb") as f:
                    out[os.path.relpath(full, folder).replace(os.sep, "/")] = md5_b64(f.read())
        return out
    return md5s


def test_check_verifies_server_md5_on_gcs_without_reading(tmp_path, monkeypatch):
    """On GCS, verify_hashes compares the server's MD5s to the manifest (faked here)."""
    run = tmp_path / "run"
    put_checkpoint(run, "checkpoint-epoch0-step8-files2")
    loc = resolve(str(run / "checkpoint-epoch0-step8-files2"))
    monkeypatch.setattr(Location, "is_gcs", property(lambda self: True))
    monkeypatch.setattr(gcs, "md5s", lambda prefix: fake_gcs_md5s("/")(prefix))

    def no_download(*a, **k):
        raise AssertionError("downloaded a file to hash it")

    monkeypatch.setattr(manifest, "_sha256_remote", no_download)
    assert manifest.check(loc, verify_hashes=True).ok
    flip_byte(run / "checkpoint-epoch0-step8-files2" / "optimizer.pt", 7)
    result = manifest.check(loc, verify_hashes=True)
    assert result.status is Status.CORRUPT and "optimizer.pt" in result.reason and "md5" in result.reason
    assert manifest.check(loc, verify_hashes=False).ok


def test_check_on_gcs_falls_back_to_sha256_for_a_manifest_without_md5(tmp_path, monkeypatch):
    run = tmp_path / "run"
    put_checkpoint(run, "checkpoint-epoch0-step8-files2")
    folder = run / "checkpoint-epoch0-step8-files2"
    meta = json.loads((folder / "metadata.json").read_text())
    for entry in meta["files"].values():
        del entry["md5"]  # a checkpoint written before MD5s were recorded
    (folder / "metadata.json").write_text(json.dumps(meta))
    loc = resolve(str(folder))
    monkeypatch.setattr(Location, "is_gcs", property(lambda self: True))
    monkeypatch.setattr(gcs, "md5s", lambda prefix: {})
    assert manifest.check(loc, verify_hashes=True).ok
    flip_byte(folder / "model.safetensors", 5)
    result = manifest.check(loc, verify_hashes=True)
    assert result.status is Status.CORRUPT and "model.safetensors" in result.reason and "sha256" in result.reason


def test_check_on_a_non_local_filesystem(tmp_path):
    run = tmp_path / "bucket" / "runs" / "r"
    put_checkpoint(run, "checkpoint-epoch0-step8-files2")
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    loc = Location(fs, "runs/r/checkpoint-epoch0-step8-files2", "sub://x")
    assert manifest.check(loc, verify_hashes=True).ok
    flip_byte(run / "checkpoint-epoch0-step8-files2" / "rng_state_rank1.pt")
    assert manifest.check(loc).ok
    assert manifest.check(loc, verify_hashes=True).status is Status.CORRUPT


# --- scan / latest_complete --------------------------------------------------------------------

def test_scan_ignores_others_and_sorts_numerically(tmp_path):
    run_dir = tmp_path / "run"
    names = ["checkpoint-epoch0-step100-files0", "checkpoint-epoch0-step9-files1",
             "checkpoint-epoch0-step10-files2", "checkpoint-epoch1-step24-files0",
             "checkpoint-epoch0-step8-files2"]
    for n in names:
        put_checkpoint(run_dir, n)
    os.makedirs(run_dir / "checkpoint-epoch0-step08-files0")
    (run_dir / "checkpoint-epoch0-step08-files0" / "x").write_bytes(b"x")
    os.makedirs(run_dir / "notes" / "checkpoint-epoch0-step999-files0")  # not at top level
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    os.makedirs(run_dir / "checkpoint-epoch0-step5-files0")  # empty folder: listed, incomplete
    entries = listing.scan(resolve(str(run_dir)))
    got = [str(e.name) for e in entries]
    assert got == ["checkpoint-epoch0-step5-files0", "checkpoint-epoch0-step8-files2",
                   "checkpoint-epoch0-step9-files1", "checkpoint-epoch0-step10-files2",
                   "checkpoint-epoch1-step24-files0", "checkpoint-epoch0-step100-files0"]
    for e in entries:
        assert e.loc.path == os.path.join(str(run_dir), str(e.name))
    assert [e.name.step for e in entries] == [5, 8, 9, 10, 24, 100]


def test_scan_missing_or_empty_run(tmp_path):
    assert listing.scan(resolve(str(tmp_path / "missing"))) == []
    os.makedirs(tmp_path / "empty")
    assert listing.scan(resolve(str(tmp_path / "empty"))) == []
    assert listing.latest_complete(resolve(str(tmp_path / "missing"))) is None


def test_latest_complete_skips_newer_incomplete_and_size_corrupt(tmp_path):
    run_dir = tmp_path / "run"
    for n in ["checkpoint-epoch0-step8-files2", "checkpoint-epoch0-step9-files2",
              "checkpoint-epoch0-step10-files3", "checkpoint-epoch0-step100-files4"]:
        put_checkpoint(run_dir, n)
    run = resolve(str(run_dir))
    assert str(listing.latest_complete(run).name) == "checkpoint-epoch0-step100-files4"
    os.remove(run_dir / "checkpoint-epoch0-step100-files4" / "metadata.json")  # newest: incomplete
    assert str(listing.latest_complete(run).name) == "checkpoint-epoch0-step10-files3"
    with open(run_dir / "checkpoint-epoch0-step10-files3" / "optimizer.pt", "ab") as f:
        f.write(b"x")  # next: size-corrupt
    latest = listing.latest_complete(run)
    assert str(latest.name) == "checkpoint-epoch0-step9-files2"
    assert latest.loc.path == str(run_dir / "checkpoint-epoch0-step9-files2")
    os.remove(run_dir / "checkpoint-epoch0-step9-files2" / "shards" / "part-0.bin")  # listed file gone
    assert str(listing.latest_complete(run).name) == "checkpoint-epoch0-step8-files2"
    os.remove(run_dir / "checkpoint-epoch0-step8-files2" / "metadata.json")
    assert listing.latest_complete(run) is None


def test_latest_complete_skips_a_newer_hash_corrupt_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    for n in ["checkpoint-epoch0-step8-files2", "checkpoint-epoch0-step16-files4"]:
        put_checkpoint(run_dir, n)
    run = resolve(str(run_dir))
    assert str(listing.latest_complete(run).name) == "checkpoint-epoch0-step16-files4"
    flip_byte(run_dir / "checkpoint-epoch0-step16-files4" / "model.safetensors", 100)  # same size
    assert str(listing.latest_complete(run).name) == "checkpoint-epoch0-step8-files2"


# --- fetch -----------------------------------------------------------------------------------

def test_fetch_local_verifies_in_place(complete, tmp_path):
    folder, loc = complete
    scratch = tmp_path / "scratch"
    assert transfer.fetch(loc, str(scratch)) == str(folder)
    assert not scratch.exists()


@pytest.mark.parametrize("rel", ["model.safetensors", "shards/part-0.bin"])
def test_fetch_raises_naming_the_file_on_sha_mismatch(complete, tmp_path, rel):
    folder, loc = complete
    flip_byte(folder / rel)
    with pytest.raises(CheckpointError) as err:
        transfer.fetch(loc, str(tmp_path / "scratch"))
    assert rel in str(err.value)
    assert "sha256" in str(err.value)


def test_fetch_refuses_incomplete(complete, tmp_path):
    folder, loc = complete
    os.remove(folder / "scheduler_state.pt")
    with pytest.raises(CheckpointError) as err:
        transfer.fetch(loc, str(tmp_path / "scratch"))
    assert "incomplete" in str(err.value) and "scheduler_state.pt" in str(err.value)


def test_fetch_remote_downloads_and_verifies(tmp_path):
    run = tmp_path / "bucket" / "runs" / "r"
    meta = put_checkpoint(run, "checkpoint-epoch0-step8-files2")
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    loc = Location(fs, "runs/r/checkpoint-epoch0-step8-files2", "sub://runs/r/checkpoint-epoch0-step8-files2")
    scratch = tmp_path / "scratch"
    assert transfer.fetch(loc, str(scratch)) == str(scratch)
    for rel, data in FILES.items():
        assert (scratch / rel).read_bytes() == data
    assert json.loads((scratch / "metadata.json").read_text()) == meta

    flip_byte(run / "checkpoint-epoch0-step8-files2" / "optimizer.pt", 10)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        transfer.fetch(loc, str(tmp_path / "scratch2"))


def test_fetch_remote_downloads_only_wanted_files(tmp_path):
    run = tmp_path / "bucket" / "runs" / "r"
    put_checkpoint(run, "checkpoint-epoch0-step8-files2")
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    loc = Location(fs, "runs/r/checkpoint-epoch0-step8-files2", "sub://x")
    flip_byte(run / "checkpoint-epoch0-step8-files2" / "rng_state_rank1.pt")  # another rank's file
    scratch = tmp_path / "scratch"
    wanted = lambda rel: rel != "rng_state_rank1.pt"  # noqa: E731
    assert transfer.fetch(loc, str(scratch), wanted=wanted) == str(scratch)
    got = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file())
    assert got == sorted([r for r in FILES if wanted(r)] + ["metadata.json"])
    with pytest.raises(CheckpointError, match="rng_state_rank1.pt"):
        transfer.fetch(loc, str(tmp_path / "scratch2"))


def test_fetch_local_verifies_only_wanted_files(complete, tmp_path):
    folder, loc = complete
    flip_byte(folder / "rng_state_rank0.pt")
    assert transfer.fetch(loc, str(tmp_path / "s"), wanted=lambda rel: rel != "rng_state_rank0.pt") == str(folder)
    with pytest.raises(CheckpointError, match="rng_state_rank0.pt"):
        transfer.fetch(loc, str(tmp_path / "s"), wanted=lambda rel: rel == "rng_state_rank0.pt")


# --- untrusted metadata.json (issue 10): schema, ranges, required files, folder name ------------

def rewrite_meta(folder, **changes):
    """Edit metadata.json in place (a hand-edited or hostile checkpoint); None deletes a key."""
    meta = json.loads((folder / "metadata.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "metadata.json").write_text(json.dumps(meta))
    return meta


DROP = None


@pytest.mark.parametrize("changes,needle", [
    ({"step": "sixty"}, "step"),
    ({"step": DROP}, "step is missing"),
    ({"step": -8}, "step"),
    ({"step": True}, "step"),
    ({"step": 8.0}, "step"),
    ({"step": 10**6}, "step 1000000"),  # an older checkpoint edited to look newer
    ({"step": 2**70}, "step"),
    ({"epoch": -1}, "epoch"),
    ({"epoch": 3}, "epoch 3"),
    ({"files_processed": 3}, "files 3"),
    ({"files_processed": 99}, "files_processed"),
    ({"samples_in_epoch": -32}, "samples_in_epoch"),
    ({"samples_in_epoch": 10**9}, "samples_in_epoch"),
    ({"samples_in_epoch": 384}, "samples_in_epoch"),  # = the epoch: the cursor would be past it
    ({"samples_in_epoch": 24}, "samples_in_epoch"),  # not a whole global batch
    ({"samples_in_epoch": "0"}, "samples_in_epoch"),
    ({"data_index": DROP}, "data_index"),
    ({"data_index": [1]}, "data_index"),
    ({"data_index": {"files": ["a"], "rows": [1, 2]}}, "data_index"),
    ({"data_index": {"files": ["a"], "rows": [-1]}}, "data_index"),
    ({"data_index": {"files": [1], "rows": [64]}}, "data_index"),
    ({"config": [1]}, "config"),
    ({"config": DROP}, "config"),
    ({"config": {"model": 5}}, "config"),
    ({"world_size": 0}, "world_size"),
    ({"world_size": "2"}, "world_size"),
    ({"world_size": 3}, "rng_state_rank2.pt"),  # a rank's RNG file the loader would look for
    ({"world_size": 10**12}, "world_size"),
    ({"global_batch_size": 0}, "global_batch_size"),
    ({"global_batch_size": DROP}, "global_batch_size"),
    ({"best_loss": "low"}, "best_loss"),
    ({"val_loss": [1]}, "val_loss"),
    ({"resumed_from": "x"}, "resumed_from"),
    ({"name": "checkpoint-epoch0-step9-files2"}, "names"),
    ({"name": 5}, "name"),
    ({"launch_id": 5}, "launch_id"),
    ({"format_version": 2}, "format_version"),
    ({"format_version": DROP}, "format_version"),
])
def test_check_refuses_bad_metadata_naming_the_field(complete, changes, needle):
    folder, loc = complete
    rewrite_meta(folder, **changes)
    for verify in (False, True):
        result = manifest.check(loc, verify_hashes=verify)
        assert result.status is Status.CORRUPT, (changes, result)
        assert "metadata.json" in result.reason and needle in result.reason, result.reason
        assert result.metadata == {}  # an untrusted metadata.json is never handed on


@pytest.mark.parametrize("rel", manifest.loaded_files(2))
def test_check_requires_every_file_the_loader_reads_in_the_manifest(complete, rel):
    folder, loc = complete
    meta = json.loads((folder / "metadata.json").read_text())
    del meta["files"][rel]  # the file is still there, but nothing would verify it
    (folder / "metadata.json").write_text(json.dumps(meta))
    result = manifest.check(loc, verify_hashes=True)
    assert result.status is Status.CORRUPT and rel in result.reason


def test_an_emptied_manifest_does_not_turn_off_hash_checks(complete, tmp_path):
    folder, loc = complete
    flip_byte(folder / "model.safetensors", 10)
    rewrite_meta(folder, files={})
    for verify in (False, True):
        assert manifest.check(loc, verify_hashes=verify).status is Status.CORRUPT
    with pytest.raises(CheckpointError, match="corrupt"):
        transfer.fetch(loc, str(tmp_path / "scratch"))


def test_check_requires_the_folder_name_to_agree(tmp_path):
    meta = realistic_meta("checkpoint-epoch0-step8-files2")
    make_local(tmp_path / "mycopy", FILES, meta)
    result = manifest.check(resolve(str(tmp_path / "mycopy")))
    assert result.status is Status.CORRUPT and "'mycopy' is not a checkpoint name" in result.reason
    make_local(tmp_path / "checkpoint-epoch0-step16-files4", FILES, meta)  # renamed folder
    result = manifest.check(resolve(str(tmp_path / "checkpoint-epoch0-step16-files4")))
    assert result.status is Status.CORRUPT and "step 8" in result.reason
    make_local(tmp_path / "checkpoint-epoch0-step8-files2", FILES, meta)
    assert manifest.check(resolve(str(tmp_path / "checkpoint-epoch0-step8-files2")), verify_hashes=True).ok


def test_a_step_edited_older_checkpoint_is_not_chosen_by_latest(tmp_path):
    run_dir = tmp_path / "run"
    for n in ["checkpoint-epoch0-step8-files2", "checkpoint-epoch0-step16-files4"]:
        put_checkpoint(run_dir, n)
    rewrite_meta(run_dir / "checkpoint-epoch0-step8-files2", step=10**6)
    run = resolve(str(run_dir))
    assert str(listing.latest_complete(run).name) == "checkpoint-epoch0-step16-files4"
    rewrite_meta(run_dir / "checkpoint-epoch0-step16-files4", samples_in_epoch=-32)
    assert listing.latest_complete(run) is None


def test_metadata_json_that_is_a_folder_or_deeply_nested_is_corrupt(complete):
    folder, loc = complete
    (folder / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)
    assert manifest.check(loc).status is Status.CORRUPT
    os.remove(folder / "metadata.json")
    os.makedirs(folder / "metadata.json")
    assert manifest.check(loc).status is Status.CORRUPT


# --- manifest names that escape the checkpoint (issue 10) -------------------------------------

ESCAPING = ["../x", "../../x", "/etc/passwd", "a/../../x", "a\\..\\x", "./model.safetensors",
            "a//b", "shards/", "", "a\x00b", "metadata.json"]


@pytest.mark.parametrize("rel", ESCAPING)
def test_check_refuses_manifest_names_that_are_not_plain_relative(complete, rel):
    folder, loc = complete
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"][rel] = {"size": 1, "sha256": "0" * 64}
    (folder / "metadata.json").write_text(json.dumps(meta))
    result = manifest.check(loc)
    assert result.status is Status.CORRUPT, result
    assert repr(rel) in result.reason


class ListingFS:
    """An object store whose listing holds whatever names it was given, `../` included (some
    GCS emulators rewrite such names; a real bucket keeps them). Reads only."""

    type_name = "fake"

    def __init__(self, objects):
        self.objects = dict(objects)
        self.opened = []

    def get_file_info(self, what):
        if isinstance(what, pafs.FileSelector):
            prefix = what.base_dir.rstrip("/") + "/"
            return [pafs.FileInfo(p, pafs.FileType.File, size=len(d))
                    for p, d in sorted(self.objects.items()) if p.startswith(prefix)]
        if what in self.objects:
            return pafs.FileInfo(what, pafs.FileType.File, size=len(self.objects[what]))
        return pafs.FileInfo(what, pafs.FileType.NotFound)

    def open_input_stream(self, path):
        import pyarrow as pa

        self.opened.append(path)
        return pa.BufferReader(self.objects[path])


def _hostile_checkpoint(rel, payload=b"pwned"):
    """A remote checkpoint, complete but for one manifest entry (and object) named rel."""
    prefix = "bucket/run/checkpoint-epoch0-step8-files2"
    meta = realistic_meta()
    meta["format_version"] = manifest.FORMAT_VERSION
    objects, files = {}, {}
    for name, data in {**FLAT, rel: payload}.items():
        objects[f"{prefix}/{name}"] = data
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta["files"] = files
    objects[f"{prefix}/metadata.json"] = json.dumps(meta).encode()
    fs = ListingFS(objects)
    return fs, Location(fs, prefix, "gs://" + prefix), meta


def _files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("rel", ["../../evil.txt", "../evil.txt", "sub/../../evil.txt", "ABSOLUTE"])
def test_fetch_of_a_listing_with_dotdot_names_is_corrupt_and_writes_nothing_outside(tmp_path, rel):
    if rel == "ABSOLUTE":
        rel = str(tmp_path / "evil.txt")
    fs, loc, _ = _hostile_checkpoint(rel)
    scratch = tmp_path / "a" / "b" / "scratch"
    assert manifest.check(loc).status is Status.CORRUPT
    with pytest.raises(CheckpointError, match="corrupt"):
        transfer.fetch(loc, str(scratch))
    assert [p for p in _files_under(tmp_path) if "evil" in p] == []


@pytest.mark.parametrize("rel", ["../../evil.txt", "../evil.txt", "sub/../../evil.txt", "a\\..\\..\\evil.txt"])
def test_fetch_never_writes_outside_scratch_even_if_check_is_fooled(tmp_path, monkeypatch, rel):
    """Defence in depth: should check() ever pass such a manifest, the download still refuses."""
    fs, loc, meta = _hostile_checkpoint(rel)
    monkeypatch.setattr(transfer, "check", lambda loc, verify_hashes=False: manifest.CheckResult(
        Status.COMPLETE, "", meta))
    scratch = tmp_path / "a" / "b" / "scratch"
    with pytest.raises(CheckpointError, match="not inside the checkpoint"):
        transfer.fetch(loc, str(scratch))
    outside = [p for p in _files_under(tmp_path) if not p.startswith(os.path.join("a", "b", "scratch"))]
    assert outside == []


def test_fetch_does_not_follow_a_link_out_of_scratch(tmp_path, monkeypatch):
    fs, loc, meta = _hostile_checkpoint("link/evil.txt")
    monkeypatch.setattr(transfer, "check", lambda loc, verify_hashes=False: manifest.CheckResult(
        Status.COMPLETE, "", meta))
    scratch, elsewhere = tmp_path / "scratch", tmp_path / "elsewhere"
    os.makedirs(scratch)
    os.makedirs(elsewhere)
    os.symlink(elsewhere, scratch / "link")
    with pytest.raises(CheckpointError, match="not inside"):
        transfer.fetch(loc, str(scratch))
    assert os.listdir(elsewhere) == []


def test_fetch_of_a_sane_listing_fs_works(tmp_path):
    fs, loc, _ = _hostile_checkpoint("shards/part-0.bin", b"fine")
    scratch = tmp_path / "scratch"
    assert transfer.fetch(loc, str(scratch)) == str(scratch)
    assert (scratch / "shards" / "part-0.bin").read_bytes() == b"fine"


# --- one writer's metadata.json (issue 10): unique temp names, create-only commit --------------

def test_write_metadata_leaves_another_writers_temp_file_alone(tmp_path):
    folder = tmp_path / "local"
    os.makedirs(folder)
    (folder / "metadata.json.tmp").write_bytes(b"another writer")
    make_local(folder, FLAT)
    assert (folder / "metadata.json.tmp").read_bytes() == b"another writer"
    assert [n for n in os.listdir(folder) if n.endswith(".tmp")] == ["metadata.json.tmp"]


def test_upload_leaves_another_writers_temp_file_alone(tmp_path):
    local = tmp_path / "local"
    make_local(local, FLAT)
    dest_dir = tmp_path / "run" / "checkpoint-epoch0-step8-files2"
    os.makedirs(dest_dir)
    (dest_dir / "metadata.json.tmp").write_bytes(b"another writer")
    transfer.upload(str(local), resolve(str(dest_dir)))
    assert (dest_dir / "metadata.json.tmp").read_bytes() == b"another writer"
    assert (dest_dir / "metadata.json").read_bytes() == (local / "metadata.json").read_bytes()


@pytest.mark.parametrize("kind", ["local", "other"])
def test_a_second_writer_that_passed_the_first_check_fails_at_the_commit(tmp_path, monkeypatch, kind):
    """Two writers both saw no metadata.json; the first commits. The second's commit must fail
    loudly and leave the first's metadata.json, never replace it (a rename would)."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_local(first, FLAT)
    make_local(second, {**FLAT, "model.safetensors": b"the other writer"})
    dest_dir = tmp_path / "bucket" / "run" / "checkpoint-epoch0-step8-files2"
    if kind == "local":
        dest = resolve(str(dest_dir))
    else:  # a filesystem without a create-only primitive: check right before the rename
        os.makedirs(tmp_path / "bucket")
        fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
        dest = Location(fs, "run/checkpoint-epoch0-step8-files2", "sub://run/x")
    transfer.upload(str(first), dest)
    winner = (dest_dir / "metadata.json").read_bytes()
    real_look = transfer.read_marker
    calls = []

    def stale_look(at):  # the second writer's first look happened before the commit
        calls.append(at)
        return marker.Marker("absent") if len(calls) == 1 else real_look(at)

    monkeypatch.setattr(transfer, "read_marker", stale_look)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        transfer.upload(str(second), dest)
    assert (dest_dir / "metadata.json").read_bytes() == winner
    assert [n for n in os.listdir(dest_dir) if n.endswith(".tmp")] == []


def test_link_create_only_never_replaces(tmp_path):
    (tmp_path / "a.tmp").write_bytes(b"new")
    (tmp_path / "final").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        transfer.link_create_only(str(tmp_path / "a.tmp"), str(tmp_path / "final"))
    assert (tmp_path / "final").read_bytes() == b"old"
    transfer.link_create_only(str(tmp_path / "a.tmp"), str(tmp_path / "fresh"))
    assert (tmp_path / "fresh").read_bytes() == b"new"



# --- sharded (fsdp) checkpoints: every rank's files or nothing --------------------------------

SHARDED = {
    ".metadata": os.urandom(300), "__0_0.distcp": os.urandom(2000), "__1_0.distcp": os.urandom(2100),
    "scheduler_state.pt": b"sched", "rng_state_rank0.pt": os.urandom(64), "rng_state_rank1.pt": os.urandom(65),
    "training_metrics.json": b'{"loss_history": []}',
}
SHARDS = {"0": [".metadata", "__0_0.distcp", "rng_state_rank0.pt", "rng_state_rank1.pt",
                "scheduler_state.pt", "training_metrics.json"], "1": ["__1_0.distcp"]}


def put_sharded(run_dir, name="checkpoint-epoch0-step8-files2", **over):
    return make_local(os.path.join(run_dir, name), SHARDED,
                      realistic_meta(name, **{"strategy": "fsdp", "shards": SHARDS, **over}))


def test_sharded_checkpoint_complete_with_every_ranks_files(tmp_path):
    put_sharded(tmp_path)
    result = manifest.check(resolve(str(tmp_path / "checkpoint-epoch0-step8-files2")), verify_hashes=True)
    assert result.ok, result.reason
    assert set(result.metadata["files"]) == set(SHARDED)


def test_sharded_checkpoint_missing_one_ranks_shard_is_incomplete_and_skipped(tmp_path):
    put_sharded(tmp_path, "checkpoint-epoch0-step4-files1")
    put_sharded(tmp_path, "checkpoint-epoch0-step8-files2")
    os.remove(tmp_path / "checkpoint-epoch0-step8-files2" / "__1_0.distcp")  # rank 1 never landed
    result = manifest.check(resolve(str(tmp_path / "checkpoint-epoch0-step8-files2")))
    assert result.status is Status.INCOMPLETE and "__1_0.distcp is missing" in result.reason
    assert str(listing.latest_complete(resolve(str(tmp_path))).name) == "checkpoint-epoch0-step4-files1"


@pytest.mark.parametrize("shards, words", [
    (None, "shards is None"),
    ({"0": SHARDS["0"]}, "no files for rank 1 of 2"),
    ({**SHARDS, "1": []}, "no files for rank 1 of 2"),
    ({**SHARDS, "1": ["__7_0.distcp"]}, "'__7_0.distcp' for rank 1, which the file list lacks"),
    ({**SHARDS, "2": ["__1_0.distcp"]}, "rank '2', outside world_size 2"),
])
def test_sharded_metadata_must_name_every_ranks_files(tmp_path, shards, words):
    put_sharded(tmp_path, shards=shards)
    result = manifest.check(resolve(str(tmp_path / "checkpoint-epoch0-step8-files2")))
    assert result.status is Status.CORRUPT and words in result.reason, result.reason


def test_sharded_metadata_must_list_the_dcp_index_and_a_known_strategy(tmp_path):
    files = {k: v for k, v in SHARDED.items() if k != ".metadata"}
    shards = {"0": [f for f in SHARDS["0"] if f != ".metadata"], "1": SHARDS["1"]}
    make_local(tmp_path / "checkpoint-epoch0-step8-files2", files,
               realistic_meta(strategy="fsdp", shards=shards))
    result = manifest.check(resolve(str(tmp_path / "checkpoint-epoch0-step8-files2")))
    assert result.status is Status.CORRUPT and "lacks .metadata" in result.reason
    put_sharded(tmp_path / "other", strategy="zero3")
    result = manifest.check(resolve(str(tmp_path / "other" / "checkpoint-epoch0-step8-files2")))
    assert result.status is Status.CORRUPT and "strategy is 'zero3'" in result.reason


def test_upload_files_then_commit_is_the_upload(tmp_path):
    """A rank's upload (files, no commit) leaves an incomplete checkpoint; the commit completes
    it, create-only."""
    local = tmp_path / "local"
    meta = make_local(local, FLAT)
    dest = resolve(str(tmp_path / "run" / "checkpoint-epoch0-step8-files2"))
    transfer.upload_files(str(local), dest)
    assert manifest.check(dest).status is Status.INCOMPLETE
    assert transfer.missing_or_wrong_size(dest, meta["files"]) == []
    transfer.commit(dest, (local / "metadata.json").read_bytes())
    assert manifest.check(dest, verify_hashes=True).ok
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        transfer.commit(dest, b"{}")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        transfer.upload_files(str(local), dest)
    os.remove(dest.path + "/optimizer.pt")
    assert transfer.missing_or_wrong_size(dest, meta["files"]) == ["optimizer.pt"]
