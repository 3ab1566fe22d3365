"""Spot capacity on real Ray (issue 22): an elastic job (`--min-workers 1 --num-workers 2`) on two
"spot" nodes joined to the session's cluster, each offering one training slot, lives through a
node lost without notice (its raylet SIGKILLed), the node's return (the group grows back after
saving the step in progress) and a spot VM's shutdown (SIGTERM to every process of the node,
SIGKILL 25 s later: the node's clusters/spot_watch.py turns it into Ray's preemption notice,
a drain with a deadline), and ends with every sample of each epoch trained exactly once, in the
order of a straight 2-worker run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from conftest import read_json

from ray_job import launcher
from ray_job.launcher import BIN, REPO
from storage.emulator import free_port

STEPS = 480
EVERY = 8
GRACE_S = 20  # spot_watch's drain deadline, before the SIGKILL at 25 s
WATCH_LOG = Path(tempfile.gettempdir()) / f"spot_watch-test-{os.getpid()}.log"
G = 16


def _spot_node(address: str, tag: str, watched: bool = False) -> tuple[str, int]:
    """A node with one training slot: (node id, node manager port)."""
    port = free_port()
    start = [str(BIN / "ray"), "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f'--resources={{"train_slot": 1, "{tag}": 1}}', f"--node-manager-port={port}", "--disable-usage-stats"]
    if watched:  # as cluster.yaml starts its spot nodes
        start = [sys.executable, str(REPO / "clusters" / "spot_watch.py"), "--grace-s", str(GRACE_S),
                 "--log", str(WATCH_LOG), "--", *start]
    subprocess.run(start, env=launcher.env(), check=True, capture_output=True, timeout=180)
    code = (f"import ray, json; ray.init(address={address!r}, log_to_driver=False); "
            f"print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and {tag!r} in n['Resources']]))")
    p = subprocess.run([sys.executable, "-c", code], env=launcher.env(), capture_output=True, text=True, timeout=120)
    (node,) = json.loads(p.stdout.strip().splitlines()[-1])
    return node, port


def _node_processes(port: int) -> set[int]:
    """Every process of the node: its raylet and what it started (they name its port), and its
    spot watcher (it names the port in the ray start command it ran)."""
    from clusters import local

    return local.processes([f"--node_manager_port={port}", f"--node-manager-port={port}"])


def _raylet(port: int) -> int | None:
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if args and args[0].endswith(b"/raylet") and f"--node_manager_port={port}".encode() in args:
            return int(entry)
    return None


def _kill(port: int, sig=signal.SIGKILL, everything: bool = True) -> None:
    """Signal every process of the node, or only its raylet (a `kill -9` of the raylet)."""
    for pid in _node_processes(port) if everything else {_raylet(port)} - {None}:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Trail:
    """The audit (--audit-dir): one record per (attempt, rank, step) trained."""

    def __init__(self, folder):
        self.folder = folder

    def records(self) -> list[dict]:
        out = []
        for f in sorted(self.folder.glob("rank*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    out.append({**json.loads(line), "rank": int(f.stem[4:])})
                except ValueError:
                    pass  # a line being written
        return out

    def attempts(self) -> list[tuple[int, int]]:
        """(pid of rank 0, world size) of each attempt so far, in order."""
        seen = []
        for r in self.records():
            if r["rank"] == 0 and (not seen or seen[-1][0] != r["pid"]):
                seen.append((r["pid"], G // len(r["ids"])))
        return seen

    def last_step(self) -> int:
        return max((r["step"] for r in self.records()), default=0)


def _wait(what, until, job, timeout=240):
    deadline = time.monotonic() + timeout
    while not until():
        assert job.poll() is None, f"the job ended while waiting for {what}: {job.stdout.read()[-6000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_elastic_job_shrinks_grows_and_rides_a_spot_shutdown(runs, ray_cluster):
    (_, a), (_, b) = _spot_node(ray_cluster.address, "spot_a"), _spot_node(ray_cluster.address, "spot_b")
    ports = [a, b]
    trail = Trail(runs.storage.parent / "audit" / "elastic")
    args = ["--config", "test", "--storage", runs.storage, "--run-name", "elastic", "--set", f"data.path={runs.data}",
            "--min-workers", 1, "--num-workers", 2, "--set", 'scaling.worker_resources={"train_slot": 1}',
            "--set", "scaling.resize_check_s=5", "--checkpoint-every", EVERY, "--max-steps", STEPS,
            "--set", "train.val_every=0", "--audit-dir", trail.folder]
    job = launcher.start(args, ray_address=ray_cluster.address)
    try:
        # (Ray may start the group at 1 worker and grow it once the second node's slot shows.)
        _wait("2 workers", lambda: trail.attempts() and trail.attempts()[-1][1] == 2 and trail.last_step() >= 4, job)
        # (a) a node lost without notice: the job goes on at 1 worker
        _kill(b, everything=False)
        _wait("the group at 1 worker", lambda: trail.attempts()[-1][1] == 1, job)
        # the node returns, watched as cluster.yaml's: the group grows back to 2 (saving first)
        shrunk_attempts = len(trail.attempts())
        (_, c) = _spot_node(ray_cluster.address, "spot_c", watched=True)
        ports.append(c)
        _wait("the group at 2 workers again",
              lambda: len(trail.attempts()) > shrunk_attempts and trail.attempts()[-1][1] == 2, job)
        grown_at = trail.last_step()
        # (c) the node is shut down as a spot VM is: SIGTERM to every process, SIGKILL 25 s later
        _wait("a few steps at 2 workers", lambda: trail.last_step() >= grown_at + 3, job)
        _kill(c, signal.SIGTERM)
        sigterm = time.monotonic()
        _wait("the SIGKILL", lambda: time.monotonic() > sigterm + 25, job, timeout=60)
        _kill(c)
        out = job.communicate(timeout=600)[0]
    finally:
        if job.poll() is None:
            job.kill()
        for port in ports:
            _kill(port)
    assert job.returncode == 0, out[-6000:]
    assert "1..2 workers (elastic)" in out
    shrunk = r"↘️  Resized: 2 -> 1 workers \(node [0-9a-f]{12} lost\); resuming from checkpoint-"
    assert re.search(shrunk, out), out[-6000:]
    assert "↗️  Resized: 1 -> 2 workers; resuming from checkpoint-" in out, out[-6000:]
    assert "⚠️  Preemption notice" in out, out[-6000:]
    assert "SIGTERM: drain of" in WATCH_LOG.read_text()

    records = trail.records()
    rank0 = [r for r in records if r["rank"] == 0]
    again = sorted(s for s, n in Counter(r["step"] for r in rank0).items() if n > 1)
    # only the node lost without notice costs steps (those after the checkpoint before it):
    # at most checkpoint.every; growing back and the spot shutdown cost none
    assert again and len(again) <= EVERY and again == list(range(again[0], again[-1] + 1)), again
    assert again[-1] < grown_at, (again, grown_at)
    preempted = [read_json(p) for p in (runs.storage / "elastic").glob("checkpoint-*/metadata.json")]
    notice = [m["step"] for m in preempted if m.get("preempted")]
    assert len(notice) == 1 and notice[0] > grown_at
    resumed = re.findall(r"Resumed from checkpoint: checkpoint-epoch\d+-step(\d+)-", out)
    assert str(notice[0]) in resumed  # the shutdown's restart began at the notice's step

    # the global batch of each step, from the attempt that trained it last, in rank order
    batches: dict[int, list] = {}
    for r in records:
        if r["rank"] == 0:
            batches[r["step"]] = [r["ids"]]
    for r in records:  # rank 1's batch of the same attempt follows rank 0's
        if r["rank"] == 1 and len(batches[r["step"]][0]) < G:
            batches[r["step"]][1:] = [r["ids"]]
    batches = {s: [i for part in parts for i in part] for s, parts in batches.items()}
    assert sorted(batches) == list(range(1, STEPS + 1)) and all(len(b) == G for b in batches.values())
    # the order of a straight 2-worker run (the shared one: 40 steps)
    straight: dict[int, list] = {}
    for f in sorted(runs.audit.joinpath("straight").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            straight.setdefault(json.loads(line)["step"], []).extend(json.loads(line)["ids"])
    assert all(batches[s] == straight[s] for s in range(1, 41))
    # every epoch a permutation of the corpus: each sample exactly once
    per_epoch = 24
    corpus = sorted(i for s in range(1, per_epoch + 1) for i in batches[s])
    for e in range(STEPS // per_epoch):
        assert sorted(i for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1) for i in batches[s]) == corpus, e
    assert {m["world_size"] for m in preempted} == {1, 2}  # checkpoints keep their world size
