"""One real Ray cluster (`ray start --head` on 127.0.0.1) and one set of training runs per
session, shared by the integration tests. Runs go through the real CLI as subprocesses,
started by ray_job.launcher (the one launcher tests and benchmarks share)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_job import launcher
from ray_job.launcher import BIN, Run
from storage.emulator import free_port

SLOW_FIXTURES = {"ray_cluster", "ray_address", "runs", "fsdp_runs"}  # a Ray cluster, or training runs


def pytest_collection_modifyitems(items):
    """A test that needs a Ray cluster or the shared training runs is `slow`: `pytest -m "not
    slow"` keeps the unit tests and the cheap checks (bad input before Ray, the GCS server)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
           f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp}",
           # not the default 52365: another Ray on the machine holding it leaves this head
           # without a job agent ("No available agent to submit job")
           f"--dashboard-agent-listen-port={free_port()}"]
    subprocess.run(cmd, check=True, env=launcher.env(), capture_output=True, timeout=180)
    yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    stop_ray_under(temp)


def stop_ray_under(temp: Path) -> None:
    """Stop the Ray processes of the cluster whose files are under temp, and only those:
    `ray stop --force` would also kill any other Ray on the machine (another test session's)."""
    from clusters import local

    local.stop(local.processes([str(temp)]))


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster.address


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows a run's event files (its own reader: files
    in order, each attempt's purge step hiding what earlier files logged past it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_curves_match(folder: Path, losses: list, last: int) -> None:
    """Loss, LR and throughput at steps 1..last once each, the loss the run's own history."""
    import numpy as np

    curves = scalars(folder)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"):
        assert [s for s, _ in curves[tag]] == list(range(1, last + 1)), (tag, curves[tag])
    assert [v for _, v in curves["train/loss"]] == [float(np.float32(v)) for _, v in losses]


def assert_same_grad_norms(folder: Path, reference: Path, last: int, rel: float = 1e-4) -> None:
    """train/grad_norm at steps 1..last in folder equals reference's within a relative rel: both
    must log the global norm (an fsdp run's from its sharded gradients, a ddp run's from its
    whole ones), so a rank-local or unreduced norm fails here, not only a missing step."""
    import math

    ours, theirs = (dict(scalars(f)["train/grad_norm"]) for f in (folder, reference))
    steps = list(range(1, last + 1))
    assert all(s in ours and s in theirs for s in steps), (sorted(ours), sorted(theirs))
    assert all(math.isfinite(ours[s]) and ours[s] > 0 for s in steps), ours
    off = [(s, ours[s], theirs[s]) for s in steps if abs(ours[s] - theirs[s]) > rel * abs(theirs[s])]
    assert not off, f"grad norms differ beyond a relative {rel}: (step, {folder.name}, reference) {off[:5]}"


def audit(folder: Path) -> list[dict]:
    records = []
    for f in sorted(folder.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        records += [{**json.loads(line), "rank": rank} for line in f.read_text().splitlines()]
    return records


def reads(folder: Path) -> list[dict]:
    """What the Ray Data read tasks opened (data/stream.py): one record per file opened,
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
    straight = launcher.run(common + ["--run-name", "straight", "--audit-dir", trail / "straight"],
                            ray_address=ray_address)
    assert straight.rc == 0, straight.out[-4000:]
    first = launcher.run(common + ["--run-name", "chain", "--max-steps", 10,
                              "--audit-dir", trail / "chain1"], ray_address=ray_address)
    assert first.rc == 0, first.out[-4000:]

    from data.index import DataIndex
    from data.order import EpochOrder

    meta = read_json(storage / "chain" / "checkpoint-epoch0-step10-files2" / "metadata.json")
    index = DataIndex.from_json(meta["data_index"], meta["config"]["data"]["path"])
    plan = EpochOrder.make(index, meta["config"]["data"]["shuffle_seed"], 0)
    done = [plan.index.files[i] for i in plan.order[: plan.files_done(meta["samples_in_epoch"])]]
    for path in done:
        shutil.copy(path, path + ".bak")
        size = Path(path).stat().st_size  # the same size: a listing sees the file it trained on
        Path(path).write_bytes((b"not parquet: a resume must not read this file. " * size)[:size])
    try:
        second = launcher.run(common + ["--run-name", "chain", "--resume", "latest", "--max-steps", 24,
                                   "--audit-dir", trail / "chain2"], ray_address=ray_address)
    finally:
        for path in done:
            os.replace(path + ".bak", path)
    assert second.rc == 0, second.out[-4000:]
    third = launcher.run(common + ["--run-name", "chain", "--resume", "checkpoint-epoch1-step24-files0",
                              "--audit-dir", trail / "chain3"], ray_address=ray_address)
    assert third.rc == 0, third.out[-4000:]
    return Runs(storage, data, trail, straight, [first, second, third], done)


@dataclass
class FsdpRuns:
    storage: Path
    data: Path
    audit: Path
    straight: Run  # 24 steps (one epoch), checkpoints at 8, 16, 24
    chain: list[Run]  # stop at 10 (mid-file), resume latest to 24

    def ckpt(self, run: str, name: str) -> Path:
        return self.storage / run / name


@pytest.fixture(scope="session")
def fsdp_runs(runs, ray_address) -> FsdpRuns:
    """train.strategy=fsdp on the shared data: 24 steps straight, and the same 24 stopped at 10
    and resumed, with activation checkpointing (which must change no bit). Few and short: each
    run costs a worker group's start."""
    common = ["--config", "test", "--storage", runs.storage, "--set", f"data.path={runs.data}",
              "--set", "train.strategy=fsdp", "--max-steps", 24]
    straight = launcher.run(common + ["--run-name", "fsdp-straight", "--audit-dir", runs.audit / "fsdp-straight"],
                            ray_address=ray_address)
    assert straight.rc == 0, straight.out[-4000:]
    recompute = ["--set", "train.activation_checkpointing=full"]
    first = launcher.run(common[:-2] + recompute + ["--run-name", "fsdp-chain", "--max-steps", 10],
                         ray_address=ray_address)
    assert first.rc == 0, first.out[-4000:]
    second = launcher.run(common + recompute + ["--run-name", "fsdp-chain", "--resume", "latest"],
                          ray_address=ray_address)
    assert second.rc == 0, second.out[-4000:]
    return FsdpRuns(runs.storage, runs.data, runs.audit, straight, [first, second])


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    from storage.emulator import GcsEmulator

    server = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    server.create_bucket("ckpts")
    yield server
    server.stop()
