"""trainers/ray_reports.py without Ray: the count of this rank's reports Ray Train's upload
thread has not reached yet, the hold on the next save while checkpoint.max_pending of them
wait, and the way out when Ray drops one (issue 23, item 8). Ray's upload thread is a thread
here that calls and returns as Ray's would; the clock is injected where time decides."""

from __future__ import annotations

import threading
import time

from trainers.ray_reports import RayReports


def test_a_save_is_held_while_max_pending_reports_wait_for_ray():
    reports = RayReports()
    for _ in range(3):
        reports.reporting()
    assert reports.waiting() == 3

    def ray_upload_thread():  # takes one report every 50 ms: called, then returned
        for _ in range(3):
            time.sleep(0.05)
            reports.upload_called()
            reports.upload_returned()

    threading.Thread(target=ray_upload_thread, daemon=True).start()
    waited, dropped = reports.wait_below(2)
    assert reports.waiting() < 2 and dropped == 0
    assert 0.05 <= waited < 5


def test_the_wait_ends_at_a_stops_deadline():
    reports = RayReports()
    reports.reporting()
    reports.reporting()
    waited, dropped = reports.wait_below(2, deadline=time.monotonic() + 0.3)
    assert 0.25 <= waited < 5 and dropped == 0 and reports.waiting() == 2


def test_a_report_ray_never_runs_counts_as_dropped_after_lost_after_s():
    now = [100.0]
    reports = RayReports(lost_after_s=60, clock=lambda: now[0])
    reports.reporting()
    reports.upload_called()  # Ray runs the first: our upload function waits for our writer
    reports.reporting()
    reports.reporting()  # Ray skips this one (a reset barrier): its upload function never runs
    done = {}

    def hold():
        done["result"] = reports.wait_below(2)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    now[0] += 600  # our writer is slow: not Ray's time, nothing is dropped
    time.sleep(0.5)
    assert holder.is_alive() and reports.dropped == 0
    reports.upload_returned()  # from here on Ray's thread is idle while two wait
    now[0] += 59
    time.sleep(0.5)
    assert holder.is_alive() and reports.dropped == 0
    now[0] += 2
    holder.join(5)
    assert not holder.is_alive() and done["result"][1] == 1 and reports.waiting() == 1
