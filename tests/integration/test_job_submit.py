"""`./start_training.sh` with RAY_ADDRESS set to a dashboard submits a Ray job (`ray job submit
--working-dir`) to a `ray start --head` cluster on 127.0.0.1. A submitted job that trains, and a
second submission with `--resume latest` that continues exactly with the guide's lines, run on
a cluster launched by `ray up`: tests/integration/test_local_cluster.py."""

import subprocess

from ray_job import launcher
from ray_job.launcher import REPO


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
