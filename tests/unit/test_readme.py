"""The README starts with exactly two commands; CI runs the second, the first runs the job."""

import os
import re

from ray_job.launcher import REPO


def _first_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_commands():
    commands = _first_block()
    assert len(commands) == 2
    assert "ray_job.train" in (REPO / "start_training.sh").read_text()
    assert commands[0].endswith("./start_training.sh --config test")


def test_ci_runs_the_readme_test_command():
    test_cmd = _first_block()[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci
    assert "pytest tests" in test_cmd


def test_scripts_are_executable_and_torch_is_pinned():
    for script in ("setup.sh", "start_training.sh", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), script
    pins = (REPO / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in pins
    assert all("==" in p for p in pins if not p.startswith("#")), "every requirement is pinned"
