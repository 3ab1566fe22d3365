"""Fine-tuning from weights, end to end: `checkpoints export` of the shared ddp run (fp32, and
bf16 at half the bytes), then a fresh 2-worker fsdp run `--init-from` that export: its first
loss is the loss of the file's weights on its first global batch (so the weights before the
first step are the file's), metadata.json records the file and its sha256. One short run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from conftest import audit, read_json
from safetensors import safe_open
from safetensors.torch import load_file

from configs import load, with_overrides
from data.index import read_all
from ray_job import launcher
from storage.location import resolve
from trainers.model import build_model

SOURCE = "checkpoint-epoch1-step40-files4"


def _export(runs, out, *dtype):
    p = launcher.run(["export", SOURCE, "--storage", runs.storage, "--run-name", "straight", "--out", out, *dtype],
                     module="ray_job.checkpoints")
    assert p.rc == 0, p.out
    return out / "model.safetensors"


def test_a_fresh_fsdp_run_starts_from_an_export_of_another_run(runs, ray_address, tmp_path):
    fp32 = _export(runs, tmp_path / "fp32")
    bf16 = _export(runs, tmp_path / "bf16", "--dtype", "bf16")
    with safe_open(str(fp32), "pt") as a, safe_open(str(bf16), "pt") as b:
        assert {a.get_tensor(k).dtype for k in a.keys()} == {torch.float32}
        assert {b.get_tensor(k).dtype for k in b.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bf16"
    assert abs(bf16.stat().st_size / fp32.stat().st_size - 0.5) < 0.01

    storage, trail = tmp_path / "ckpt", tmp_path / "audit"
    run = launcher.run(["--config", "test", "--storage", storage, "--set", f"data.path={runs.data}",
                        "--set", "train.strategy=fsdp", "--set", "model.dropout=0", "--run-name", "tuned",
                        "--max-steps", 1, "--init-from", fp32, "--audit-dir", trail], ray_address=ray_address)
    assert run.rc == 0, run.out[-4000:]
    sha = hashlib.sha256(fp32.read_bytes()).hexdigest()
    assert f"🔁 Initialized the weights from {fp32} (sha256 {sha[:12]}" in run.out
    (folder,) = (storage / "tuned").glob("checkpoint-*")
    meta = read_json(folder / "metadata.json")
    assert meta["init_from"] == {"uri": str(fp32), "sha256": sha, "size": fp32.stat().st_size}
    first_loss = read_json(folder / "training_metrics.json")["loss_history"][0]
    assert first_loss[0] == 1

    # the loss of the file's weights on the run's first global batch (rank 0's half, then rank 1's)
    ids = [i for rank in (0, 1) for r in audit(trail) if r["event"] == "batch" and r["rank"] == rank
           for i in r["ids"]]
    data = resolve(str(runs.data))
    all_ids, tokens = read_all(data.fs, data.child("train").path)
    batch = torch.from_numpy(tokens[[int(np.flatnonzero(all_ids == i)[0]) for i in ids]].astype(np.int64))
    cfg = with_overrides(load("test"), {"model": {"dropout": 0.0}})

    def loss_of(state):
        model = build_model(cfg.model)
        if state is not None:
            model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            halves = [F.cross_entropy(model(h[:, :-1]).float().flatten(0, 1), h[:, 1:].flatten())
                      for h in batch.chunk(2)]
        return float(sum(halves) / 2)

    assert abs(first_loss[1] - loss_of(load_file(str(fp32)))) < 1e-4
    torch.manual_seed(cfg.train.seed)
    assert abs(first_loss[1] - loss_of(None)) > 0.5  # a fresh init's loss is far off

    # a resume ignores --init-from (the run continues from its checkpoint) and keeps recording it
    again = launcher.run(["--config", "test", "--storage", storage, "--set", f"data.path={runs.data}",
                          "--set", "train.strategy=fsdp", "--set", "model.dropout=0", "--run-name", "tuned",
                          "--max-steps", 2, "--resume", "latest", "--init-from", fp32], ray_address=ray_address)
    assert again.rc == 0, again.out[-4000:]
    assert f"ℹ️  --init-from {fp32} ignored: resuming {folder.name}" in again.out
    assert "🔁 Initialized" not in again.out
    (second,) = [f for f in (storage / "tuned").glob("checkpoint-*") if f != folder]
    assert read_json(second / "metadata.json")["init_from"]["sha256"] == sha
