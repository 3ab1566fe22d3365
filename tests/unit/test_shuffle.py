"""data.shuffle=window (data/order.py SampleOrder, data/stream.py's read plan and shuffle
stage) on a real parquet set, the Ray Data stages run here in order without Ray (as
test_data_cursor.py does): the order is a permutation of each epoch, the same for every worker
count, a resume mid-window continues it exactly, reads once by row group and opens no file of
an earlier window, and batches mix the corpus."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import test_data_cursor
import test_poisoned_checkpoint
from test_data_cursor import ROW_GROUP, TOKEN_LEN, file_ids

from configs import load, parse_set, with_overrides
from data import stream as ingest
from data.order import SampleOrder, shuffle_window
from ray_job.errors import UserError
from ray_job.resume import ResumeChoice, check_same_order

SEED = 5
dataset = test_data_cursor.dataset  # the same parquet set (a module-scoped fixture)


def s_ids(index, order: SampleOrder) -> list[int]:
    """Independent: the epoch's file-order sequence S of ids, every file read whole."""
    return [x for i in order.files.order for x in file_ids(index.files[i])]


def expected_ids(index, order: SampleOrder, start: int, stop: int) -> list[int]:
    """Trained positions [start, stop) by the documented rule: window w's offset o holds
    S[w*window + perm_w[o]], perm from np.random.default_rng([seed, epoch, w, 0x5AFE])."""
    seq = s_ids(index, order)
    out = []
    for p in range(start, stop):
        if not order.window:
            out.append(seq[p])
            continue
        w, o = divmod(p, order.window)
        length = min(order.window, order.trained - w * order.window)
        perm = np.random.default_rng([order.seed, order.epoch, w, 0x5AFE]).permutation(length)
        out.append(seq[w * order.window + perm[o]])
    return out


def stream(loc, index, g, world, window, epoch, cursor, steps, k=3, trail=None):
    """Every rank's batches from (epoch, cursor): the read tasks, the shuffle stage on each
    window, the rank-major reorder and the round-robin deal; each batch position-checked.
    Returns ({rank: [ids per step]}, the audit of opens)."""
    trail = Path(trail or tempfile.mkdtemp())
    todo = ingest.pieces(index, SEED, g, epoch, cursor, steps, window)
    tables = []
    for p in todo:
        if p.epoch == ingest.ALIGN:
            tables += list(ingest.filler(p.rows, TOKEN_LEN, ingest.ALIGN))
        else:
            tables += list(ingest.read_piece(loc.uri, p, str(trail)))
    rows = pa.concat_tables(tables)
    assert rows.num_rows % window == 0  # every window whole
    end = ingest._end(index, SEED, g, epoch, cursor, steps)
    pad = (-steps % k) * g
    shuffled = pa.concat_tables([
        ingest.window_shuffle(rows.slice(s, window), window, SEED, TOKEN_LEN, (epoch, cursor), end, pad)
        for s in range(0, rows.num_rows, window)])
    assert shuffled.num_rows == steps * g + pad
    per = g // world
    out = {r: [] for r in range(world)}
    parts = {r: [] for r in range(world)}
    for c in range(0, shuffled.num_rows, k * g):
        chunk = ingest.rank_major(shuffled.slice(c, k * g), g, world)
        for r in range(world):
            parts[r].append(chunk.slice(r * k * per, k * per))
    for r in range(world):
        mine = pa.concat_tables(parts[r])
        e, c = epoch, cursor
        for b in range(steps):
            batch = {key: np.array(v) for key, v in mine.slice(b * per, per).to_pydict().items()}
            per_epoch = SampleOrder.make(index, SEED, e, g, window).steps(g)
            ingest.check_batch(batch, r, e, c + r * per, per)  # the loop's own guard
            out[r].append(list(batch["id"]))
            c += g
            if c == per_epoch * g:
                e, c = e + 1, 0
    log = trail / "reads.jsonl"
    opens = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, opens


def global_ids(out, world):
    return [i for step in range(len(out[0])) for r in range(world) for i in out[r][step]]


@pytest.mark.parametrize("window", [12, 36, 48, 240])  # 240: more than the epoch
@pytest.mark.parametrize("epoch", [0, 3])
def test_each_epoch_is_a_permutation_and_follows_the_documented_rule(dataset, window, epoch):
    loc, index = dataset
    g = 12
    order = SampleOrder.make(index, SEED, epoch, g, window)
    seq = s_ids(index, order)
    got = global_ids(stream(loc, index, g, 2, window, epoch, 0, order.steps(g))[0], 2)
    assert sorted(got) == sorted(seq[:order.trained]) and len(set(got)) == len(got)
    assert got == expected_ids(index, order, 0, order.trained)
    assert [seq[p] for p in order.sources(0, order.trained)] == got  # SampleOrder says the same
    assert got != seq[:order.trained] or window == 12 and order.trained <= 12  # it shuffled


