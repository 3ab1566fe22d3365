"""Nodes joined to a Ray cluster on this machine, and what happens to spot nodes: lost without
notice, drained with a deadline, shut down as a spot VM is. For tests/integration/test_elastic.py
and benchmarks/bench_elastic.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from clusters import local

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def add(address: str, tag: str, env: dict, watch_log: Path | None = None, grace_s: float = 20) -> tuple[str, int]:
    """A node with one training slot (resource train_slot) and a resource named tag, joined to
    the cluster at address; with watch_log, started through clusters/spot_watch.py as
    cluster.yaml starts its spot nodes. (node id, node manager port)."""
    port = local.free_port("127.0.0.1")
    start = [str(BIN / "ray"), "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f'--resources={{"train_slot": 1, "{tag}": 1}}', f"--node-manager-port={port}", "--disable-usage-stats"]
    if watch_log is not None:
        start = [sys.executable, str(REPO / "clusters" / "spot_watch.py"), "--grace-s", f"{grace_s:g}",
                 "--log", str(watch_log), "--", *start]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    code = (f"import ray, json; ray.init(address={address!r}, log_to_driver=False); "
            f"print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and {tag!r} in n['Resources']]))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    (node,) = json.loads(p.stdout.strip().splitlines()[-1])
    return node, port


def raylet(port: int) -> int | None:
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if args and args[0].endswith(b"/raylet") and f"--node_manager_port={port}".encode() in args:
            return int(entry)
    return None


def processes(port: int) -> set[int]:
    """Every process of the node: its raylet and what it started (they name its port), and its
    spot watcher (it names the port in the ray start command it ran)."""
    return local.processes([f"--node_manager_port={port}", f"--node-manager-port={port}"])


def kill(port: int, sig=signal.SIGKILL, everything: bool = True) -> None:
    """Signal every process of the node, or only its raylet (a `kill -9` of the raylet)."""
    for pid in processes(port) if everything else {raylet(port)} - {None}:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def drain(address: str, node: str, deadline_s: int, env: dict) -> None:
    """Ray's preemption notice, as a cloud's autoscaler gives it."""
    subprocess.run([str(BIN / "ray"), "drain-node", f"--address={address}", f"--node-id={node}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                    f"--deadline-remaining-seconds={deadline_s}"], env=env, check=True, capture_output=True,
                   timeout=60)


class Trail:
    """A job's audit (--audit-dir): one record per (attempt, rank, step) trained."""

    def __init__(self, folder: Path, global_batch: int):
        self.folder, self.G = Path(folder), global_batch

    def records(self) -> list[dict]:
        out = []
        for f in sorted(self.folder.glob("rank*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    out.append({**json.loads(line), "rank": int(f.stem[4:])})
                except ValueError:
                    pass  # a line being written
        return out

    def attempts(self) -> list[dict]:
        """Each attempt so far, in order: rank 0's pid, world size, first step and its time."""
        seen: list[dict] = []
        for r in self.records():
            if r["rank"] == 0 and (not seen or seen[-1]["pid"] != r["pid"]):
                seen.append({"pid": r["pid"], "world": self.G // len(r["ids"]), "step": r["step"], "t": r.get("t")})
        return seen

    def last_step(self) -> int:
        return max((r["step"] for r in self.records()), default=0)

    def retrained(self) -> list[int]:
        steps = [r["step"] for r in self.records() if r["rank"] == 0]
        return sorted({s for s in steps if steps.count(s) > 1})

    def batches(self) -> dict[int, list[int]]:
        """The global batch of each step, from the attempt that trained it last, in rank order."""
        parts: dict[int, list] = {}
        records = self.records()
        for r in records:
            if r["rank"] == 0:
                parts[r["step"]] = [r["ids"]]
        for r in records:  # a higher rank of an attempt of the same size: the latest one wins
            first = parts[r["step"]]
            if r["rank"] > 0 and len(first[0]) == len(r["ids"]):
                first.extend([[]] * (r["rank"] + 1 - len(first)))
                first[r["rank"]] = r["ids"]
        return {s: [i for p in ps for i in p] for s, ps in parts.items()}
