"""Preemption on a two-node Ray cluster on this machine: a second `ray start --address` node
holds one worker; `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` announces its
preemption; the loop saves a checkpoint at once; the node is then killed; Ray restarts the run
from that checkpoint and it finishes, exact, having lost at most one step of work."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import audit, read_json

from ray_job import launcher
from ray_job.launcher import BIN

STEPS = 300  # long enough for the drain (a `ray` command, seconds) to arrive mid-run (120 was not)


def _node_with(resource: str, address: str) -> str:
    code = (f"import ray, json; ray.init(address={address!r}, log_to_driver=False); "
            f"print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and {resource!r} in n['Resources']]))")
    p = subprocess.run([sys.executable, "-c", code], env=launcher.env(), capture_output=True, text=True, timeout=120)
    ids = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(ids) == 1, p.stdout + p.stderr
    return ids[0]


def _raylet_pid(node_id: str) -> int:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if args and args[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in args:
            pids.append(int(entry))
    assert len(pids) == 1, pids
    return pids[0]


def test_preemption_notice_saves_then_run_resumes_from_it(runs, ray_cluster):
    start = [str(BIN / "ray"), "start", f"--address={ray_cluster.address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=2", '--resources={"spot": 1}', "--disable-usage-stats"]
    subprocess.run(start, env=launcher.env(), check=True, capture_output=True, timeout=180)
    node = _node_with("spot", ray_cluster.address)
    trail = runs.storage.parent / "audit" / "preempted"
    args = ["--config", "test", "--storage", runs.storage, "--run-name", "preempted",
            "--set", f"data.path={runs.data}", "--set", "scaling.placement_strategy=SPREAD", "--max-failures", 1,
            "--set", "checkpoint.preemption_wait_s=120", "--max-steps", STEPS, "--checkpoint-every", STEPS // 2,
            "--audit-dir", trail]  # long enough for the drain to arrive mid-run
    job = launcher.start(args, ray_address=ray_cluster.address)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            path = trail / "rank0.jsonl"
            if path.exists() and '"step": 6,' in path.read_text():
                break
            time.sleep(0.02)
        drain = [str(BIN / "ray"), "drain-node", f"--address={ray_cluster.address}", f"--node-id={node}",
                 "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim (test)",
                 "--deadline-remaining-seconds=120"]
        subprocess.run(drain, env=launcher.env(), check=True, capture_output=True, timeout=60)
        saved = None
        while time.monotonic() < deadline and job.poll() is None and saved is None:
            for d in sorted((runs.storage / "preempted").glob("checkpoint-*")):
                meta = d / "metadata.json"
                if meta.exists() and read_json(meta).get("preempted"):
                    saved = read_json(meta)
            time.sleep(0.05)
        assert saved, "no preemption checkpoint was written"
        os.kill(_raylet_pid(node), signal.SIGKILL)  # the spot VM goes away
        out = job.communicate(timeout=600)[0]
    finally:
        if job.poll() is None:
            job.kill()
        try:
            os.kill(_raylet_pid(node), signal.SIGKILL)  # never leave the second node behind
        except (AssertionError, ProcessLookupError):
            pass
    assert job.returncode == 0, out[-4000:]
    assert "⚠️  Preemption notice" in out
    name = saved["name"]
    assert f"🔁 Restarted by Ray: resuming from this run's latest checkpoint {name}" in out, out[-4000:]
    records = audit(trail)
    trained = [(r["step"], r["rank"]) for r in records if r["event"] == "batch"]
    redone = {s for s, rank in trained if rank == 0 and trained.count((s, 0)) > 1}
    assert len(redone) <= 1, sorted(redone)  # at most one step of work lost
    last = [d for d in (runs.storage / "preempted").glob(f"checkpoint-*-step{STEPS}-*")]
    final = read_json(last[0] / "training_metrics.json")
    assert [s for s, _ in final["loss_history"]] == list(range(1, STEPS + 1))  # no step missing or doubled
    assert saved["step"] in [r[0] for r in final["resumes"]]
