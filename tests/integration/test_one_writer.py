"""One launch writes a run (issue 10). Two jobs started together on one run: one is refused with
exit 2 within seconds (one line naming the holder), the other finishes, and every checkpoint
verifies with hashes; the lease is gone afterwards. Local disk (create-only lease), and gs://
on the GCS API server, where a lease left by a SIGKILLed job (simulated: its heartbeat an hour
old, its pid gone) is taken over by exactly one of the two (a generation-matched update), with
a warning. A Ray start-up failure is exit 1 with one line, and releases the lease too."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_job import launcher
from storage import listing
from storage.lease import LEASE, Holder
from storage.location import resolve
from storage.manifest import Status

TINY = ["--config", "test", "--max-steps", "8", "--checkpoint-every", "4"]
NAMES = ["checkpoint-epoch0-step4-files1", "checkpoint-epoch0-step8-files2"]


@dataclass
class Job:
    pid: int
    rc: int
    out: str
    err: str
    took: float


def _two_at_once(args: list, env: dict, timeout: float = 400) -> list[Job]:
    started = time.monotonic()
    procs = [launcher.start(args, environ=env, stderr=subprocess.PIPE) for _ in range(2)]
    ended: dict = {}
    while len(ended) < 2 and time.monotonic() - started < timeout:
        for p in procs:
            if p.pid not in ended and p.poll() is not None:
                ended[p.pid] = time.monotonic() - started
        time.sleep(0.2)
    jobs = []
    for p in procs:
        if p.pid not in ended:
            p.kill()
        out, err = p.communicate()
        jobs.append(Job(p.pid, p.returncode, out, err, ended.get(p.pid, timeout)))
    return jobs


def _refused_and_done(jobs: list[Job]) -> tuple[Job, Job]:
    by_rc = sorted(jobs, key=lambda j: j.rc, reverse=True)
    refused, done = by_rc
    assert (refused.rc, done.rc) == (2, 0), [(j.rc, j.err[-3000:]) for j in jobs]
    lines = refused.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run ") and "Traceback" not in refused.err
    assert f"is in use by another launch (host {socket.gethostname()}, pid {done.pid}," in lines[0]
    assert refused.took < 30, f"refused after {refused.took:.1f}s"
    assert "🚀 Run" not in refused.out  # refused before Ray
    return refused, done


def _verified(run_uri: str) -> list[str]:
    run = resolve(run_uri)
    names = [str(e.name) for e in listing.scan(run)]
    for entry in listing.scan(run, verify_hashes=True):
        result = entry.result
        assert result.ok, (entry.name, result.reason)
    return names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from configs import load
    from data import corpus as data_prep

    data = tmp_path_factory.mktemp("one-writer") / "data"
    data_prep.prepare(resolve(str(data)), load("test"))  # once, not by both jobs at once
    return data


def test_two_jobs_on_one_local_run(ray_address, corpus, tmp_path):
    storage = tmp_path / "ckpt"
    jobs = _two_at_once([*TINY, "--storage", storage, "--run-name", "shared",
                         "--set", f"data.path={corpus}"], launcher.env(ray_address))
    refused, done = _refused_and_done(jobs)
    assert "🏁 Done: step 8" in done.out
    assert _verified(str(storage / "shared")) == NAMES
    assert not (storage / "shared" / LEASE).exists()  # released at the end


def test_two_jobs_take_over_a_killed_jobs_lease_on_gcs(ray_address, corpus, gcs, monkeypatch):
    bucket = gcs.client().bucket("ckpts")
    dead = Holder("killed-launch", "gone-host", 999999, time.time() - 7200, time.time() - 3600, "w")
    bucket.blob(f"one-writer/shared/{LEASE}").upload_from_string(dead.to_bytes(), if_generation_match=0)
    from trainers import snapshots  # what the killed launch left on this node: its snapshots

    leftover = Path(snapshots.launch_folder("gs://ckpts/one-writer/shared", "killed-launch"))
    (leftover / "rank0" / "checkpoint-epoch0-step4-files1-rank0-x").mkdir(parents=True)
    (leftover / "rank0" / "checkpoint-epoch0-step4-files1-rank0-x" / "optimizer.pt").write_bytes(b"0" * 100)
    env = launcher.env(ray_address, gcs.url)
    jobs = _two_at_once([*TINY, "--storage", "gs://ckpts/one-writer", "--run-name", "shared",
                         "--set", f"data.path={corpus}"], env)
    refused, done = _refused_and_done(jobs)
    assert not leftover.exists()  # removed by the launch that took the run over
    assert not Path(snapshots.run_folder("gs://ckpts/one-writer/shared")).exists()  # and its own
    took_over = [line for line in done.out.splitlines() if "Took over run" in line]
    assert len(took_over) == 1 and "host gone-host, pid 999999" in took_over[0]
    assert "last heartbeat 3600s ago" in took_over[0] or "last heartbeat 3601s ago" in took_over[0]
    assert "Took over run" not in refused.out  # exactly one of the two took it
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    from storage import gcs as gcs_client

    gcs_client.client.cache_clear()
    try:
        assert _verified("gs://ckpts/one-writer/shared") == NAMES
    finally:
        gcs_client.client.cache_clear()
    assert bucket.get_blob(f"one-writer/shared/{LEASE}") is None


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM, signal.SIGINT]],
                         ids=["ctrl-c", "sigterm then ctrl-c"])  # SIGTERM alone: tests/unit/test_main_exits.py
def test_a_stop_keeps_every_checkpoint_it_announced_and_leaves_no_snapshot(ray_address, corpus, tmp_path,
                                                                           signals):
    """Ctrl-C or SIGTERM (what `ray job stop` sends) with a backlog (a checkpoint every 2 steps):
    training stops at the next step, every checkpoint the log says was saved is committed (or,
    after a second signal, named as incomplete), exit 130, the lease is released and no
    snapshot folder is left; the backlog never exceeds checkpoint.max_pending."""
    import re

    from storage import manifest
    from trainers import snapshots

    storage = tmp_path / "ckpt"
    job = launcher.start(["--config", "test", "--max-steps", "40", "--checkpoint-every", "2",
                          "--storage", storage, "--run-name", "stopped", "--set", f"data.path={corpus}"],
                         ray_address=ray_address, stderr=subprocess.PIPE)
    run = resolve(str(storage / "stopped"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None and not list(storage.glob("*/checkpoint-*/metadata.json")):
        time.sleep(0.2)  # training is under way: its first checkpoint is complete
    assert job.poll() is None, job.communicate()
    complete_before = [e.name for e in listing.scan(run, verify_hashes=True) if e.result.ok]
    for sig in signals:
        job.send_signal(sig)
        time.sleep(0.5)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 130, (job.returncode, err[-3000:])
    saved = re.findall(r"💾 Staged (checkpoint-\S+) in memory", out)
    assert saved and "Training finished at step 40" not in out  # stopped mid-run
    ours = [line for line in err.splitlines() if line.startswith(("error:", "❌", "🛑"))]
    if len(signals) == 1:
        assert all(manifest.check(run.child(n), verify_hashes=True).ok for n in saved), (saved, out[-3000:])
        assert ours[-1] == (f"🛑 Stopped: the newest committed checkpoint is {saved[-1]}; continue "
                            "with --resume latest"), err[-3000:]
        assert f"🛑 Stop requested: stopped after step {saved[-1].split('step')[1].split('-')[0]} (saved)" in out
    else:  # stopped at once: whatever is not committed is named, and never passes for whole
        incomplete = [n for n in saved if not manifest.check(run.child(n), verify_hashes=True).ok]
        said = ours[-1]
        assert said.startswith("🛑 Stopped at once: "), err[-3000:]
        assert all(n in said for n in incomplete), (incomplete, said)
        for entry in listing.scan(run, verify_hashes=True):
            assert entry.result.ok or entry.result.status is Status.INCOMPLETE, (entry.name, entry.result.reason)
    for name in complete_before:  # what was complete before the signal still verifies
        assert manifest.check(run.child(str(name)), verify_hashes=True).ok, name
    pending = [int(n) for n in re.findall(r"\((\d+) of checkpoint.max_pending 2 pending\)", out)]
    assert pending and max(pending) <= 2
    assert not (storage / "stopped" / LEASE).exists()
    assert not Path(snapshots.run_folder(run.uri)).exists()


def test_ray_start_failure_is_exit_1_one_line_and_the_lease_is_released(corpus, tmp_path):
    storage = tmp_path / "ckpt"
    p = launcher.run([*TINY, "--storage", storage, "--set", f"data.path={corpus}"],
                     ray_address="nonsense", timeout=120)
    assert p.rc == 1, p.err[-3000:]
    assert "Traceback" not in p.out
    ours = [line for line in p.err.splitlines() if line.startswith(("❌", "error:"))]
    assert ours == ["❌ Ray did not start: ValueError: Invalid address format: nonsense "
                    "(RAY_ADDRESS=nonsense)"], p.err
    assert p.err.strip().splitlines()[-1] == ours[0]
    assert not (storage / "test" / LEASE).exists()


def test_gcs_lease_changes_are_generation_matched(gcs, monkeypatch):
    """The compare-and-swap the takeover relies on, against the GCS API server (no Ray)."""
    from storage import gcs as gcs_client
    from storage.lease import Lease, LeaseHeld, _Conflict, _GcsStore

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    gcs_client.client.cache_clear()
    try:
        store = _GcsStore("ckpts/cas/run")
        v1 = store.create(b"1")
        with pytest.raises(FileExistsError):
            store.create(b"2")
        v2 = store.replace(b"2", v1)
        with pytest.raises(_Conflict):  # the second of two takers that read v1
            store.replace(b"3", v1)
        assert store.read() == (b"2", v2)
        store.delete(v2)
        assert store.read() is None
        run = resolve("gs://ckpts/cas/leased")
        clock = [1_000_000.0]
        first = Lease(run, "a", clock=lambda: clock[0], log=lambda m: None)
        first.acquire()
        with pytest.raises(LeaseHeld):
            Lease(run, "b", clock=lambda: clock[0]).acquire()
        clock[0] += 121
        second = Lease(run, "c", clock=lambda: clock[0], log=lambda m: None)
        assert second.acquire().launch_id == "a"
        assert first.refresh() is False and first.release() is False
        assert second.refresh() and second.release()
        assert store.read() is None
    finally:
        gcs_client.client.cache_clear()


def test_a_stop_keeps_its_timeout_when_storage_stops_answering(ray_address, corpus, gcs, monkeypatch):
    """Issue 23, item 3 (and 8: the reports queued for Ray Train are bounded too). A checkpoint
    every 2 steps; at step 10 the storage stops answering writes to checkpoint folders, for
    checkpoint.drain_timeout_s (3 s) + 7 s, and the job gets Ctrl-C. It exits 130 within the
    timeout plus a few seconds; the checkpoints the stop named stay incomplete, even after their
    uploads went through late; the driver names them."""
    import re
    import threading

    from faultproxy import FaultProxy

    from storage import manifest

    timeout_s, hang_s = 3, 10
    with FaultProxy(gcs.url, schedule=("ok",)) as proxy:
        job = launcher.start(["--config", "test", "--max-steps", "400", "--checkpoint-every", "2",
                              "--storage", "gs://ckpts/hang", "--run-name", "h", "--set", f"data.path={corpus}",
                              "--set", f"checkpoint.drain_timeout_s={timeout_s}"],
                             ray_address=ray_address, emulator=proxy.url, stderr=subprocess.PIPE)
        lines: list[str] = []
        at_10 = threading.Event()

        def read() -> None:
            for line in job.stdout:
                lines.append(line)
                if re.search(r"💾 Staged checkpoint-epoch\d+-step10-", line):
                    at_10.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert at_10.wait(300), "".join(lines)[-3000:]
        proxy.hang("/checkpoint-epoch", hang_s)
        job.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        err = job.stderr.read()
        job.wait(60)
        took = time.monotonic() - stopped
        reader.join(10)
        time.sleep(max(0.0, stopped + hang_s + 3 - time.monotonic()))  # the late uploads went through
        assert proxy.counts["held"] > 0, proxy.counts
    out = "".join(lines)
    print(f"exit {took:.1f}s after Ctrl-C (checkpoint.drain_timeout_s {timeout_s})")
    assert job.returncode == 130, (job.returncode, out[-3000:], err[-3000:])
    said = re.search(r"🛑 \d+ checkpoint\(s\) not finished within checkpoint.drain_timeout_s: (.+) stay "
                     r"incomplete and are never resumed", out)
    assert said, out[-3000:]
    named = said.group(1).split(", ")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    from storage import gcs as gcs_client

    gcs_client.client.cache_clear()
    try:
        run = resolve("gs://ckpts/hang/h")
        for name in named:
            assert manifest.check(run.child(name)).status is Status.INCOMPLETE, name
    finally:
        gcs_client.client.cache_clear()
    assert f"🛑 Saved and not committed, so incomplete and never resumed: {', '.join(named)}" in err, err[-3000:]
    assert took < timeout_s + 12, f"exit {took:.1f}s after Ctrl-C; {out[-3000:]}"
