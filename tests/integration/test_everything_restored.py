"""Property 5: everything under the guide's "What Gets Restored", and its log lines word for word."""

import re

from conftest import read_json


def test_guide_lines_word_for_word_with_real_numbers(runs):
    out = runs.chain[1].out
    metrics = read_json(runs.ckpt("chain", "checkpoint-epoch0-step10-files2") / "training_metrics.json")
    meta = read_json(runs.ckpt("chain", "checkpoint-epoch0-step10-files2") / "metadata.json")
    best = min(v for _, v in metrics["loss_history"])
    expected = [
        "🔄 Attempting to resume training from checkpoint: checkpoint-epoch0-step10-files2",
        "✅ Resumed from checkpoint: checkpoint-epoch0-step10-files2",
        "   Starting from Step: 11, Epoch: 0",
        f"   Best loss restored: {best:.4f}",
        "   Loss history entries: 10",
        "   Training will continue from global step 11",
        "📈 Starting optimized training loop...",
        "🔄 Resuming training from step 10, target: 24",
        "🔄 Resuming epoch 0: skipping 10 batches",
        "Restored scheduler state",
        "Loaded training metrics",
    ]
    for line in expected:
        assert line in out, f"missing: {line!r}"
    positions = [out.index(line) for line in expected[:9]]
    assert positions == sorted(positions), "the guide's lines are out of order"
    assert meta["best_loss"] == best
    assert "📥 Downloading checkpoint from GCS..." not in out  # local storage


def test_progress_bar_starts_at_the_resumed_step(runs):
    assert "progress started at step 10" in runs.chain[1].out
    assert "progress started at step 24" in runs.chain[2].out
    assert re.search(r"\b10/24\b", runs.chain[1].out), "tqdm never showed 10/24"
    assert not re.search(r"\b0/24\b", runs.chain[1].out)


def test_scheduler_step_epoch_best_loss_and_histories_restored(runs):
    at24 = read_json(runs.ckpt("chain", "checkpoint-epoch1-step24-files0") / "metadata.json")
    m24 = read_json(runs.ckpt("chain", "checkpoint-epoch1-step24-files0") / "training_metrics.json")
    straight = read_json(runs.ckpt("straight", "checkpoint-epoch1-step24-files0") / "training_metrics.json")
    assert (at24["step"], at24["epoch"], at24["samples_in_epoch"], at24["files_processed"]) == (24, 1, 0, 0)
    assert at24["best_loss"] == min(v for _, v in straight["loss_history"][:24])
    assert len(m24["loss_history"]) == len(m24["lr_history"]) == 24  # histories carried over
    assert m24["lr_history"][10] == straight["lr_history"][10]  # first LR after resuming at 10
    third = runs.chain[2].out
    assert "Starting from Step: 25, Epoch: 1" in third
    assert "🔄 Resuming epoch 1: skipping 0 batches" in third


def test_metadata_lists_everything_the_guide_names(runs):
    folder = runs.ckpt("chain", "checkpoint-epoch1-step40-files4")
    meta = read_json(folder / "metadata.json")
    for key in ("step", "epoch", "files_processed", "best_loss", "samples_in_epoch", "world_size",
                "global_batch_size", "config", "created_at", "files"):
        assert key in meta, key
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt", "scheduler_state.pt",
                                  "rng_state_rank0.pt", "rng_state_rank1.pt",
                                  "training_metrics.json"}
    assert meta["config"]["model"]["d_model"] == 64
