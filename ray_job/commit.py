"""The commit: metadata.json written once every writer's files are in storage, on Ray Train's
controller, then retention.

Each writing rank (rank 0 under ddp, every rank under fsdp) uploads its own files from Ray's
upload thread and reports their sizes and hashes in its metrics (trainers/checkpointer.py).
Ray Train calls ``after_report`` once per report round, on the controller, after *every* rank's
upload has returned (train/v2 ReportCallbackHandler consolidates a round only when each rank
has reported). So this is the one place that sees the whole checkpoint: it checks that every
writer reported and that storage holds each listed file at its size, builds metadata.json (the
resolved config, the data index and the manifest of every rank's files) and creates it,
create-only. A checkpoint some rank never finished (a crash mid-upload, a preempted node) gets
no metadata.json and stays incomplete: `latest` skips it and naming it is refused.

Ray registers the checkpoint before this runs; a crash in between leaves a registered folder
with no metadata.json, which every reader already treats as incomplete (storage/manifest.py).
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from dataclasses import asdict

from ray.train import UserCallback

from storage import manifest, retention, transfer
from storage.location import resolve
from trainers.launch_plan import LaunchPlan


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")  # forwarded to the driver's console by Ray
    sys.stdout.flush()


def checkpoint_metadata(plan: LaunchPlan, progress: dict, world_size: int, files: dict,
                        shards: dict[str, list[str]] | None) -> dict:
    """metadata.json's content: rank 0's progress for this checkpoint, what the launch fixed
    (config, data index, resume point), and the manifest of every writer's files."""
    cfg = plan.config
    metadata = {
        **progress,
        "run_name": cfg.run_name, "launch_id": plan.launch_id, "world_size": world_size,
        "global_batch_size": cfg.train.global_batch_size, "strategy": cfg.train.strategy,
        "config": asdict(cfg), "data_index": plan.data_index.to_json(),
        "resumed_from": asdict(plan.resume) if plan.resume else None,
    }
    if shards is not None:
        metadata["shards"] = shards
    return manifest.with_manifest(metadata, files)


class CommitCheckpoints(UserCallback):
    """Runs in the TrainController process; a failed commit is logged, never fatal (the
    checkpoint stays incomplete and the next one is tried as usual)."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        resumed = plan.resume
        self.policy = retention.Policy(
            keep_last=plan.config.checkpoint.keep_last, keep_best=plan.config.checkpoint.keep_best,
            protect=frozenset([resumed.name]) if resumed and resumed.uri.startswith(plan.run_uri) else frozenset(),
        )

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is None:
            return
        name = posixpath.basename(checkpoint.path.rstrip("/"))
        try:
            committed = self.commit(name, metrics)
        except Exception as e:  # storage errors: the checkpoint stays incomplete, training goes on
            _say(f"❌ {name} was not committed ({type(e).__name__}: {e}); it stays incomplete")
            return
        if committed:
            run = resolve(self.plan.run_uri)
            for deleted in retention.apply(run, self.policy, log=_say):
                _say(f"🧹 Retention deleted {deleted}")

    def commit(self, name: str, metrics: list[dict]) -> bool:
        started = time.time()
        dest = resolve(self.plan.run_uri).child(name)
        reports = {m.get("rank"): m for m in metrics}
        head = reports.get(0, {})
        world = head.get("world_size", len(metrics))
        sharded = self.plan.config.train.strategy == "fsdp"
        writers = range(world) if sharded else [0]
        missing = [r for r in writers if "files" not in reports.get(r, {})]
        if missing or "commit" not in head:
            _say(f"⚠️  {name} is not committed: rank(s) {missing or [0]} did not report their files "
                 "(a rank failed or left mid-save); it stays incomplete and is never resumed")
            return False
        files: dict = {}
        shards: dict[str, list[str]] = {}
        for rank in writers:
            theirs = reports[rank]["files"]
            clash = sorted(set(files) & set(theirs))
            if clash:
                raise manifest.CheckpointError(f"ranks wrote the same file {clash[0]} twice")
            files.update(theirs)
            shards[str(rank)] = sorted(theirs)
        existing = manifest.check(dest)
        if existing.ok and existing.metadata.get("launch_id") == self.plan.launch_id:
            return False  # a retry regenerated it: this launch committed it already
        absent = transfer.missing_or_wrong_size(dest, files)
        if absent:
            _say(f"⚠️  {name} is not committed: {absent[0]} is not in storage at its size; it stays "
                 "incomplete and is never resumed")
            return False
        metadata = checkpoint_metadata(self.plan, head["commit"], world, files, shards if sharded else None)
        transfer.commit(dest, json.dumps(metadata, indent=2, sort_keys=True).encode())
        size_mb = sum(f["size"] for f in files.values()) / 2**20
        slowest = max(reports[r].get("write_s", 0) + reports[r].get("upload_s", 0) for r in writers)
        who = f"{len(writers)} ranks' shards" if sharded else "rank 0"
        _say(f"☁️  Uploaded {name} to {dest.uri} ({size_mb:.1f} MB from {who}; written and uploaded "
             f"in {slowest:.2f}s, committed in {time.time() - started:.2f}s)")
        return True
