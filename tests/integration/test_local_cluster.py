"""`ray up` for real, on this machine (issue 16): `clusters/local.sh up` launches a head node
and, through Ray's autoscaler, a worker node over the script's own loopback sshd; a job
submitted with `./start_training.sh` trains on the worker node; a second submission with
`--resume latest` continues exactly, and survives the worker node's raylet being killed mid-run
(the autoscaler restarts the node, Ray Train restarts the workers from the newest checkpoint:
checkpoint.max_failures); `clusters/local.sh down` leaves no process and no file of the cluster.
One cluster, one module, a few minutes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from conftest import read_json
from safetensors.torch import load_file

from clusters import local
from ray_job import launcher
from ray_job.launcher import REPO

STRAIGHT = "checkpoint-epoch1-step40-files4"


def _local_sh(command: str, dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "clusters" / "local.sh"), command], cwd=REPO, text=True,
                          env=launcher.env(LOCAL_CLUSTER_DIR=str(dir)), capture_output=True, timeout=300)


def _train(address: str, storage: Path, data: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / "start_training.sh"), "--config", "test", "--storage", str(storage),
                             "--run-name", "on-cluster", "--set", f"data.path={data}",
                             # one worker on each worker node: losing one stops the group
                             "--set", 'scaling.worker_resources={"train_slot": 1}', *extra],
                            cwd=REPO, env=launcher.env(address), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **popen)


def _raylet(dir: Path) -> int:
    (pid,) = [p for p in local.processes([f"{dir}/worker-{local.WORKER_IPS[0]}"])
              if open(f"/proc/{p}/comm").read().strip() == "raylet"]
    return pid


def test_ray_up_submit_resume_lose_a_node_and_down(runs, tmp_path):
    dir = Path(tempfile.mkdtemp(prefix="rtrl-", dir="/tmp"))  # short: Ray's socket paths
    storage = tmp_path / "ckpt"
    try:
        up = _local_sh("up", dir)
        assert up.returncode == 0, up.stdout + up.stderr
        address = re.search(r"^RAY_ADDRESS=(http://127\.0\.0\.1:\d+)$", up.stdout, re.M).group(1)
        port = int(address.rsplit(":", 1)[1])
        deadline = time.monotonic() + 120  # the autoscaler starts the worker node
        while local.alive_nodes(port) != [local.HEAD_IP, *local.WORKER_IPS]:
            assert time.monotonic() < deadline, "the autoscaler did not start the worker node"
            time.sleep(2)
        again = _local_sh("up", dir)  # safe twice: the same cluster
        assert again.returncode == 0 and f"RAY_ADDRESS={address}" in again.stdout

        first = _train(address, storage, runs.data, "--max-steps", "8")
        out, _ = first.communicate(timeout=400)
        assert first.returncode == 0 and "succeeded" in out, out[-4000:]
        assert "ip=127.0.0.3" in out  # the ranks ran on the worker node
        assert "🏁 Done: step 8" in out

        second = _train(address, storage, runs.data, "--resume", "latest", "--set", "checkpoint.max_failures=3")
        run = storage / "on-cluster"
        deadline = time.monotonic() + 300
        while not (run / "checkpoint-epoch0-step16-files4").exists():
            assert second.poll() is None and time.monotonic() < deadline, second.stdout.read()[-4000:]
            time.sleep(0.1)
        os.kill(_raylet(dir), signal.SIGKILL)  # the worker node is lost mid-run
        killed_before = sorted(p.name for p in run.glob("checkpoint-*"))
        out, _ = second.communicate(timeout=500)
        assert second.returncode == 0 and "succeeded" in out, out[-6000:]
        assert STRAIGHT not in killed_before, "the node was lost after the run ended"
        assert "🏁 Done: step 40, epoch 1, last checkpoint checkpoint-epoch1-step40-files4" in out
        for line in ("🔄 Attempting to resume training from checkpoint: checkpoint-epoch0-step8-files2",
                     "✅ Resumed from checkpoint: checkpoint-epoch0-step8-files2",
                     "   Starting from Step: 9, Epoch: 0",
                     "   Training will continue from global step 9",
                     "🔄 Resuming training from step 8, target: 40",
                     "🔄 Resuming epoch 0: skipping 8 batches"):  # the guide's lines
            assert line in out, line
        # the workers restarted from a checkpoint saved after the first job's
        resumed = re.findall(r"Resumed from checkpoint: checkpoint-epoch\d+-step(\d+)-", out)
        assert any(int(step) >= 16 for step in resumed), out[-6000:]
        # exact: the same per-step losses and weights as the straight run
        assert read_json(run / STRAIGHT / "training_metrics.json")["loss_history"] == \
            read_json(runs.ckpt("straight", STRAIGHT) / "training_metrics.json")["loss_history"]
        a = load_file(runs.ckpt("straight", STRAIGHT) / "model.safetensors")
        b = load_file(run / STRAIGHT / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        down = _local_sh("down", dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not dir.exists() and not local.processes([str(dir)])
    assert not local.leftovers(dir, local.cluster_name(dir))
