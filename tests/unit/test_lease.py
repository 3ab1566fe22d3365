"""One launch owns a run (storage/lease.py): a fresh lease refuses a second launch and writes
nothing; a stale one is taken over, by exactly one of several takers; a launch releases only
its own lease. Local disk, an injected clock, no sleeping."""

from __future__ import annotations

import json
import os
import threading

import pytest

from storage import listing
from storage.lease import LEASE, Holder, Lease, LeaseError, LeaseHeld, _Conflict, _LocalStore
from storage.location import resolve


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lease(run, launch, clock, log=None, **kw):
    return Lease(run, launch, stale_s=120, clock=clock, host=f"host-{launch}", pid=100 + len(launch),
                 log=log if log is not None else (lambda msg: None), **kw)


def tree(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture
def run(tmp_path):
    return resolve(str(tmp_path / "storage" / "r"))


def test_a_free_run_is_taken_and_the_lease_says_who(run):
    clock = Clock()
    a = lease(run, "launch-a", clock)
    assert a.acquire() is None and a.held
    record = json.loads(open(os.path.join(run.path, LEASE)).read())
    assert record["launch_id"] == "launch-a" and record["host"] == "host-launch-a"
    assert record["pid"] == 108 and record["started_at"] == record["heartbeat"] == clock.t
    assert record["started"] == "1970-01-12T13:46:40Z"


def test_a_fresh_lease_refuses_a_second_launch_and_nothing_is_written(run):
    clock = Clock()
    a = lease(run, "launch-a", clock)
    a.acquire()
    before = tree(run.path)
    clock.t += 120  # exactly stale_s old: still fresh
    b = lease(run, "launch-b", clock)
    with pytest.raises(LeaseHeld) as e:
        b.acquire()
    message = str(e.value)
    assert "\n" not in message
    assert "host host-launch-a, pid 108" in message and "since 1970-01-12T13:46:40Z" in message
    assert "last heartbeat 120s ago" in message and "--run-name NEW" in message
    assert "checkpoint.lease_stale_s (120s)" in message
    assert e.value.holder.launch_id == "launch-a"
    assert tree(run.path) == before  # no lock file, no temp file, the lease untouched
    assert not b.held and b.release() is False


def test_a_heartbeat_keeps_the_lease_fresh(run):
    clock = Clock()
    a = lease(run, "launch-a", clock)
    a.acquire()
    for _ in range(10):  # 10 x 100 s: far beyond stale_s since the start, never stale
        clock.t += 100
        assert a.refresh()
    with pytest.raises(LeaseHeld):
        lease(run, "launch-b", clock).acquire()
    assert json.loads(open(os.path.join(run.path, LEASE)).read())["heartbeat"] == clock.t


def test_a_stale_lease_is_taken_over_with_a_warning_and_the_old_holder_learns_it(run):
    clock = Clock()
    a = lease(run, "launch-a", clock)
    a.acquire()
    clock.t += 121
    said = []
    b = lease(run, "launch-b", clock, log=said.append)
    taken = b.acquire()
    assert taken is not None and taken.launch_id == "launch-a"
    assert len(said) == 1 and said[0].startswith("⚠️  Took over run ")
    assert "host host-launch-a, pid 108" in said[0] and "121s ago" in said[0]
    assert json.loads(open(os.path.join(run.path, LEASE)).read())["launch_id"] == "launch-b"
    # The old holder (a paused driver that comes back) cannot refresh or delete the new lease.
    assert a.refresh() is False and "another launch took it over (host host-launch-b" in a.lost
    assert a.release() is False
    assert json.loads(open(os.path.join(run.path, LEASE)).read())["launch_id"] == "launch-b"
    assert b.release() is True and not os.path.exists(os.path.join(run.path, LEASE))


def test_release_deletes_only_our_own_lease(run):
    clock = Clock()
    a = lease(run, "launch-a", clock)
    a.acquire()
    assert a.release() is True
    assert not os.path.exists(os.path.join(run.path, LEASE))
    assert a.release() is False  # twice is harmless
    b = lease(run, "launch-b", clock)
    assert b.acquire() is None  # the run is free again at once


def _race(run, clock, names: list[str]) -> dict:
    """Each name tries to acquire the run's lease at the same moment: name -> Lease or LeaseHeld."""
    barrier = threading.Barrier(len(names))
    outcomes: dict = {}

    def take(name):
        me = lease(run, name, clock)
        barrier.wait()
        try:
            me.acquire()
            outcomes[name] = me
        except BaseException as e:  # LeaseHeld expected; anything else fails the test below
            outcomes[name] = e

    threads = [threading.Thread(target=take, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted(names), outcomes  # every thread answered
    return outcomes


def _one_winner(outcomes: dict) -> Lease:
    """Exactly one winner; every other thread refused with LeaseHeld naming it."""
    winners = [o for o in outcomes.values() if isinstance(o, Lease)]
    others = [o for o in outcomes.values() if not isinstance(o, Lease)]
    assert len(winners) == 1 and all(isinstance(o, LeaseHeld) for o in others), outcomes
    assert all(e.holder.launch_id == winners[0].launch_id for e in others), outcomes
    return winners[0]


def test_two_takers_of_one_stale_lease_exactly_one_wins(run):
    for round_ in range(25):
        clock = Clock(1_000_000.0 + round_ * 10_000)
        dead = lease(run, "dead", clock)
        dead.acquire()
        clock.t += 500
        outcomes = _race(run, clock, [f"taker-{i}" for i in range(3)])
        winner = _one_winner(outcomes)
        on_disk = json.loads(open(os.path.join(run.path, LEASE)).read())
        assert on_disk["launch_id"] == winner.launch_id
        assert winner.release()


def test_two_starters_of_a_free_run_exactly_one_wins(run):
    for round_ in range(25):
        clock = Clock()
        outcomes = _race(run, clock, [f"s{round_}-{i}" for i in range(3)])
        assert _one_winner(outcomes).release()


def test_compare_and_swap_on_local_disk(tmp_path):
    store = _LocalStore(str(tmp_path))
    v1 = store.create(b'{"v": 1}')
    with pytest.raises(FileExistsError):
        store.create(b'{"v": 2}')
    v2 = store.replace(b'{"v": 2}', v1)
    with pytest.raises(_Conflict):  # the second of two takers that read v1
        store.replace(b'{"v": 3}', v1)
    with pytest.raises(_Conflict):
        store.delete(v1)
    assert store.read()[0] == b'{"v": 2}'
    store.delete(v2)
    assert store.read() is None
    assert sorted(os.listdir(tmp_path)) == [".lease.lock"]  # no temp file left behind


def test_an_unreadable_lease_is_refused_with_the_file_to_delete(run):
    os.makedirs(run.path)
    with open(os.path.join(run.path, LEASE), "w") as f:
        f.write("{not json")
    with pytest.raises(LeaseError) as e:
        lease(run, "b", Clock()).acquire()
    assert "is unreadable" in str(e.value) and ".lease.json" in str(e.value)
    assert not isinstance(e.value, LeaseHeld)


def test_our_own_lease_is_ours(run):
    """A create whose answer was lost (then retried) finds our own launch id: it is ours."""
    clock = Clock()
    a = lease(run, "same", clock)
    a.acquire()
    again = lease(run, "same", clock)
    assert again.acquire() is None and again.held and again.refresh()


def test_the_heartbeat_thread_refreshes_and_reports_a_lost_lease(run):
    clock = Clock()
    beats = threading.Event()
    lost: list = []

    a = lease(run, "launch-a", clock, heartbeat_s=0.01)
    a.acquire()
    first = Holder.parse(open(os.path.join(run.path, LEASE), "rb").read()).heartbeat
    clock.t += 5
    a.start_heartbeat(on_lost=lambda why: (lost.append(why), beats.set()))
    for _ in range(500):
        if Holder.parse(open(os.path.join(run.path, LEASE), "rb").read()).heartbeat != first:
            break
        threading.Event().wait(0.01)
    assert Holder.parse(open(os.path.join(run.path, LEASE), "rb").read()).heartbeat == clock.t
    # Another launch takes the lease (as if ours had gone stale): the thread notices, once.
    store = _LocalStore(run.path)
    raw, version = store.read()
    other = Holder("launch-b", "h", 1, clock.t, clock.t, "w")
    while True:
        try:
            store.replace(other.to_bytes(), version)
            break
        except _Conflict:
            raw, version = store.read()
    assert beats.wait(5)
    assert len(lost) == 1 and "lost the lease on run" in lost[0] and "launch launch-b" in lost[0]
    a.release()
    assert Holder.parse(store.read()[0]).launch_id == "launch-b"


def test_listing_and_checks_ignore_the_lease_files(run):
    clock = Clock()
    a = lease(run, "launch-a", clock)
    a.acquire()
    a.refresh()  # makes the lock file too
    assert sorted(os.listdir(run.path)) == [".lease.json", ".lease.lock"]
    assert listing.scan(run) == [] and listing.latest_complete(run) is None


def test_stale_s_is_a_checked_config_field():
    from configs.schema import CheckpointSection, ConfigError

    assert CheckpointSection().lease_stale_s == 120
    for bad in (0, 5, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="checkpoint.lease_stale_s: must be at least 10"):
            CheckpointSection(lease_stale_s=bad)


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("case", ["dead here", "alive here", "dead elsewhere"])
def test_a_fresh_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(run, case):
    """A job killed with SIGKILL leaves a fresh lease: a relaunch on the same host, whose pid is
    gone, takes it over at once (compare-and-swap, with the warning); a live pid, or another
    host's pid, still waits for the lease to go stale."""
    clock = Clock()
    pid = os.getpid() if case == "alive here" else _dead_pid()
    host = "this-host" if case != "dead elsewhere" else "other-host"
    killed = Lease(run, "launch-a", stale_s=120, clock=clock, host=host, pid=pid, log=lambda m: None)
    killed.acquire()
    clock.t += 5  # fresh
    said = []
    relaunch = Lease(run, "launch-b", stale_s=120, clock=clock, host="this-host", log=said.append)
    if case == "dead here":
        taken = relaunch.acquire()
        assert taken is not None and taken.launch_id == "launch-a" and taken.pid == pid
        assert relaunch.held and len(said) == 1 and "whose process is gone" in said[0]
        assert json.loads(open(os.path.join(run.path, LEASE)).read())["launch_id"] == "launch-b"
        assert not killed.refresh() and "another launch took it over" in killed.lost
    else:
        with pytest.raises(LeaseHeld):
            relaunch.acquire()
        assert said == [] and not relaunch.held


class _StopsAnswering(_LocalStore):
    """The lease on local disk, until `down`: then every write fails (a storage cut off)."""

    down = False

    def replace(self, data, version):
        if self.down:
            raise OSError("storage does not answer")
        return super().replace(data, version)


def test_a_holder_that_cannot_refresh_within_stale_s_stops_its_run(run):
    """Refreshes that keep failing are retried while the lease may still be fresh; once they
    have failed for longer than stale_s, another launch may take the run, so the holder stops
    (on_lost, as a lost lease) instead of running on."""
    clock = Clock()
    store = _StopsAnswering(run.path)
    lost: list = []
    said: list = []
    a = lease(run, "launch-a", clock, log=said.append, heartbeat_s=0.01, store=store)
    a.acquire()
    store.down = True
    a.start_heartbeat(on_lost=lost.append)
    for _ in range(500):
        if said:
            break
        threading.Event().wait(0.01)
    clock.t += 100  # within stale_s (120): retried
    threading.Event().wait(0.2)
    assert not lost and "Lease heartbeat on" in said[0] and "retrying" in said[0]
    clock.t += 30  # 130 s without a refresh
    for _ in range(500):
        if lost:
            break
        threading.Event().wait(0.01)
    assert len(lost) == 1 and "could not refresh the lease on run" in lost[0] and "130s" in lost[0]
    assert a.lost == lost[0] and not a.held
    a.stop_heartbeat()


class _Remote:
    """A lease store without a lock (as on GCS): what read() answers is set by the test."""

    def __init__(self, holder):
        self.holder = holder

    def read(self):
        return (self.holder.to_bytes(), 1) if self.holder else None


def test_the_fence_without_a_lock_needs_a_heartbeat_younger_than_half_of_stale_s(run):
    """Without a lock spanning the check and the change (GCS), the fence lets a change through
    only while a takeover is at least stale_s / 2 away; an older heartbeat is waited for, and
    past stale_s, or another launch's lease, refuses (LeaseLost) and runs nothing."""
    from storage.fence import Fence, LeaseLost

    clock = Clock()
    store = _Remote(Holder("launch-a", "h", 1, clock.t, clock.t, "w"))
    slept: list = []

    def sleep(s):  # the driver's heartbeat lands while the fence waits
        slept.append(s)
        store.holder = Holder("launch-a", "h", 1, clock.t, clock.t, "w2")

    fence = Fence(run, "launch-a", 120, clock=clock, sleep=sleep, store=store)
    ran = []
    with fence():
        ran.append("fresh")
    clock.t += 61  # older than stale_s / 2: wait for a heartbeat
    with fence():
        ran.append("after a wait")
    assert ran == ["fresh", "after a wait"] and len(slept) == 1
    clock.t += 121  # past stale_s: another launch may hold the run by now
    with pytest.raises(LeaseLost, match="past checkpoint.lease_stale_s"), fence():
        ran.append("stale")
    store.holder = Holder("launch-b", "h", 1, clock.t, clock.t, "w3")
    with pytest.raises(LeaseLost, match="another launch holds it"), fence():
        ran.append("taken")
    store.holder = None
    with pytest.raises(LeaseLost, match="it is gone"), fence():
        ran.append("gone")
    assert ran == ["fresh", "after a wait"]


def test_the_fence_on_local_disk_holds_the_lease_lock(run):
    """On local disk the fenced block runs under the lease's lock: a takeover waits for it."""
    from storage.fence import Fence, LeaseLost

    clock = Clock()
    a = lease(run, "launch-a", clock)
    a.acquire()
    fence = Fence(run, "launch-a", 120, clock=clock)
    clock.t += 500  # stale: a taker may come, but not while the block runs
    b = lease(run, "launch-b", clock)
    took = threading.Event()
    with fence():
        t = threading.Thread(target=lambda: (b.acquire(), took.set()))
        t.start()
        assert not took.wait(0.3)
    t.join(5)
    assert took.is_set()
    with pytest.raises(LeaseLost), fence():
        pass
