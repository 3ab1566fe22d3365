"""ray_job.train.main's exit codes around the run's lease, without Ray (a stand-in launch
module): a live lease refuses (2), Ray not starting is 1 with one line, Ctrl-C is 130 with one
line, a lost lease is 1; the lease is released on every way out."""

from __future__ import annotations

import json
import os
import sys
import time
import types

import pytest

import ray_job
from configs import load
from ray_job import train
from storage.lease import LEASE, Holder
from storage.location import resolve


@pytest.fixture
def launch(monkeypatch, tmp_path):
    """main() with prepare() done and a stand-in for ray_job.launch; returns (fake, run path)."""
    run = resolve(str(tmp_path / "runs" / "test"))
    plan = types.SimpleNamespace(launch_id="this-launch", resume=None, verbose=False)
    monkeypatch.setattr(train, "prepare", lambda argv: (load("test"), resolve(str(tmp_path / "runs")), run, plan))
    fake = types.ModuleType("ray_job.launch")
    fake.init_ray = lambda cfg, **kw: None
    monkeypatch.setitem(sys.modules, "ray_job.launch", fake)
    monkeypatch.setattr(ray_job, "launch", fake, raising=False)
    return fake, tmp_path / "runs" / "test"


def _err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_ctrl_c_is_130_one_line_and_the_lease_released(launch, capsys):
    fake, run = launch

    def fit(*a, **kw):
        assert json.loads((run / LEASE).read_text())["launch_id"] == "this-launch"
        raise KeyboardInterrupt

    fake.fit = fit
    assert train.main([]) == 130
    assert _err_lines(capsys) == ["error: interrupted (Ctrl-C or a stop signal); complete checkpoints "
                                  "are kept, one being written stays incomplete and is never resumed"]
    assert not (run / LEASE).exists()


def test_ray_trains_own_ctrl_c_handler_exiting_is_130(launch, capsys):
    """During fit() Ray Train's SIGINT handler aborts the run and raises SystemExit (seen: 1)."""
    fake, run = launch

    def fit(*a, **kw):
        raise SystemExit(1)

    fake.fit = fit
    assert train.main([]) == 130
    assert _err_lines(capsys)[0].startswith("error: interrupted (Ctrl-C or a stop signal)")
    assert not (run / LEASE).exists()


def test_ctrl_c_before_ray_is_130(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "prepare", interrupted)
    assert train.main([]) == 130
    assert len(_err_lines(capsys)) == 1


def test_ray_not_starting_is_1_one_line_and_the_lease_released(launch, capsys, monkeypatch):
    fake, run = launch
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")

    def init_ray(cfg, **kw):
        raise ConnectionError("Could not find any running Ray instance.\nPlease start one")

    fake.init_ray = init_ray
    assert train.main([]) == 1
    assert _err_lines(capsys) == ["❌ Ray did not start: ConnectionError: Could not find any running "
                                  "Ray instance. (RAY_ADDRESS=nonsense)"]
    assert not (run / LEASE).exists()


def test_a_live_lease_refuses_with_exit_2_before_ray(launch, capsys):
    fake, run = launch
    fake.init_ray = lambda cfg, **kw: pytest.fail("Ray must not start")
    os.makedirs(run)
    now = time.time()
    (run / LEASE).write_bytes(Holder("other", "elsewhere", 7, now, now, "w").to_bytes())
    assert train.main([]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: run ")
    assert "in use by another launch (host elsewhere, pid 7" in lines[0]
    assert Holder.parse((run / LEASE).read_bytes()).launch_id == "other"  # not ours: kept


def test_a_lost_lease_stops_the_launch_with_exit_1(launch, capsys, monkeypatch):
    from ray_job import ownership
    from storage.lease import _LocalStore

    fake, run = launch
    taken = []
    real = ownership.take_run
    monkeypatch.setattr(ownership, "take_run", lambda *a: taken.append(real(*a)) or taken[0])

    def fit(*a, **kw):  # another launch takes the lease; the heartbeat finds out and stops this one
        store = _LocalStore(str(run))
        raw, version = store.read()
        store.replace(Holder("thief", "h", 1, time.time(), time.time(), "x").to_bytes(), version)
        assert taken[0].refresh() is False
        ownership._stop_this_launch(taken[0].lost)  # what the heartbeat thread calls
        for _ in range(1000):  # the interrupt lands in this (the main) thread
            time.sleep(0.01)
        pytest.fail("not interrupted")

    fake.fit = fit
    assert train.main([]) == 1
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("❌ lost the lease on run ")
    assert "another launch took it over (host h, pid 1" in lines[0]
    assert lines[0].endswith("stopping this launch so that the run has one writer")
    assert Holder.parse((run / LEASE).read_bytes()).launch_id == "thief"  # theirs: kept
