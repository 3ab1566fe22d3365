"""Property 1: train 40 steps straight, or stop at 10 and 24 and resume twice: every per-step
loss, every LR and the final weights and optimizer state are bitwise equal (same world size)."""

import pyarrow.parquet as pq
import torch
from conftest import read_json
from safetensors.torch import load_file

from data.index import DataIndex
from data.order import EpochOrder

FINAL = "checkpoint-epoch1-step40-files4"


def test_names_cover_mid_file_and_epoch_boundary(runs):
    chain = sorted(p.name for p in (runs.storage / "chain").iterdir() if p.name.startswith("checkpoint-"))
    assert chain == sorted([
        "checkpoint-epoch0-step8-files2", "checkpoint-epoch0-step10-files2",  # stop: mid-file
        "checkpoint-epoch0-step16-files4", "checkpoint-epoch1-step24-files0",  # stop: epoch end
        "checkpoint-epoch1-step32-files2", FINAL,
    ])
    meta = read_json(runs.ckpt("chain", "checkpoint-epoch0-step10-files2") / "metadata.json")
    assert meta["samples_in_epoch"] == 160
    # the stop at step 10 is inside a file and inside one of its row groups (from the data itself)
    order = EpochOrder.make(DataIndex.from_json(meta["data_index"], meta["config"]["data"]["path"]), 0, 0)
    (pos, row, _), = order.locate(160, 161)
    groups = pq.ParquetFile(order.index.files[order.order[pos]]).metadata
    bounds = [sum(groups.row_group(g).num_rows for g in range(k)) for k in range(groups.num_row_groups + 1)]
    assert 0 < row and row not in bounds, (row, bounds)


def test_every_step_loss_and_lr_bitwise_equal(runs):
    straight = read_json(runs.ckpt("straight", FINAL) / "training_metrics.json")
    chain = read_json(runs.ckpt("chain", FINAL) / "training_metrics.json")
    assert [s for s, _ in straight["loss_history"]] == list(range(1, 41))
    assert chain["loss_history"] == straight["loss_history"]  # floats compared exactly
    assert chain["lr_history"] == straight["lr_history"]
    common = {s for s, _ in straight["val_history"]} & {s for s, _ in chain["val_history"]}
    assert len(common) >= 4
    assert [v for v in chain["val_history"] if v[0] in common] == \
           [v for v in straight["val_history"] if v[0] in common]
    assert [r[0] for r in chain["resumes"]] == [10, 24]


def test_final_weights_and_optimizer_bitwise_equal(runs):
    for name in ("checkpoint-epoch0-step16-files4", "checkpoint-epoch1-step24-files0", FINAL):
        a = load_file(runs.ckpt("straight", name) / "model.safetensors")
        b = load_file(runs.ckpt("chain", name) / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    oa = torch.load(runs.ckpt("straight", FINAL) / "optimizer.pt", weights_only=True)
    ob = torch.load(runs.ckpt("chain", FINAL) / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][field], ob["state"][k][field])


def test_weights_actually_moved(runs):
    """Guards the comparison above against a run that trained nothing."""
    a = load_file(runs.ckpt("straight", "checkpoint-epoch0-step8-files2") / "model.safetensors")
    b = load_file(runs.ckpt("straight", FINAL) / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    losses = [v for _, v in read_json(runs.ckpt("straight", FINAL) / "training_metrics.json")["loss_history"]]
    assert losses[-1] < losses[0]


def test_tensorboard_curves_continue_across_the_resumes(runs):
    """One event file per segment in {run}/tensorboard/; read as TensorBoard reads them, loss, LR,
    gradient norm and throughput are at steps 1..40 once each, the loss the straight run's."""
    from conftest import assert_curves_match, scalars

    folder = runs.storage / "chain" / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 3
    straight = read_json(runs.ckpt("straight", FINAL) / "training_metrics.json")
    assert_curves_match(folder, straight["loss_history"], 40)
    curves = scalars(folder)
    chain = read_json(runs.ckpt("chain", FINAL) / "training_metrics.json")  # validates at its stops too
    assert [s for s, _ in curves["val/loss"]] == [s for s, _ in chain["val_history"]]
    assert [s for s, _ in curves["checkpoint/stall_s"]] == [8, 10, 16, 24, 32, 40]
    assert all(v > 0 for _, v in curves["perf/tokens_per_s"])
