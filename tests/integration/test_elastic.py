"""Spot capacity on real Ray (issue 22): an elastic job (`--min-workers 1 --num-workers 2`) on two
"spot" nodes joined to the session's cluster, each offering one training slot, lives through a
node lost without notice (its raylet SIGKILLed), the node's return (the group grows back after
saving the step in progress) and a preemption notice (`ray drain-node` with a deadline; the node
dies at the deadline), and ends with every sample of each epoch trained exactly once, in the
order of a straight 2-worker run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

from conftest import read_json

from ray_job import launcher
from ray_job.launcher import BIN

STEPS = 480
EVERY = 4
G = 16


def _spot_node(address: str, tag: str) -> str:
    """A node with one training slot; its node id."""
    start = [str(BIN / "ray"), "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f'--resources={{"train_slot": 1, "{tag}": 1}}', "--disable-usage-stats"]
    subprocess.run(start, env=launcher.env(), check=True, capture_output=True, timeout=180)
    code = (f"import ray, json; ray.init(address={address!r}, log_to_driver=False); "
            f"print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and {tag!r} in n['Resources']]))")
    p = subprocess.run([sys.executable, "-c", code], env=launcher.env(), capture_output=True, text=True, timeout=120)
    (node,) = json.loads(p.stdout.strip().splitlines()[-1])
    return node


def _raylet(node_id: str) -> int | None:
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if args and args[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in args:
            return int(entry)
    return None


def _kill(node_id: str) -> None:
    pid = _raylet(node_id)
    if pid:
        os.kill(pid, signal.SIGKILL)


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


def test_elastic_job_shrinks_grows_and_rides_a_preemption(runs, ray_cluster):
    a, b = _spot_node(ray_cluster.address, "spot_a"), _spot_node(ray_cluster.address, "spot_b")
    nodes = [a, b]
    trail = Trail(runs.storage.parent / "audit" / "elastic")
    args = ["--config", "test", "--storage", runs.storage, "--run-name", "elastic", "--set", f"data.path={runs.data}",
            "--min-workers", 1, "--num-workers", 2, "--set", 'scaling.worker_resources={"train_slot": 1}',
            "--set", "scaling.resize_check_s=5", "--checkpoint-every", EVERY, "--max-steps", STEPS,
            "--set", "train.val_every=0", "--audit-dir", trail.folder]
    job = launcher.start(args, ray_address=ray_cluster.address)
    try:
        # (a) a node lost without notice: the job goes on at 1 worker
        _wait("step 6", lambda: trail.last_step() >= 6, job)
        killed_at = trail.last_step()
        _kill(b)
        _wait("the group at 1 worker", lambda: trail.attempts()[-1][1] == 1, job)
        # the node returns: the group grows back to 2
        nodes.append(b2 := _spot_node(ray_cluster.address, "spot_b2"))
        _wait("the group at 2 workers again", lambda: len(trail.attempts()) >= 3 and trail.attempts()[-1][1] == 2, job)
        grown_at = trail.last_step()
        # (b) a preemption notice with a deadline; the node dies at the deadline
        victim = b2
        _wait("a few steps at 2 workers", lambda: trail.last_step() >= grown_at + 5, job)
        subprocess.run([str(BIN / "ray"), "drain-node", f"--address={ray_cluster.address}", f"--node-id={victim}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
                        "--deadline-remaining-seconds=15"], env=launcher.env(), check=True, capture_output=True,
                       timeout=60)
        drained = time.monotonic()
        _wait("the deadline", lambda: time.monotonic() > drained + 15, job, timeout=60)
        _kill(victim)
        out = job.communicate(timeout=600)[0]
    finally:
        if job.poll() is None:
            job.kill()
        for node in nodes:
            _kill(node)
    assert job.returncode == 0, out[-6000:]
    assert "1..2 workers (elastic)" in out
    assert re.search(r"↘️  Resized: 2 -> 1 workers \(node [0-9a-f]{12} lost\); resuming from checkpoint-", out), out[-6000:]
    assert "↗️  Resized: 1 -> 2 workers; resuming from checkpoint-" in out, out[-6000:]
    assert "⚠️  Preemption notice" in out

    records = trail.records()
    rank0 = [r for r in records if r["rank"] == 0]
    counts = Counter(r["step"] for r in rank0)
    again = sorted(s for s, n in counts.items() if n > 1)
    # only the kill without notice costs steps, at most checkpoint.every; the grow and the
    # preemption notice cost none
    assert again and all(killed_at - EVERY < s <= killed_at + 2 for s in again), (again, killed_at)
    assert len(again) <= EVERY, again

    # the last attempt to train each step counts: its global batch, in rank order
    batches: dict[int, list[int]] = {}
    for r in rank0:
        batches[r["step"]] = list(r["ids"])
    rank1 = {}
    for r in records:
        if r["rank"] == 1:
            rank1[(r["step"], r["pid"])] = r["ids"]
    last_rank1 = {}
    for r in records:
        if r["rank"] == 1:
            last_rank1[r["step"]] = r["ids"]
    for step, ids in batches.items():
        if len(ids) < G:
            batches[step] = ids + list(last_rank1[step])
    assert sorted(batches) == list(range(1, STEPS + 1))
    # the order of a straight 2-worker run (the shared one: 40 steps)
    straight = {}
    for r in sorted(runs.audit.joinpath("straight").glob("rank*.jsonl")):
        for line in r.read_text().splitlines():
            rec = json.loads(line)
            straight.setdefault(rec["step"], []).append((int(r.stem[4:]), rec["ids"]))
    for step in range(1, 41):
        assert batches[step] == [i for _, ids in sorted(straight[step]) for i in ids], step
    # every epoch a permutation of the corpus: each sample exactly once
    per_epoch = 24
    corpus = sorted(i for s in range(1, per_epoch + 1) for i in batches[s])
    for e in range(STEPS // per_epoch):
        ids = sorted(i for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1) for i in batches[s])
        assert ids == corpus, e
    # checkpoints keep their world size
    sizes = {read_json(p)["world_size"] for p in (runs.storage / "elastic").glob("checkpoint-*/metadata.json")}
    assert sizes == {1, 2}
