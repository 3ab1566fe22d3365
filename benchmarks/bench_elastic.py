"""Spot capacity: what each event costs an elastic job (`--min-workers 1 --num-workers 2`), on a Ray
cluster of this machine (a head and two "spot" nodes of one training slot each, the second one
started through clusters/spot_watch.py as cluster.yaml starts its workers).

In one job of the test preset, for each strategy: (a) `kill -9` of a spot node's raylet, then
the node returns; (b) a drain notice with a 30 s deadline and the node's end at the deadline,
then it returns; (c) SIGTERM to every process of a node, SIGKILL 25 s later. For each event:
steps retrained (a step's batch in the audit twice), seconds from the event to the first step at
the smaller size and from the node's return to the first step at full size; over the job: each
epoch a permutation of the corpus and the global batch sequence of a straight 2-worker run; the
final loss against that run's.

    python benchmarks/bench_elastic.py                     # ddp and fsdp, ~15 min on 2 cores
    python benchmarks/bench_elastic.py --strategy ddp
Goals: 0 steps retrained for (b) and (c), at most checkpoint.every for (a); at most 60 s to the
first step at the smaller size. No --quick smoke run: tests/integration/test_elastic.py runs the
same harness (clusters/nodes.py) through a kill, a return and a spot shutdown.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from clusters import local, nodes
from clusters.nodes import Trail
from ray_job import launcher

G, EVERY, PER_EPOCH = 16, 8, 24


def head(temp: Path) -> str:
    port = local.free_port("127.0.0.1")
    subprocess.run([str(nodes.BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
                    f"--dashboard-agent-listen-port={local.free_port('127.0.0.1')}"],
                   env=launcher.env(), check=True, capture_output=True, timeout=180)
    return f"127.0.0.1:{port}"


def common(root: Path, steps: int, strategy: str) -> list:
    return ["--config", "test", "--storage", root / "ckpt", "--set", f"data.path={root / 'data'}",
            "--checkpoint-every", EVERY, "--max-steps", steps, "--set", "train.val_every=0",
            "--set", f"train.strategy={strategy}", "--set", 'scaling.worker_resources={"train_slot": 1}']


def wait(until, job, timeout=300):
    deadline = time.monotonic() + timeout
    while not until():
        if job.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job ended or stalled: {job.stdout.read()[-3000:] if job.stdout else ''}")
        time.sleep(0.05)


def elastic_job(address: str, root: Path, steps: int, strategy: str, log: Path) -> dict:
    env = launcher.env()
    trail = Trail(root / "audit" / f"elastic-{strategy}", G)
    ports = [nodes.add(address, f"spot_{strategy}_a", env)[1], nodes.add(address, f"spot_{strategy}_b", env)[1]]
    job = launcher.start([*common(root, steps, strategy), "--run-name", f"elastic-{strategy}", "--min-workers", 1,
                          "--num-workers", 2, "--set", "scaling.resize_check_s=5", "--audit-dir", trail.folder],
                         ray_address=address)
    events: list[dict] = []
    n = 0

    def returns(after: dict) -> None:
        nonlocal n
        n += 1
        node, port = nodes.add(address, f"spot_{strategy}_r{n}", env, watch_log=log, grace_s=20)
        ports.append(port)
        after["returned"] = time.time()
        count = len(trail.attempts())
        wait(lambda: len(trail.attempts()) > count and trail.attempts()[-1]["world"] == 2, job)

    def shrinks(event: dict) -> None:
        count = len(trail.attempts())
        wait(lambda: len(trail.attempts()) > count and trail.attempts()[-1]["world"] == 1, job)

    try:
        wait(lambda: trail.attempts() and trail.attempts()[-1]["world"] == 2 and trail.last_step() >= 4, job)
        # (a) a node lost without notice
        events.append(a := {"event": "kill -9 of the raylet", "t": time.time()})
        nodes.kill(ports[1], everything=False)
        shrinks(a)
        returns(a)
        # (b) a drain notice with a 30 s deadline; the node ends at the deadline
        time.sleep(3)
        victim = ports[-1]
        node_id = next(n["NodeID"] for n in _nodes(address) if n["NodeManagerPort"] == victim and n["Alive"])
        events.append(b := {"event": "drain notice, 30 s deadline", "t": time.time()})
        nodes.drain(address, node_id, 30, env)
        time.sleep(30)
        nodes.kill(victim)
        shrinks(b)
        returns(b)
        # (c) SIGTERM to every process of the node, SIGKILL 25 s later
        time.sleep(3)
        victim = ports[-1]
        events.append(c := {"event": "SIGTERM, SIGKILL 25 s later", "t": time.time()})
        nodes.kill(victim, signal.SIGTERM)
        time.sleep(25)
        nodes.kill(victim)
        shrinks(c)
        out = job.communicate(timeout=1800)[0]
    finally:
        if job.poll() is None:
            job.kill()
        for port in ports:
            nodes.kill(port)
    if job.returncode != 0:
        raise RuntimeError(out[-4000:])
    return {"trail": trail, "events": events, "out": out, "run": root / "ckpt" / f"elastic-{strategy}"}


def _nodes(address: str) -> list[dict]:
    import sys

    code = f"import ray, json; ray.init(address={address!r}, log_to_driver=False); print(json.dumps(ray.nodes()))"
    p = subprocess.run([sys.executable, "-c", code], env=launcher.env(), capture_output=True, text=True, timeout=120)
    return json.loads(p.stdout.strip().splitlines()[-1])


def report(strategy: str, job: dict, straight: Trail, straight_run: Path) -> None:
    trail, events = job["trail"], job["events"]
    attempts = trail.attempts()
    records = [r for r in trail.records() if r["rank"] == 0]
    print(f"\n{strategy}: {len(attempts)} attempts, worlds {[a['world'] for a in attempts]}")
    print(f"{'event':<32} {'retrained':>9} {'to smaller (s)':>15} {'return to full (s)':>19}")
    for i, e in enumerate(events):
        end = events[i + 1]["t"] if i + 1 < len(events) else float("inf")
        # the steps an attempt started after this event (and before the next) trained again
        starts = [a for a in attempts if e["t"] < (a["t"] or 0) < end]
        again = set()
        for a in starts:
            before = {r["step"] for r in records if r["pid"] != a["pid"] and r["t"] < a["t"]}
            again |= {r["step"] for r in records if r["pid"] == a["pid"]} & before
        smaller = next((a["t"] - e["t"] for a in starts if a["world"] == 1), None)
        full = next((a["t"] - e["returned"] for a in starts if a["world"] == 2 and "returned" in e), None)
        fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"{e['event']:<32} {len(again):>9} {fmt(smaller):>15} {fmt(full):>19}")
    batches, reference = trail.batches(), straight.batches()
    steps = sorted(batches)
    permutation = all(sorted(i for s in steps[k:k + PER_EPOCH] for i in batches[s])
                      == sorted(i for s in steps[:PER_EPOCH] for i in batches[s])
                      for k in range(0, len(steps) - PER_EPOCH + 1, PER_EPOCH))
    same = sum(batches[s] == reference.get(s) for s in steps)
    print(f"each epoch a permutation of the corpus: {permutation}; global batches equal to the straight "
          f"run's: {same} of {len(steps)}")
    ours, theirs = final_loss(job["run"]), final_loss(straight_run)
    print(f"final loss {ours:.4f} vs straight {theirs:.4f}: relative difference {abs(ours - theirs) / theirs:.2e}")


def final_loss(run: Path) -> float:
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("step")[1].split("-")[0]))
    return json.loads((last / "training_metrics.json").read_text())["loss_history"][-1][1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["ddp", "fsdp"], action="append")
    p.add_argument("--steps", type=int, default=720)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    temp = Path(tempfile.mkdtemp(prefix="rbe-", dir="/tmp"))
    address = head(temp)
    try:
        for strategy in args.strategy or ["ddp", "fsdp"]:
            env = launcher.env()
            ports = [nodes.add(address, f"straight_{strategy}_{i}", env)[1] for i in range(2)]
            try:
                straight = launcher.run([*common(root, args.steps, strategy), "--run-name", f"straight-{strategy}",
                                         "--audit-dir", root / "audit" / f"straight-{strategy}"], ray_address=address,
                                        timeout=3600)
            finally:
                for port in ports:
                    nodes.kill(port)
            assert straight.rc == 0, straight.out[-3000:]
            job = elastic_job(address, root, args.steps, strategy, root / "spot_watch.log")
            report(strategy, job, Trail(root / "audit" / f"straight-{strategy}", G),
                   root / "ckpt" / f"straight-{strategy}")
    finally:
        local.stop(local.processes([str(temp)]))


if __name__ == "__main__":
    main()
