"""One real Ray cluster (`ray start --head` on 127.0.0.1) and one set of training runs per
session, shared by the integration tests. Runs go through the real CLI as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.emulator import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1",
                # `python` in a submitted job's entrypoint is this venv's, as on a real node
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    env.update(extra)
    return env


@dataclass
class Cluster:
    address: str  # what a driver joins (RAY_ADDRESS)
    dashboard: str  # what `ray job submit --address` talks to


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    port, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(cmd, check=True, env=_env(), capture_output=True, timeout=180)
    yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(), capture_output=True,
                   timeout=120)


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


@dataclass
class Run:
    rc: int
    out: str  # stdout and stderr together: the driver and the forwarded worker logs
    err: str


def run_cli(args: list[str], ray_address: str | None = None, timeout: int = 600) -> Run:
    env = _env(RAY_ADDRESS=ray_address) if ray_address else _env()
    p = subprocess.run([sys.executable, "-m", "ray_job.train", *map(str, args)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout + p.stderr, p.stderr)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def audit(folder: Path) -> list[dict]:
    records = []
    for f in sorted(folder.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        records += [{**json.loads(line), "rank": rank} for line in f.read_text().splitlines()]
    return records


def reads(folder: Path) -> list[dict]:
    """What the Ray Data read tasks opened (trainers/ingest.py): one record per file opened,
    with the row groups it decoded."""
    path = folder / "reads.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Runs:
    storage: Path
    data: Path
    audit: Path
    straight: Run
    chain: list[Run]  # stop at 10 (mid-file, mid-row-group), resume to 24 (epoch end), to 40
    processed_while_garbage: list[str]  # files made unreadable during the second segment

    def ckpt(self, run: str, name: str) -> Path:
        return self.storage / run / name


@pytest.fixture(scope="session")
def runs(ray_address, tmp_path_factory) -> Runs:
    """A straight 40-step run, and the same 40 steps as three segments with two resumes.

    While the second segment (resume at step 10 -> 24) runs, the files that segment must not
    read (fully processed before step 10) hold garbage: a resume that opened them would fail.
    """
    root = tmp_path_factory.mktemp("runs")
    storage, data, trail = root / "ckpt", root / "data", root / "audit"
    common = ["--config", "test", "--storage", storage, "--set", f"data.path={data}"]
    straight = run_cli(common + ["--run-name", "straight", "--audit-dir", trail / "straight"],
                       ray_address)
    assert straight.rc == 0, straight.out[-4000:]
    first = run_cli(common + ["--run-name", "chain", "--max-steps", 10,
                              "--audit-dir", trail / "chain1"], ray_address)
    assert first.rc == 0, first.out[-4000:]

    from trainers.data import DataIndex, EpochOrder

    meta = read_json(storage / "chain" / "checkpoint-epoch0-step10-files2" / "metadata.json")
    plan = EpochOrder.make(DataIndex.from_json(meta["data_index"]), meta["config"]["data"]["shuffle_seed"], 0)
    done = [plan.index.files[i] for i in plan.order[: plan.files_done(meta["samples_in_epoch"])]]
    for path in done:
        shutil.copy(path, path + ".bak")
        Path(path).write_bytes(b"not parquet: a resume must not read this file" * 10)
    try:
        second = run_cli(common + ["--run-name", "chain", "--resume", "latest", "--max-steps", 24,
                                   "--audit-dir", trail / "chain2"], ray_address)
    finally:
        for path in done:
            os.replace(path + ".bak", path)
    assert second.rc == 0, second.out[-4000:]
    third = run_cli(common + ["--run-name", "chain", "--resume", "checkpoint-epoch1-step24-files0",
                              "--audit-dir", trail / "chain3"], ray_address)
    assert third.rc == 0, third.out[-4000:]
    return Runs(storage, data, trail, straight, [first, second, third], done)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    from storage.emulator import GcsEmulator

    server = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    server.create_bucket("ckpts")
    yield server
    server.stop()


def run_cli_gcs(args, ray_address, emulator: str, module: str = "ray_job.train", timeout: int = 600) -> Run:
    env = _env(STORAGE_EMULATOR_HOST=emulator)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout + p.stderr, p.stderr)
