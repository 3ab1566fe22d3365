"""start_training.sh reads paths from where it is called, and with RAY_ADDRESS=http://... finds
`ray` (the repo's .venv, else PATH) or says what is missing. No Ray: each case stops at a bad
config (exit 2) or at a stand-in `ray` that prints its arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ray_job.launcher import REPO

BASE_PATH = "/usr/bin:/bin"


def _run(script: Path, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHON"))}
    clean.update(env)
    return subprocess.run([str(script), *args], cwd=cwd, env=clean, capture_output=True, text=True,
                          timeout=60)


def test_a_yaml_config_is_read_from_where_the_script_is_called(tmp_path):
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: -1\n")  # found: refused for its value
    p = _run(REPO / "start_training.sh", ["--config", "mine.yaml"], tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("error: --config mine.yaml: optim.lr: must be a positive number, "
                                "got -1.0")


def _copy_without_venv(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    shutil.copy(REPO / "start_training.sh", repo)
    return repo


def test_submit_without_ray_anywhere_says_what_is_missing(tmp_path):
    repo = _copy_without_venv(tmp_path)
    p = _run(repo / "start_training.sh", ["--config", "test"], tmp_path,
             RAY_ADDRESS="http://127.0.0.1:8265", PATH=BASE_PATH)
    assert p.returncode == 2
    assert p.stderr.startswith("error: RAY_ADDRESS=http://127.0.0.1:8265 submits a Ray job, which "
                               "needs the 'ray' command: none in ")
    assert "(run ./setup.sh) or on PATH (pip install 'ray[default]')" in p.stderr


def test_submit_uses_ray_from_path_and_ships_the_yaml_inside_the_repo(tmp_path):
    repo = _copy_without_venv(tmp_path)
    (repo / "configs" / "mine.yaml").write_text("base: test\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/bin/sh\necho "ray $*"\n')
    (bin_dir / "ray").chmod(0o755)
    env = {"RAY_ADDRESS": "http://127.0.0.1:8265", "PATH": f"{bin_dir}:{BASE_PATH}"}
    p = _run(repo / "start_training.sh", ["--config", "configs/mine.yaml", "--max-steps", "9"], repo, **env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"ray job submit --working-dir {repo} -- python -m ray_job.train "
                                "--config configs/mine.yaml --max-steps 9")
    # From elsewhere, the same file is found from the caller's folder and handed on relative to the repo.
    p = _run(repo / "start_training.sh", ["--config=repo/configs/mine.yaml"], tmp_path, **env)
    assert p.stdout.strip().endswith("ray_job.train --config configs/mine.yaml"), p.stderr
    # A YAML outside the repo would not reach the cluster.
    (tmp_path / "outside.yaml").write_text("base: test\n")
    p = _run(repo / "start_training.sh", ["--config", "outside.yaml"], tmp_path, **env)
    assert p.returncode == 2 and "is outside" in p.stderr and "copy it into" in p.stderr
    p = _run(repo / "start_training.sh", ["--config", "missing.yaml"], tmp_path, **env)
    assert p.returncode == 2 and p.stderr.startswith("error: --config missing.yaml: no such file")
