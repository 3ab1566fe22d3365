"""ray_job.train.main's exit codes around the run's lease, without Ray (a stand-in launch
module): a live lease refuses (2), Ray not starting is 1 with one line, Ctrl-C is 130 with one
line, a lost lease is 1; the lease is released on every way out."""

from __future__ import annotations

import json
import os
import signal
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
    assert _err_lines(capsys) == ["🛑 Stopped at once: every saved checkpoint was committed; the "
                                  "newest committed checkpoint is None"]
    assert not (run / LEASE).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_first_signal_asks_the_workers_to_stop_and_exits_130_naming_the_newest(launch, capsys,
                                                                                 monkeypatch, sig):
    """Ctrl-C or SIGTERM (`ray job stop`) during fit: the workers are asked to stop at the next
    step (trainers/stopping.py) and fit returns once they have finished their checkpoints."""
    from trainers import stopping

    fake, run = launch
    asked = []
    monkeypatch.setattr(stopping, "request", asked.append)

    def fit(*a, **kw):  # runs in a thread: the handler is the driver's, in the main thread
        os.kill(os.getpid(), sig)
        for _ in range(500):
            if asked:
                return types.SimpleNamespace(metrics={})
            time.sleep(0.01)
        pytest.fail("the stop was not asked")

    fake.fit = fit
    assert train.main([]) == 130
    assert asked == ["this-launch"]
    lines = _err_lines(capsys)
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert lines[0].startswith(f"🛑 {name}: stopping at the next step, then finishing the checkpoints")
    assert lines[-1] == "🛑 Stopped: the newest committed checkpoint is None; continue with --resume latest"
    assert not (run / LEASE).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_a_second_ctrl_c_stops_at_once_and_names_the_saved_checkpoints_left_incomplete(
        launch, capsys, monkeypatch):
    from trainers import stopping

    fake, run = launch
    monkeypatch.setattr(stopping, "request", lambda launch_id: None)
    monkeypatch.setattr(stopping, "saved", lambda launch_id: ["checkpoint-epoch0-step4-files1"])

    def fit(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        pytest.fail("not stopped at once")

    fake.fit = fit
    assert train.main([]) == 130
    assert _err_lines(capsys)[-1] == (
        "🛑 Stopped at once: checkpoint-epoch0-step4-files1 were saved and not committed: they stay "
        "incomplete and are never resumed; the newest committed checkpoint is None")
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


@pytest.mark.parametrize("saved", [[], ["checkpoint-epoch0-step4-files1"]], ids=["none saved", "one saved"])
def test_a_lost_lease_stops_the_launch_with_exit_1(launch, capsys, monkeypatch, saved):
    """The real heartbeat (every 2.5 s at lease_stale_s=10) finds the lease taken and stops the
    launch at once, through the same handler as Ctrl-C, with exit 1, naming the checkpoints it
    saved and leaves uncommitted (issue 23, item 4)."""
    from configs import with_overrides
    from storage.lease import _LocalStore
    from trainers import stopping

    fake, run = launch
    monkeypatch.setattr(stopping, "saved", lambda launch_id: saved)
    cfg, storage, run_loc, plan = train.prepare([])
    cfg = with_overrides(cfg, {"checkpoint": {"lease_stale_s": 10}})
    monkeypatch.setattr(train, "prepare", lambda argv: (cfg, storage, run_loc, plan))

    def fit(*a, **kw):  # another launch takes the lease; the heartbeat finds out and stops this one
        store = _LocalStore(str(run))
        raw, version = store.read()
        store.replace(Holder("thief", "h", 1, time.time(), time.time(), "x").to_bytes(), version)
        time.sleep(10)
        pytest.fail("not interrupted")

    fake.fit = fit
    started = time.monotonic()
    assert train.main([]) == 1
    assert time.monotonic() - started < 6
    lines = _err_lines(capsys)
    assert len(lines) == 1 + bool(saved) and lines[0].startswith("❌ lost the lease on run ")
    assert "another launch took it over (host h, pid 1" in lines[0]
    assert lines[0].endswith("stopping this launch so that the run has one writer")
    if saved:
        assert lines[1] == ("❌ Saved and not committed, so incomplete and never resumed: "
                            "checkpoint-epoch0-step4-files1")
    assert Holder.parse((run / LEASE).read_bytes()).launch_id == "thief"  # theirs: kept


def test_a_failed_run_names_the_saved_checkpoints_it_leaves_incomplete(launch, capsys, monkeypatch):
    """A writer lost with the run (a killed worker or node) takes its unfinished uploads along:
    the failure says which saved checkpoints stay incomplete."""
    from trainers import stopping

    fake, run = launch
    monkeypatch.setattr(stopping, "saved", lambda launch_id: ["checkpoint-epoch0-step4-files1"])

    def fit(*a, **kw):
        raise RuntimeError("a worker died")

    fake.fit = fit
    assert train.main([]) == 1
    assert _err_lines(capsys) == ["❌ Training failed: RuntimeError: a worker died",
                                  "❌ Saved and not committed, so incomplete and never resumed: "
                                  "checkpoint-epoch0-step4-files1"]
    assert not (run / LEASE).exists()


def test_a_graceful_stop_names_the_saved_checkpoints_it_leaves_incomplete(launch, capsys, monkeypatch):
    """A stop whose drain ran out of checkpoint.drain_timeout_s (issue 23, items 3 and 4): the
    driver names what stays incomplete, then the newest committed checkpoint."""
    from trainers import stopping

    fake, run = launch
    monkeypatch.setattr(stopping, "request", lambda launch_id: None)
    monkeypatch.setattr(stopping, "saved", lambda launch_id: ["checkpoint-epoch0-step4-files1"])

    def fit(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return types.SimpleNamespace(metrics={})

    fake.fit = fit
    assert train.main([]) == 130
    assert _err_lines(capsys)[-2:] == [
        "🛑 Saved and not committed, so incomplete and never resumed: checkpoint-epoch0-step4-files1",
        "🛑 Stopped: the newest committed checkpoint is None; continue with --resume latest"]
