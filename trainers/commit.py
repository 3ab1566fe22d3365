"""The commit: metadata.json, written once every writing rank's files are in storage, then
retention. Rank 0 does it in its checkpoint writer thread (trainers/checkpointer.py).

Each writing rank (rank 0 under ddp, every rank under fsdp) uploads its own files and describes
them (sizes and hashes); under fsdp the ranks' writer threads exchange these descriptions with a
gather on the checkpoint process group, after each rank's upload, so rank 0 holds every rank's
list only when every rank's files are in storage. ``commit`` checks that every writer reported
and that storage holds each listed file as the very object its rank uploaded (transfer.not_written_by:
generation and MD5 on GCS, inode locally; a same-size file of another writer of the name fails
it), builds metadata.json (rank 0's progress,
the resolved config, the data index, the manifest of every rank's files and which rank wrote
which) and creates it, create-only. A checkpoint some rank never finished (a crash
mid-upload) gets no metadata.json and stays incomplete: `latest` skips it and naming it is
refused.

The commit and retention run under the fence (storage/lease.py): only while the run's lease is
this launch's, so a launch that lost it (its driver frozen or cut off from storage, the run
taken over) never changes the run again.

Why not Ray Train's controller (UserCallback.after_report, which also runs after every rank's
upload)? It consumes one report round per poll, about one a second here, so a commit there
lags the uploads by a round or more, and a crash in that window loses a finished checkpoint.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict

from data.order import sample_order
from storage import manifest, retention, transfer
from storage.location import resolve
from trainers.launch_plan import LaunchPlan
from trainers.logs import say as _say


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
        "sample_order": sample_order(cfg, plan.token_dtype),
        "resumed_from": asdict(plan.resume) if plan.resume else None,
        "init_from": asdict(plan.init_from) if plan.init_from else None,  # --init-from: file, sha256
    }
    if shards is not None:
        metadata["shards"] = shards
    return manifest.with_manifest(metadata, files)


class Committer:
    """Rank 0's side of every checkpoint of a launch: the commit and retention after it."""

    def __init__(self, plan: LaunchPlan, say=_say, fence: transfer.Fence | None = None):
        self.plan, self.say, self.fence = plan, say, fence
        resumed = plan.resume
        self.policy = retention.Policy(
            keep_last=plan.config.checkpoint.keep_last, keep_best=plan.config.checkpoint.keep_best,
            protect=frozenset([resumed.name]) if resumed and resumed.uri.startswith(plan.run_uri) else frozenset(),
        )

    def commit_and_retain(self, name: str, reports: list[dict]) -> bool:
        """commit, then retention if it committed; storage errors are raised (the save fails
        loudly, as an upload that fails)."""
        committed = self.commit(name, reports)
        if committed:
            with self._fenced():
                deleted = retention.apply(resolve(self.plan.run_uri), self.policy, log=self.say)
            for name in deleted:
                self.say(f"🧹 Retention deleted {name}")
        return committed

    def commit(self, name: str, metrics: list[dict]) -> bool:
        """metrics: each rank's report ({rank, world_size, files, write_s, upload_s}; rank 0's
        with the commit fields). False, with a line said, when the checkpoint stays incomplete."""
        started = time.time()
        dest = resolve(self.plan.run_uri).child(name)
        reports = {m.get("rank"): m for m in metrics}
        head = reports.get(0, {})
        world = head.get("world_size", len(metrics))
        sharded = self.plan.config.train.strategy == "fsdp"
        writers = range(world) if sharded else [0]
        missing = [r for r in writers if "files" not in reports.get(r, {})]
        if missing or "commit" not in head:
            self.say(f"⚠️  {name} is not committed: rank(s) {missing or [0]} did not report their files "
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
        stored: dict = {}
        for rank in writers:
            stored.update(reports[rank].get("stored") or {})
        metadata = checkpoint_metadata(self.plan, head["commit"], world, files, shards if sharded else None)
        with self._fenced():
            existing = manifest.check(dest)
            if existing.ok and existing.metadata.get("launch_id") == self.plan.launch_id:
                return False  # a retry regenerated it: this launch committed it already
            wrong = transfer.not_written_by(dest, files, stored)
            if wrong:
                self.say(f"⚠️  {name} is not committed: {wrong[0]} in storage is not the file its rank "
                         "uploaded (missing, another size, or replaced by another writer of this name); it "
                         "stays incomplete and is never resumed")
                return False
            transfer.commit(dest, json.dumps(metadata, indent=2, sort_keys=True).encode(),
                            self.plan.launch_id, take_over=self.fence is not None)
        size_mb = sum(f["size"] for f in files.values()) / 2**20
        slowest = max(reports[r].get("write_s", 0) + reports[r].get("upload_s", 0) for r in writers)
        who = f"{len(writers)} ranks' shards" if sharded else "rank 0"
        self.say(f"☁️  Uploaded {name} to {dest.uri} ({size_mb:.1f} MB from {who}; written and uploaded "
             f"in {slowest:.2f}s, committed in {time.time() - started:.2f}s)")
        return True

    def _fenced(self):
        return self.fence() if self.fence is not None else nullcontext()
