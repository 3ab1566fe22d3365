"""Spot capacity on real Ray (issue 22): an elastic job (`--min-workers 1 --num-workers 2`) on two
"spot" nodes joined to the session's cluster, each offering one training slot, lives through a
node lost without notice (its raylet SIGKILLed), the node's return (the group grows back after
saving the step in progress) and a spot VM's shutdown (SIGTERM to every process of the node,
SIGKILL 25 s later: the node's clusters/spot_watch.py turns it into Ray's preemption notice,
a drain with a deadline), and ends with every sample of each epoch trained exactly once, in the
order of a straight 2-worker run. Under fsdp: DCP reshards the state at every resize (2 -> 1 ->
2 -> 1)."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

from conftest import read_json

from clusters import nodes
from clusters.nodes import Trail
from ray_job import launcher

STEPS = 720  # 30 epochs of the test corpus; 4 steps a second at most until the events are over
PACING = Path(tempfile.gettempdir()) / f"elastic-test-paced-{os.getpid()}"
PACE = ["--set", "model.factory=tests.integration.user_models.tiny:paced",
        "--set", f'model.kwargs={{"while_exists": "{PACING}"}}']
EVERY = 8
G = 16
GRACE_S = 20  # spot_watch's drain deadline, before the SIGKILL at 25 s
WATCH_LOG = Path(tempfile.gettempdir()) / f"spot_watch-test-{os.getpid()}.log"


def _wait(what, until, job, timeout=240):
    deadline = time.monotonic() + timeout
    while not until():
        assert job.poll() is None, f"the job ended while waiting for {what}: {job.stdout.read()[-6000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_elastic_job_shrinks_grows_and_rides_a_spot_shutdown(runs, ray_cluster):
    env = launcher.env()
    (_, a), (_, b) = (nodes.add(ray_cluster.address, tag, env) for tag in ("spot_a", "spot_b"))
    ports = [a, b]
    trail = Trail(runs.storage.parent / "audit" / "elastic", G)
    args = ["--config", "test", "--storage", runs.storage, "--run-name", "elastic", "--set", f"data.path={runs.data}",
            "--min-workers", 1, "--num-workers", 2, "--set", 'scaling.worker_resources={"train_slot": 1}',
            "--set", "scaling.resize_check_s=5", "--checkpoint-every", EVERY, "--max-steps", STEPS,
            "--set", "train.val_every=0", "--set", "train.strategy=fsdp", *PACE, "--audit-dir", trail.folder]
    PACING.touch()
    job = launcher.start(args, ray_address=ray_cluster.address)
    try:
        # (Ray may start the group at 1 worker and grow it once the second node's slot shows.)
        at_two = lambda: trail.attempts() and trail.attempts()[-1]["world"] == 2 and trail.last_step() >= 4  # noqa: E731
        _wait("2 workers", at_two, job)
        # (a) a node lost without notice: the job goes on at 1 worker
        nodes.kill(b, everything=False)
        _wait("the group at 1 worker", lambda: trail.attempts()[-1]["world"] == 1, job)
        # the node returns, watched as cluster.yaml's: the group grows back to 2 (saving first)
        shrunk_attempts = len(trail.attempts())
        (_, c) = nodes.add(ray_cluster.address, "spot_c", env, watch_log=WATCH_LOG, grace_s=GRACE_S)
        ports.append(c)
        _wait("the group at 2 workers again",
              lambda: len(trail.attempts()) > shrunk_attempts and trail.attempts()[-1]["world"] == 2, job)
        grown_at = trail.last_step()
        # (c) the node is shut down as a spot VM is: SIGTERM to every process, SIGKILL 25 s later
        _wait("a few steps at 2 workers", lambda: trail.last_step() >= grown_at + 3, job)
        nodes.kill(c, signal.SIGTERM)
        sigterm = time.monotonic()
        _wait("the SIGKILL", lambda: time.monotonic() > sigterm + 25, job, timeout=60)
        nodes.kill(c)
        _wait("the group at 1 worker again", lambda: trail.attempts()[-1]["world"] == 1, job)
        PACING.unlink()  # the rest at full speed
        out = job.communicate(timeout=600)[0]
    finally:
        PACING.unlink(missing_ok=True)
        if job.poll() is None:
            job.kill()
        for port in ports:
            nodes.kill(port)
    assert job.returncode == 0, out[-6000:]
    assert "1..2 workers (elastic)" in out
    shrunk = r"↘️  Resized: 2 -> 1 workers \(node [0-9a-f]{12} lost\); resuming from checkpoint-"
    assert re.search(shrunk, out), out[-6000:]
    assert "↗️  Resized: 1 -> 2 workers; resuming from checkpoint-" in out, out[-6000:]
    assert "⚠️  Preemption notice" in out, out[-6000:]
    assert "SIGTERM: drain of" in WATCH_LOG.read_text()

    again = trail.retrained()
    # only the node lost without notice costs steps (those after the checkpoint before it):
    # at most checkpoint.every; growing back and the spot shutdown cost none
    assert again and len(again) <= EVERY and again == list(range(again[0], again[-1] + 1)), again
    assert again[-1] < grown_at, (again, grown_at)
    preempted = [read_json(p) for p in (runs.storage / "elastic").glob("checkpoint-*/metadata.json")]
    notice = [m["step"] for m in preempted if m.get("preempted")]
    assert len(notice) == 1 and notice[0] > grown_at
    resumed = re.findall(r"Resumed from checkpoint: checkpoint-epoch\d+-step(\d+)-", out)
    assert str(notice[0]) in resumed  # the shutdown's restart began at the notice's step

    batches = trail.batches()
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
