"""Kill the job while a checkpoint is uploading (every GCS request slowed down): whatever is
left in the bucket, `latest` and a named resume never use an incomplete checkpoint."""

import json
import os
import signal
import time

from faultproxy import FaultProxy

from ray_job import launcher


def test_killed_mid_upload_nothing_incomplete_is_resumed(runs, gcs, ray_address):
    args = ["--config", "test", "--storage", "gs://ckpts/killed", "--run-name", "k",
            "--set", f"data.path={runs.data}"]
    with FaultProxy(gcs.url, schedule=("slow",), max_faults=10_000, slow_s=0.7) as proxy:
        job = launcher.start(args, ray_address=ray_address, emulator=proxy.url, start_new_session=True)
        bucket = gcs.client().bucket("ckpts")
        prefix = "killed/k/checkpoint-epoch0-step8-files2/"
        deadline = time.monotonic() + 240
        landed = []
        while time.monotonic() < deadline and job.poll() is None:  # watch the bucket directly
            landed = [b.name for b in bucket.list_blobs(prefix=prefix)]
            if landed:
                break
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)  # some objects in, metadata.json (last) not yet
        output = job.communicate(timeout=30)[0]
        time.sleep(8)  # Ray reaps the dead driver's workers; nothing may write after this
    assert landed and prefix + "metadata.json" not in landed, (landed, output[-3000:])

    listed = launcher.run(["list", "--storage", "gs://ckpts/killed", "--run-name", "k", "--json"],
                          module="ray_job.checkpoints", emulator=gcs.url)
    table = json.loads(listed.out)
    statuses = {r["name"]: r["status"] for r in table}
    assert "complete" not in statuses.values(), statuses
    assert statuses.get("checkpoint-epoch0-step8-files2") == "incomplete", statuses  # killed mid-upload

    latest = launcher.run(args + ["--resume", "latest"], emulator=gcs.url)
    assert latest.rc == 2 and "no complete checkpoint" in latest.err, latest.out[-2000:]
    named = launcher.run(args + ["--resume", "checkpoint-epoch0-step8-files2"], emulator=gcs.url)
    assert named.rc == 2 and "is incomplete" in named.err, named.out[-2000:]