def test_the_order_is_the_same_for_every_worker_count(dataset):
    loc, index = dataset
    g, window = 12, 36
    steps = SampleOrder.make(index, SEED, 1, g, window).steps(g) + 5  # across an epoch boundary
    seqs = {w: global_ids(stream(loc, index, g, w, window, 1, 0, steps)[0], w) for w in (1, 2, 4)}
    assert seqs[1] == seqs[2] == seqs[4]


@pytest.mark.parametrize("cursor_steps", [1, 2, 3, 4, 7, 9])
def test_a_resume_mid_window_continues_exactly_and_opens_no_earlier_window(dataset, cursor_steps, tmp_path):
    """Windows of 3 steps: steps 1, 2, 4, 7 are mid-window, 3 and 9 at a boundary; the stream
    from the cursor is the straight stream's suffix; files wholly in earlier windows are never
    opened; the cursor's window is read from the row group holding its first sample."""
    loc, index = dataset
    g, window, world = 12, 36, 2
    order = SampleOrder.make(index, SEED, 0, g, window)
    steps = order.steps(g)
    straight = stream(loc, index, g, world, window, 0, 0, steps)[0]
    cursor = cursor_steps * g
    resumed, opens = stream(loc, index, g, world, window, 0, cursor, steps - cursor_steps, trail=tmp_path)
    assert {r: straight[r][cursor_steps:] for r in straight} == resumed
    start = order.read_start(cursor)
    assert start == cursor - cursor % window
    done = {index.files[i] for i in order.files.order[:order.files_done(cursor)]}
    assert not done & {o["file"] for o in opens}
    if start >= 100:
        assert done  # there were whole files in earlier windows, and none was opened
    first = opens[0]
    pos = next(p for p in range(len(order.files.order))
               if order.files.starts[p] <= start < order.files.starts[p] + index.rows[order.files.order[p]])
    row = start - order.files.starts[pos]
    assert first["file"] == index.files[order.files.order[pos]] and first["first_row"] == row
    assert first["row_groups"][0] == row // ROW_GROUP
    extra = cursor - start  # decoded, not trained: at most a window
    assert 0 <= extra < window


