"""End to end as users run it: `ray job submit --working-dir . -- python -m ray_job.train` against
a `ray start --head` cluster on 127.0.0.1, then a second submission with `--resume latest` that
continues exactly; the job logs carry the guide's lines."""

import subprocess

import torch
from conftest import read_json
from safetensors.torch import load_file

from ray_job import launcher
from ray_job.launcher import BIN, REPO

FINAL = "checkpoint-epoch1-step40-files4"


def _submit(ray_cluster, runs, *extra):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", str(REPO), "--", "python", "-m", "ray_job.train", "--config", "test",
           "--storage", str(runs.storage), "--run-name", "submitted", "--set", f"data.path={runs.data}",
           *extra]
    p = subprocess.run(cmd, cwd=REPO, env=launcher.env(), capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_submit_then_resume_latest_continues_exactly(ray_cluster, runs):
    rc, first = _submit(ray_cluster, runs, "--max-steps", "16")
    assert rc == 0 and "succeeded" in first, first[-4000:]
    rc, second = _submit(ray_cluster, runs, "--resume", "latest")
    assert rc == 0 and "succeeded" in second, second[-4000:]
    for line in ("🔄 Attempting to resume training from checkpoint: checkpoint-epoch0-step16-files4",
                 "✅ Resumed from checkpoint: checkpoint-epoch0-step16-files4",
                 "   Starting from Step: 17, Epoch: 0",
                 "   Training will continue from global step 17",
                 "🔄 Resuming training from step 16, target: 40",
                 "🔄 Resuming epoch 0: skipping 16 batches"):
        assert line in second, line
    a = load_file(runs.ckpt("straight", FINAL) / "model.safetensors")
    b = load_file(runs.ckpt("submitted", FINAL) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(runs.ckpt("submitted", FINAL) / "training_metrics.json")["loss_history"] == \
        read_json(runs.ckpt("straight", FINAL) / "training_metrics.json")["loss_history"]


def test_start_training_script_submits_when_ray_address_is_a_dashboard(ray_cluster, runs):
    env = launcher.env(ray_cluster.dashboard)
    p = subprocess.run([str(REPO / "start_training.sh"), "--config", "test", "--storage", str(runs.storage),
                        "--run-name", "submitted", "--set", f"data.path={runs.data}",
                        "--resume", "checkpoint-epoch0-step999-files0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert "Job 'raysubmit_" in out  # went through the job server
    assert "No files found for checkpoint checkpoint-epoch0-step999-files0" in out
    assert p.returncode != 0
