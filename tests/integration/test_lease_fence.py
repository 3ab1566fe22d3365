"""The run's lease fences its holder (storage/lease.py's Fence): a launch whose driver is frozen
(SIGSTOP, as Ctrl-Z) while its worker keeps saving is taken over once its lease goes stale;
from the takeover on, its worker changes nothing in the run (no upload, commit or retention
delete), and its driver, resumed, stops. Real processes, on local disk and on the GCS API
server (fake-gcs-server on 127.0.0.1). lease_holder.py is the driver and the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_job import launcher
from storage import gcs as gcs_api
from storage.lease import Lease
from storage.location import resolve

STALE_S = 2.0
HELPER = Path(__file__).with_name("lease_holder.py")


def _tree(run) -> dict:
    """Everything in the run but the lease's own files: path -> what identifies its content."""
    if run.is_gcs:
        return {k: v for k, v in gcs_api.identities(run.path).items() if ".lease" not in k}
    out = {}
    for root, _, names in os.walk(run.path):
        for n in names:
            if not n.startswith((".lease", ".commit.lock")):
                path = os.path.join(root, n)
                out[os.path.relpath(path, run.path)] = Path(path).read_bytes()
    return out


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_a_frozen_holder_is_taken_over_and_changes_nothing_after(kind, tmp_path, request, monkeypatch):
    emulator = None
    if kind == "gcs":
        emulator = request.getfixturevalue("gcs").url
        monkeypatch.setenv(gcs_api.EMULATOR_HOST, emulator)
        gcs_api.client.cache_clear()
        uri = f"gs://ckpts/fence/{os.urandom(4).hex()}"
    else:
        uri = str(tmp_path / "run")
    run = resolve(uri)
    env = launcher.env(emulator=emulator)
    logs = {role: tmp_path / f"{role}.log" for role in ("driver", "worker")}
    procs = {}
    try:
        for role in ("driver", "worker"):
            procs[role] = subprocess.Popen([sys.executable, str(HELPER), role, uri, "A" * 32, str(STALE_S)],
                                           env=env, stdout=open(logs[role], "w"), stderr=subprocess.STDOUT)
            if role == "driver":
                _wait(lambda: "holding" in logs["driver"].read_text(), 60, logs["driver"].read_text())
        _wait(lambda: logs["worker"].read_text().count("committed") >= 3, 60, logs["worker"].read_text())

        os.kill(procs["driver"].pid, signal.SIGSTOP)  # the heartbeat stops; the worker goes on
        time.sleep(STALE_S + 0.5)
        taker = Lease(run, "B" * 32, stale_s=STALE_S, log=lambda line: None)
        assert taker.acquire() is not None  # taken over from the frozen launch
        after_takeover = _tree(run)
        before = logs["worker"].read_text()

        os.kill(procs["driver"].pid, signal.SIGCONT)
        assert procs["driver"].wait(timeout=30) == 3  # resumed, it learns the lease is gone and stops
        assert "lost the lease on run" in logs["driver"].read_text()
        _wait(lambda: logs["worker"].read_text()[len(before):].count("refused: lost the lease") >= 3, 30,
              logs["worker"].read_text()[-2000:])
        assert _tree(run) == after_takeover  # nothing uploaded, committed or deleted since
        assert "committed" not in logs["worker"].read_text()[len(before):]
        taker.release()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(10)