def test_each_row_group_is_read_once_per_epoch(dataset, tmp_path):
    loc, index = dataset
    g, window = 12, 48
    order = SampleOrder.make(index, SEED, 0, g, window)
    _, opens = stream(loc, index, g, 4, window, 0, 0, order.steps(g), trail=tmp_path)
    groups = Counter((o["file"], grp) for o in opens for grp in o["row_groups"])
    assert set(groups.values()) == {1}
    expected = {(index.files[i], r // ROW_GROUP) for pos, i in enumerate(order.files.order)
                for r in range(index.rows[i]) if order.files.starts[pos] + r < order.trained}
    assert set(groups) == expected


def test_batches_mix_the_corpus(dataset):
    """The share of a global batch's samples whose file-order successor is in the same batch:
    (G-1)/G in file order, about G/window shuffled (target: at most twice that)."""
    loc, index = dataset
    g = 12
    seq = {}
    for window in (0, 120):
        order = SampleOrder.make(index, SEED, 0, g, window)
        s = s_ids(index, order)
        nxt = {a: b for a, b in zip(s, s[1:])}
        ids = global_ids(stream(loc, index, g, 2, window or g, 0, 0, order.steps(g))[0], 2) if window \
            else s[:order.trained]
        batches = [set(ids[b:b + g]) for b in range(0, len(ids), g)]
        seq[window] = np.mean([sum(nxt.get(x) in b for x in b) / g for b in batches])
    assert seq[0] > 0.85
    assert seq[120] <= 2 * g / 120, seq


def test_shuffle_stage_refuses_anything_but_one_whole_window():
    rows = pa.concat_tables([*ingest.filler(3, TOKEN_LEN, ingest.ALIGN)])
    good = pa.table({"id": pa.array(range(6), pa.int64()), "tokens": pa.array([b"x"] * 6, pa.binary()),
                     "epoch": pa.array([0] * 6, pa.int32()), "pos": pa.array(range(6), pa.int64())},
                    schema=ingest.SCHEMA)
    out = ingest.window_shuffle(good, 6, SEED, TOKEN_LEN, (0, 0), (0, 6), 0)
    assert sorted(out.column("id").to_pylist()) == list(range(6))
    assert out.column("pos").to_pylist() == list(range(6))
    for bad in (good.slice(0, 5), pa.concat_tables([good.slice(1, 5), rows.slice(0, 1)]),
                good.take(pa.array([1, 0, 2, 3, 4, 5]))):
        with pytest.raises(ingest.DataOrderError, match="not one whole window of 6"):
            ingest.window_shuffle(bad, 6, SEED, TOKEN_LEN, (0, 0), (0, 6), 0)


def test_window_size_from_the_config():
    cfg = load("test")
    assert shuffle_window(cfg) == 32  # the test preset: two global batches of 16
    assert shuffle_window(with_overrides(cfg, parse_set(["data.shuffle_window=40"]))) == 32  # whole batches
    assert shuffle_window(with_overrides(cfg, parse_set(["data.shuffle_window=5"]))) == 16  # at least one
    assert shuffle_window(with_overrides(cfg, parse_set(["data.shuffle=files"]))) == 0
    default = with_overrides(cfg, parse_set(["data.shuffle_window=0"]))
    assert shuffle_window(default) == (256 << 20) // ((65 + 20) * 16) * 16  # ~256 MB of samples


def test_a_resume_refuses_another_sample_order_mid_epoch():
    cfg = load("test")
    meta = {"epoch": 0, "samples_in_epoch": 160, "config": {"data": {"shuffle_seed": 0}},
            "sample_order": {"shuffle": "window", "window": 32, "seed": 0}}
    choice = ResumeChoice(name="checkpoint-epoch0-step10-files2", loc=None, metadata=meta)
    assert check_same_order(choice, cfg, "uint8") is None
    for change in (["data.shuffle=files"], ["data.shuffle_window=64"], ["data.shuffle_seed=3"]):
        with pytest.raises(UserError, match="changing it mid-epoch would repeat and skip samples"):
            check_same_order(choice, with_overrides(cfg, parse_set(change)), "uint8")
    old = {**meta, "sample_order": None}  # a checkpoint from before data.shuffle: file order
    with pytest.raises(UserError, match="--set data.shuffle=files --set data.shuffle_window=0"):
        check_same_order(ResumeChoice(choice.name, None, old), cfg, "uint8")
    at_boundary = {**meta, "samples_in_epoch": 0}
    note = check_same_order(ResumeChoice(choice.name, None, at_boundary), with_overrides(cfg, parse_set(
        ["data.shuffle_seed=3"])), "uint8")
    assert "at an epoch boundary: the sample order changes" in note


# --- another global batch mid-epoch (issue 23 item 5) ---------------------------------------------

def test_the_last_window_depends_on_the_global_batch():
    """The epoch's last window ends at P = (N // G) * G: with G 8 -> 16 at cursor 80 (N 104, window
    64, seed 0) the window in progress is [64, 104) before and [64, 96) after, drawn by
    another permutation, so a resume there trains some samples twice and others never."""
    from data.index import DataIndex

    index = DataIndex(files=("a.parquet",), rows=(104,))  # positions are file-order positions
    before, after = SampleOrder.make(index, 0, 0, 8, 64), SampleOrder.make(index, 0, 0, 16, 64)
    assert (before.window_bounds(80), after.window_bounds(80)) == ((64, 104), (64, 96))
    trained = Counter([int(p) for p in before.sources(0, 80)] + [int(p) for p in after.sources(80, 96)])
    assert sorted(p for p, n in trained.items() if n > 1) == [65, 82, 84, 86, 90]
    assert sorted(set(range(96)) - set(trained)) == [64, 68, 75, 78, 79, 88, 91, 94]


corpus = test_poisoned_checkpoint.corpus  # 6 files x 64 samples (a module-scoped fixture)


def _resume_with_another_batch(tmp_path, corpus, window: int, cursor: int):
    from ray_job import train

    folder = test_poisoned_checkpoint.launch_checkpoint(
        tmp_path / "old", corpus, cursor // 16, cursor, sets=[f"data.shuffle_window={window}"])
    return train.prepare(["--config", "test", "--storage", str(tmp_path / "runs"), "--run-name", "fork",
                          "--set", f"data.path={corpus}", "--set", f"data.shuffle_window={window}",
                          "--set", "train.global_batch_size=80", "--allow-new-global-batch",
                          "--resume", folder, "--max-steps", "40"])


def test_another_global_batch_inside_a_window_it_cuts_otherwise_is_refused_before_ray(tmp_path, corpus):
    """384 samples, one window of them all: G 16 -> 80 cuts it at 320 instead of 384. At 160
    samples in, the resume is refused (ray_job/train.py's prepare: before Ray), saying how far
    to go with the old size; at a cursor whose window both sizes cut alike it goes ahead."""
    with pytest.raises(UserError) as refused:
        _resume_with_another_batch(tmp_path / "in-window", corpus, 400, 160)
    assert str(refused.value) == (
        "--allow-new-global-batch: checkpoint-epoch0-step10-files0 stopped 160 samples into epoch 0, "
        "inside shuffle window [0, 384), which global batch size 80 would cut at 320 and shuffle "
        "otherwise: samples would repeat and be skipped. Finish the epoch with global batch size 16 "
        "(--max-steps 24), then resume with 80 from its end, or resume a checkpoint at a window's start "
        "(samples_in_epoch a multiple of 400)")
    # windows of 160: [0, 160) is the same under both sizes, so a resume at 80 keeps the order
    _, _, _, plan = _resume_with_another_batch(tmp_path / "same-window", corpus, 160, 80)
    assert plan.resume.samples_in_epoch == 80 and plan.config.train.global_batch_size == 80
