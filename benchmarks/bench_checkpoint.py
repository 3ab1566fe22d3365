"""Checkpoint stall and overhead, through the real service, checkpoints to the GCS API server
on loopback (fake-gcs-server), a model whose checkpoint is ~150 MB (weights + AdamW state).

1. How long the train loop is blocked per checkpoint: asynchronous upload (Ray Train ASYNC: the
   state staged in memory, then written, hashed and uploaded by our upload function in the
   background) against synchronous upload. Target: async <= 2% (DCP's published async figure is
   ~4%: 148.8 s -> 6.3 s at 7B). bench_sharded.py measures the same for ddp and fsdp at W=2.
2. Whole-run overhead of checkpointing every N steps against none, measured, and projected to
   the production config's frequency (every 1000 steps). Target: <= 3.5% (CheckFreq).
3. Backpressure (not in --quick): a checkpoint every step, to a GCS server slowed to 0.3 s a
   request (tests/integration/faultproxy.py), so saves come faster than uploads: the most
   checkpoints saved and not yet committed (<= checkpoint.max_pending, 2), how many saves
   waited, and the loop's stall per checkpoint with the waits, against async every N.
4. A graceful stop (not in --quick): Ctrl-C in the middle of that run: seconds from the stop
   to every saved checkpoint committed, and how many were pending at the stop.
5. Ray Train's report queue (--registration only): the test preset, 400 steps, a checkpoint every
   4 (local disk): Ray takes about one report per poll of its workers, so a run that saves
   faster used to wait for the queue after its last step. Seconds from the last step's save to
   the job's exit (target < 5 s), the run's length, and the saves held for Ray.

    python benchmarks/bench_checkpoint.py [--quick] [--only-backlog S] [--registration]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import _common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-backlog", type=float, metavar="ASYNC_STALL_S",
                    help="parts 3 and 4 only, against a known async stall per checkpoint")
    ap.add_argument("--registration", type=int, nargs="?", const=400, metavar="STEPS",
                    help="part 5 only (400 steps unless told)")
    args = ap.parse_args()
    if args.registration:
        registration_tail(args.registration)
        return
    steps, every, sets = _common.checkpoint_workload("ckpt", args.quick)
    gcs = _common.GcsServer()
    if args.only_backlog:  # parts 3 and 4, against part 1's figure from RESULTS.md
        try:
            backlog_and_stop(steps, sets, gcs.url, args.only_backlog)
        finally:
            gcs.stop()
        return
    try:
        results = {}
        modes = (("sync", every), ("async", every)) + ((("none", 10_000),) if not args.quick else ())
        for mode, ckpt_every in modes:  # --quick (the smoke test): part 1 only
            cmd = ["--config", "test", "--num-workers", 1, "--storage", f"gs://bench/{mode}",
                   "--run-name", "r", "--max-steps", steps, "--checkpoint-every", ckpt_every,
                   "--set", f"checkpoint.upload={'sync' if mode == 'sync' else 'async'}"]
            for s in sets:
                cmd += ["--set", s]
            run = _common.run_cli(cmd, gcs.url)
            rc, out = run.rc, run.out
            assert rc == 0, out[-3000:]
            stalls = _common.floats(r"Training blocked ([\d.]+)s", out)
            rate = _common.floats(r"steps after the first at ([\d.]+) steps/s", out)[0]
            size = _common.floats(r"\(([\d.]+) MB on rank 0", out)
            results[mode] = (stalls, rate, size)
        report(results, steps, every)
        if not args.quick:
            async_stall = statistics.median(results["async"][0][:-1] or results["async"][0])
            backlog_and_stop(steps, sets, gcs.url, async_stall)
    finally:
        gcs.stop()


def report(results: dict, steps: int, every: int) -> None:
    sync_stall = statistics.median(results["sync"][0][:-1] or results["sync"][0])
    async_stall = statistics.median(results["async"][0][:-1] or results["async"][0])
    size = results["async"][2][0] if results["async"][2] else float("nan")
    print(f"checkpoint size {size:.0f} MB; {steps} steps, a checkpoint every {every}")
    print(f"1. loop blocked per checkpoint: sync {sync_stall:.3f}s   async {async_stall:.3f}s   "
          f"async/sync {async_stall / sync_stall:.3f} (target <= 0.02)  "
          f"{'OK' if async_stall / sync_stall <= 0.02 else 'MISSED'}")
    if "none" not in results:  # --quick
        return
    none_rate, async_rate = results["none"][1], results["async"][1]
    measured = none_rate / async_rate - 1
    step_s = 1 / none_rate
    # Per checkpoint, everything it cost the run: the stall plus the slower steps while the
    # upload competes for the CPUs (the throughput dip), from the two whole-run rates.
    saves = len(results["async"][0])
    per_ckpt = ((steps - 1) / async_rate - (steps - 1) / none_rate) / saves
    projected = per_ckpt / (1000 * step_s)
    print(f"2. steps/s: no checkpoints {none_rate:.3f}   async every {every} {async_rate:.3f}   "
          f"overhead {measured:+.1%} at every {every} steps")
    print(f"   cost per checkpoint incl. the dip {per_ckpt:.2f}s; projected at the production "
          f"frequency (every 1000 steps of {step_s:.2f}s): "
          f"{projected:.2%} (target <= 3.5%)  {'OK' if projected <= 0.035 else 'MISSED'}")


def backlog_and_stop(steps: int, sets: list, gcs_url: str, async_stall: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from faultproxy import FaultProxy

    with FaultProxy(gcs_url, schedule=("slow",), max_faults=1_000_000, slow_s=0.3) as proxy:
        _backlog_and_stop(steps, sets, proxy.url, async_stall)


def _backlog_and_stop(steps: int, sets: list, gcs_url: str, async_stall: float) -> None:
    from ray_job import launcher

    cmd = ["--config", "test", "--num-workers", 1, "--storage", "gs://bench/backlog", "--run-name", "r",
           "--max-steps", steps, "--checkpoint-every", 1]
    for s in sets:
        cmd += ["--set", s]
    run = _common.run_cli(cmd, gcs_url)
    assert run.rc == 0, run.out[-3000:]
    pending = [int(n) for n in re.findall(r"\((\d+) of checkpoint.max_pending \d+ pending\)", run.out)]
    waits = _common.floats(r"waited ([\d.]+)s\n", run.out)
    stalls = _common.floats(r"Training blocked ([\d.]+)s", run.out)
    stall = statistics.median(stalls[1:-1] or stalls)
    print(f"3. a checkpoint every step ({len(pending)} saves): most pending {max(pending)} (max_pending 2); "
          f"{len(waits)} saves waited for an upload; stall per checkpoint {stall:.3f}s "
          f"({stall / async_stall:.1f}x async every N's {async_stall:.3f}s)")

    stopped_run = [a if a != "r" else "stopped" for a in cmd]  # another run name, same storage
    job = launcher.start(stopped_run, ray_address=os.environ.get("BENCH_RAY_ADDRESS"), emulator=gcs_url)
    out, saved = [], 0
    for line in job.stdout:
        out.append(line)
        saved += "💾 Staged" in line
        if saved == max(3, steps // 3):
            break
    job.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    rest = job.communicate(timeout=600)[0]
    took = time.monotonic() - stopped
    text = "".join(out) + rest
    assert job.returncode == 130, text[-3000:]
    todo = re.search(r"finishing (\d+) checkpoint\(s\) saved and not yet committed", text)
    drained = _common.floats(r"Every saved checkpoint is committed \(([\d.]+)s\)", text)
    print(f"4. Ctrl-C after {saved} saves: {todo.group(1) if todo else '?'} pending at the stop, all "
          f"committed in {drained[0] if drained else float('nan'):.1f}s; the job exited 130 "
          f"{took:.1f}s after the signal")


def registration_tail(steps: int = 400, every: int = 4) -> None:
    import tempfile

    from ray_job import launcher

    root = Path(tempfile.mkdtemp(prefix="bench-registration-"))
    job = launcher.start(["--config", "test", "--max-steps", steps, "--checkpoint-every", every,
                          "--storage", root / "ckpt", "--set", f"data.path={root / 'data'}"],
                         ray_address=os.environ.get("BENCH_RAY_ADDRESS"))
    started, lines = time.monotonic(), []
    marks = {"last save": rf"💾 Staged checkpoint-epoch\d+-step{steps}-", "loop done": r"🏁 Training finished",
             "driver done": r"🏁 Done:"}
    seen: dict[str, float] = {}
    exited: list[float] = []  # the driver's exit (Ray's daemons may hold the pipe a while longer)

    def wait() -> None:
        job.wait()
        exited.append(time.monotonic())

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    for line in job.stdout:
        lines.append(line)
        for mark, pattern in marks.items():
            if mark not in seen and re.search(pattern, line):
                seen[mark] = time.monotonic()
    waiter.join()
    ended = exited[0]
    out = "".join(lines)
    assert job.returncode == 0 and len(seen) == len(marks), out[-3000:]
    held = _common.floats(r"waited ([\d.]+)s for Ray Train", out)
    stalls = _common.floats(r"Training blocked ([\d.]+)s", out)
    print(f"5. {steps} steps, a checkpoint every {every} ({len(stalls)} saves): last step's save to exit "
          f"{ended - seen['last save']:.1f}s (target < 5 s): to the loop's end "
          f"{seen['loop done'] - seen['last save']:.1f}s, to the driver's Done line "
          f"{seen['driver done'] - seen['loop done']:.1f}s, to the exit {ended - seen['driver done']:.1f}s; "
          f"run {ended - started:.1f}s; {len(held)} saves held for Ray Train, {sum(held):.1f}s in all; "
          f"stall per checkpoint median {statistics.median(stalls):.3f}s")

if __name__ == "__main__":
    main()
