"""Two launches writing the same checkpoint name before either commits (a killed or taken-over
launch and its successor): equal sizes, different bytes. Every interleaving of their storage
steps (look, claim, delete, create, check, commit) is run, on local disk and on a real GCS API
server (fake-gcs-server on 127.0.0.1). Whatever the order, the checkpoint ends either
incomplete or complete with one writer's bytes: never a metadata.json whose hashes the files
fail. Also each guard alone: create-only uploads, generation-matched deletes, the commit's
byte check."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from storage import gcs as gcs_api
from storage import manifest, marker, transfer
from storage.location import resolve
from storage.manifest import CheckpointError

NAME = "checkpoint-epoch0-step8-files2"
SIZE = 64
BOUND = {"local": 3, "gcs": 2}  # preemptions per order: hundreds of orders locally, tens on GCS


def _local_checkpoint(folder, tag: bytes, rels) -> dict:
    """A writer's finished local snapshot: files of SIZE bytes that differ between writers."""
    os.makedirs(folder, exist_ok=True)
    files = {}
    for rel in rels:
        data = hashlib.sha256(tag + rel.encode()).digest() * (SIZE // 32)
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
        files[rel] = data
    manifest.write_metadata(str(folder), {"name": NAME, "step": 8})
    return files


# --- a deterministic scheduler: one storage step at a time, in a chosen order -------------------

STEPS = ("_create", "_identity", "_delete_seen", "read_marker", "_create_marker", "_replace_marker",
         "not_written_by")


class Schedule:
    """Runs writer threads so that exactly one storage step runs at a time, in the order given by
    choices (then the lowest-numbered writer ready); records which writers were ready at each
    step, so that every order can be enumerated."""

    def __init__(self, monkeypatch, choices: list[int]):
        self.choices, self.trace = list(choices), []
        self.index = {}
        self.go: list[threading.Semaphore] = []
        self.back = threading.Semaphore(0)
        self.done: list[bool] = []
        for module in (transfer, marker):  # each step wherever a caller looks it up
            for step in STEPS:
                if hasattr(module, step):
                    monkeypatch.setattr(module, step, self._gated(getattr(module, step)))

    def _gated(self, real):
        def gated(*args, **kwargs):
            i = self.index.get(threading.get_ident())
            if i is not None:
                self.back.release()
                self.go[i].acquire()
            return real(*args, **kwargs)
        return gated

    def run(self, writers) -> list:
        outcomes: list = [None] * len(writers)
        self.go = [threading.Semaphore(0) for _ in writers]
        self.done = [False] * len(writers)

        def body(i, fn):
            self.index[threading.get_ident()] = i
            try:
                outcomes[i] = fn()
            except CheckpointError as e:
                outcomes[i] = e
            finally:
                self.done[i] = True
                self.back.release()

        threads = [threading.Thread(target=body, args=(i, fn)) for i, fn in enumerate(writers)]
        for t in threads:
            t.start()
        for _ in threads:  # each at its first step (or finished)
            self.back.acquire()
        while True:
            ready = [i for i, d in enumerate(self.done) if not d]
            if not ready:
                break
            last = self.trace[-1][1] if self.trace else None
            options = [last] + [i for i in ready if i != last] if last in ready else ready
            pick = self.choices[len(self.trace)] if len(self.trace) < len(self.choices) else options[0]
            self.trace.append((options, pick))
            self.go[pick].release()
            assert self.back.acquire(timeout=30), "a writer hung"
        for t in threads:
            t.join(10)
        return outcomes


def _next(trace, bound: int) -> list[int] | None:
    """The next order after trace in depth-first order with at most bound preemptions (a switch
    away from a writer that could go on), or None when all were run. Races between two
    writers need a few switches; the bound keeps the count in the hundreds, not thousands."""
    def preemptions(picks):
        return sum(1 for k in range(1, len(picks)) if picks[k] != picks[k - 1] and picks[k - 1] in trace[k][0])

    for k in range(len(trace) - 1, -1, -1):
        options, pick = trace[k]
        for other in options[options.index(pick) + 1:]:
            picks = [p for _, p in trace[:k]] + [other]
            if preemptions(picks) <= bound:
                return picks
    return None


def _every_order(monkeypatch, make_writers, check, bound: int) -> dict:
    """Run the writers in every interleaving of their storage steps with at most bound
    preemptions; check(dest, outcomes) after each."""
    choices: list[int] | None = []
    n, verdicts = 0, {}
    while choices is not None:
        with monkeypatch.context() as m:
            schedule = Schedule(m, choices)
            writers, dest = make_writers(n)
            outcomes = schedule.run(writers)
        verdict = check(dest, outcomes)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        choices = _next(schedule.trace, bound)
        n += 1
    return verdicts


@pytest.fixture
def on_gcs(gcs, monkeypatch):
    monkeypatch.setenv(gcs_api.EMULATOR_HOST, gcs.url)
    gcs_api.client.cache_clear()
    yield gcs
    gcs_api.client.cache_clear()


def _run_root(kind, tmp_path, request):
    if kind == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("on_gcs")
    return f"gs://ckpts/two-writers/{request.node.name}-{os.urandom(4).hex()}"


def _stored_bytes(dest, rel) -> bytes | None:
    try:
        with dest.fs.open_input_stream(f"{dest.path}/{rel}") as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def _verdict(dest, outcomes) -> str:
    """What a reader finds: incomplete (no commit, or a listed file missing), or complete with
    every listed file's sha256 right and all of one writer's. A listed file that is there with
    other bytes is the failure this test is about."""
    found = transfer.read_marker(dest)
    if found.kind != "commit":
        return "incomplete"
    listed = json.loads(found.version if isinstance(found.version, bytes) else
                        _stored_bytes(dest, "metadata.json"))["files"]
    stored = {rel: _stored_bytes(dest, rel) for rel in listed}
    if any(data is None for data in stored.values()):
        return "incomplete"
    wrong = [rel for rel, data in stored.items() if hashlib.sha256(data).hexdigest() != listed[rel]["sha256"]]
    assert not wrong, f"a committed checkpoint fails its hashes: {wrong} ({outcomes})"
    winners = [i for i, o in enumerate(outcomes) if o == "committed"]
    assert len(winners) == 1, outcomes
    return f"complete, writer {winners[0]}'s"


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_two_writers_of_one_name_in_every_order_never_leave_a_checkpoint_that_fails_its_hashes(
        kind, tmp_path, monkeypatch, request):
    root = _run_root(kind, tmp_path, request)
    rels = ["model.safetensors"]
    snapshots = [tmp_path / "a", tmp_path / "b"]
    for i, folder in enumerate(snapshots):
        _local_checkpoint(folder, b"writer %d" % i, rels)

    def make_writers(n):
        dest = resolve(f"{root}/{n}").child(NAME)

        def writer(folder):
            def upload():
                transfer.upload(str(folder), dest)
                return "committed"
            return upload

        return [writer(f) for f in snapshots], dest

    verdicts = _every_order(monkeypatch, make_writers, _verdict, BOUND[kind])
    # Every order was run (hundreds), some ended complete (e.g. one writer wholly first), and
    # none left a checkpoint that fails its hashes (_verdict).
    assert sum(verdicts.values()) > (200 if kind == "local" else 30), verdicts
    assert verdicts.get("complete, writer 0's") and verdicts.get("complete, writer 1's"), verdicts


def test_a_killed_writers_leftover_is_replaced_and_the_commit_verifies(tmp_path):
    """The successor of a launch killed mid-upload: its same-size file is removed (claimed first)
    and replaced; the checkpoint verifies."""
    a, b = tmp_path / "a", tmp_path / "b"
    _local_checkpoint(a, b"killed", ["model.safetensors"])
    _local_checkpoint(b, b"successor", ["model.safetensors"])
    dest = resolve(str(tmp_path / "run")).child(NAME)
    transfer.upload_files(str(a), dest, "killed-launch")
    transfer.upload(str(b), dest)
    assert _verdict(dest, [None, "committed"]) == "complete, writer 1's"


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_the_commit_refuses_a_file_another_writer_replaced_with_the_same_size(kind, tmp_path, request):
    """The commit's byte check alone: after this writer's upload another writer's file of the same
    size took one file's place (as today's race left it). Not committed; sizes alone would pass."""
    root = _run_root(kind, tmp_path, request)
    a, b = tmp_path / "a", tmp_path / "b"
    _local_checkpoint(a, b"ours", ["model.safetensors"])
    theirs = _local_checkpoint(b, b"theirs", ["model.safetensors"])
    dest = resolve(root).child(NAME)
    stored = transfer.upload_files(str(a), dest, "ours")
    target = f"{dest.path}/model.safetensors"
    if dest.is_gcs:
        gcs_api.client().bucket("ckpts").blob(target.split("/", 1)[1]).upload_from_string(theirs["model.safetensors"])
    else:
        os.unlink(target)
        with open(target, "wb") as f:
            f.write(theirs["model.safetensors"])
    files = json.loads((a / "metadata.json").read_text())["files"]
    assert transfer.missing_or_wrong_size(dest, files) == []  # what the commit checked before
    assert transfer.not_written_by(dest, files, stored) == ["model.safetensors"]


def test_create_only_upload_of_a_shard_over_8_mb_on_gcs_never_replaces(on_gcs, tmp_path):
    """google-cloud-storage uploads files over 8 MB with a resumable upload: the create-only
    precondition (if_generation_match=0) must hold there too."""
    big_a, big_b = tmp_path / "a.bin", tmp_path / "b.bin"
    big_a.write_bytes(os.urandom(9 << 20))
    big_b.write_bytes(os.urandom(9 << 20))
    path = f"ckpts/big/{os.urandom(4).hex()}/__0_0.distcp"
    first = gcs_api.upload_create_only(path, str(big_a))
    with pytest.raises(FileExistsError):
        gcs_api.upload_create_only(path, str(big_b))
    assert gcs_api.stat(path) == first
    assert gcs_api.upload_create_only(path, str(big_a)) == first  # the same bytes: a retry that landed


def test_a_delete_is_matched_against_the_generation_seen(on_gcs):
    """A writer that saw generation g of another's file deletes g only: a newer object there
    (written after the look) is kept."""
    path = f"ckpts/gen/{os.urandom(4).hex()}/model.safetensors"
    seen = gcs_api.write_create_only(path, b"x" * SIZE)
    bucket, key = path.split("/", 1)
    gcs_api.client().bucket(bucket).blob(key).upload_from_string(b"y" * SIZE)  # replaced after the look
    assert not gcs_api.delete_generation(path, seen)
    assert gcs_api.client().bucket(bucket).blob(key).download_as_bytes() == b"y" * SIZE
    assert gcs_api.delete_generation(path, gcs_api.stat(path)["generation"])
    assert gcs_api.stat(path) is None


def test_upload_on_gcs_creates_every_file_once_and_never_overwrites(on_gcs, tmp_path):
    """The real GCS path (google-cloud-storage against the server): a second writer of a
    committed name is refused and changes nothing; a second commit is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    ours = _local_checkpoint(a, b"first", ["model.safetensors", "optimizer.pt"])
    _local_checkpoint(b, b"second", ["model.safetensors", "optimizer.pt"])
    dest = resolve(f"gs://ckpts/once/{os.urandom(4).hex()}").child(NAME)
    transfer.upload(str(a), dest)
    assert _verdict(dest, ["committed"]) == "complete, writer 0's"
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        transfer.upload(str(b), dest)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        transfer.commit(dest, b"{}", "anyone")
    assert {rel: _stored_bytes(dest, rel) for rel in ours} == ours
    assert _stored_bytes(dest, "metadata.json") == (a / "metadata.json").read_bytes()
