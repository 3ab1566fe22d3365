"""data.order: the global sample order, rank slices and O(1) resume, on a real parquet set.

The expected sequences are built here independently: every file is read whole with
pq.read_table and concatenated in the epoch's file order.
"""

import bisect
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data import index as data_mod
from data import stream as ingest
from data.index import DataIndex, build_index
from data.order import EpochOrder
from storage.location import resolve

ROWS = [37, 50, 0, 23, 64, 41, 29, 1]  # one empty file, one single-row file
ROW_GROUP = 7  # never aligned with the global batches below
TOKEN_LEN = 9
WORLDS = (1, 2, 4)


def make_id(f, i):
    return (f + 1) * 10**12 + 7 * i + 3  # large, unique, not equal to any position


def tokens_for(sample_id):
    return int(sample_id).to_bytes(8, "little") + bytes([int(sample_id) % 251])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "train")
    for f, n in enumerate(ROWS):
        ids = [make_id(f, i) for i in range(n)]
        table = pa.table({"id": pa.array(ids, pa.int64()),
                          "tokens": pa.array([tokens_for(x) for x in ids], pa.binary()),
                          "extra": pa.array([str(x) for x in ids], pa.string())})
        pq.write_table(table, str(root / "train" / f"part-{f:05d}.parquet"), row_group_size=ROW_GROUP)
    (root / "train" / "README.txt").write_text("not data")
    (root / "train" / "part-99999.parquet.tmp").write_bytes(b"half written")
    loc = resolve(str(root))
    index = build_index(loc.fs, loc.path)
    return loc, index


def file_ids(path):
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def expected_epoch(index, plan):
    """Independent: (global ids in order, the ordered position of the file of each sample)."""
    ids, file_pos = [], []
    for pos, i in enumerate(plan.order):
        rows = file_ids(index.files[i])
        ids.extend(rows)
        file_pos.extend([pos] * len(rows))
    return ids, file_pos


def ingest_reads(loc, plan, g, cursor, trail):
    """What the Ray Data read tasks produce from the cursor to the epoch's last whole batch,
    in task order, and the audit of what they opened: [(file, first row, row groups)]."""
    tables = [t for p in ingest.epoch_pieces(plan, 0, cursor, plan.steps(g) * g)
              for t in ingest.read_piece(loc.uri, p, str(trail))]
    log = trail / "reads.jsonl"
    opens = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return tables, [(o["file"], o["first_row"], o["row_groups"]) for o in opens]


def deal(tables, g, world, k):
    """The rest of the pipeline without Ray: chunks of k global batches (the last padded),
    rank_major, blocks of k*L rows, block j to rank j mod W (Ray's split, see ingest.py)."""
    per = g // world
    rows = pa.concat_tables([t for t in tables] or [ingest.SCHEMA.empty_table()])
    steps = rows.num_rows // g
    assert rows.num_rows == steps * g
    pad = (-steps % k) * g
    if pad:
        rows = pa.concat_tables([rows, *ingest.filler(pad, TOKEN_LEN)])
    ranks = [[] for _ in range(world)]
    for c in range(0, rows.num_rows, k * g):
        chunk = ingest.rank_major(rows.slice(c, k * g), g, world)
        for j in range(world):
            ranks[j].append(chunk.slice(j * k * per, k * per))
    batches = [[] for _ in range(world)]
    for r in range(world):
        stream = pa.concat_tables(ranks[r]) if ranks[r] else ingest.SCHEMA.empty_table()
        for b in range(steps):
            batches[r].append(stream.slice(b * per, per).to_pydict())
    return batches


def run_stream(loc, plan, g, world, rank, cursor, k=3, trail=None):
    """Rank `rank`'s batches through the ingest's own read tasks and reorder; checks each with
    the loop's position guard. Returns (batches of ids, files the read tasks opened)."""
    trail = trail or Path(tempfile.mkdtemp())
    tables, opens = ingest_reads(loc, plan, g, cursor, trail)
    per = g // world
    out = []
    for b, batch in enumerate(deal(tables, g, world, k)[rank]):
        ingest.check_batch({k_: np.array(v) for k_, v in batch.items()}, rank, 0,
                           cursor + b * g + rank * per, per)
        toks = ingest.tokens_of({"tokens": batch["tokens"]})
        assert toks.dtype == np.uint8 and toks.shape == (per, TOKEN_LEN)
        for x, row in zip(batch["id"], toks):
            assert bytes(row) == tokens_for(x)
        out.append(batch["id"])
    return out, [f for f, _, _ in opens]


def global_sequence(loc, plan, g, world, cursor=0):
    per_rank = [run_stream(loc, plan, g, world, r, cursor)[0] for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1
    seq = []
    for step in range(counts.pop()):
        for r in range(world):
            seq.extend(per_rank[r][step])
    return seq


# --- the index and the plan ------------------------------------------------------------------

def test_build_index_lists_sorted_parquet_with_footer_counts(dataset):
    loc, index = dataset
    assert list(index.files) == [os.path.join(loc.path, "train", f"part-{f:05d}.parquet") for f in range(len(ROWS))]
    assert list(index.rows) == ROWS
    assert index.total_rows == sum(ROWS)
    assert DataIndex.from_json(index.to_json(), loc.path) == index
    assert index.to_json()["files"] == [f"train/part-{f:05d}.parquet" for f in range(len(ROWS))]  # relative
    assert len(set(index.footers)) == len(ROWS) and all(len(h) == 64 for h in index.footers)
    assert list(index.sizes) == [os.path.getsize(f) for f in index.files]


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (1234, 3), (7, 10)])
def test_plan_is_a_permutation_with_cumulative_starts(dataset, seed, epoch):
    loc, index = dataset
    plan = EpochOrder.make(index, seed, epoch)
    assert sorted(plan.order) == list(range(len(ROWS)))
    total, starts = 0, []
    for i in plan.order:
        starts.append(total)
        total += ROWS[i]
    assert list(plan.starts) == starts
    for g in (1, 8, 12, 244, 245):
        assert plan.steps(g) == sum(ROWS) // g


def test_locate_matches_brute_force(dataset):
    loc, index = dataset
    plan = EpochOrder.make(index, 3, 0)
    _, file_pos = expected_epoch(index, plan)
    starts = {}
    for gpos, p in enumerate(file_pos):
        starts.setdefault(p, gpos)
    rng = np.random.default_rng(0)
    total = len(file_pos)
    ranges = [(0, total), (0, 1), (total - 1, total)]
    ranges += [tuple(sorted(rng.integers(0, total + 1, 2))) for _ in range(300)]
    for lo, hi in ranges:
        pieces = plan.locate(int(lo), int(hi))
        got = [(p, starts[p] + row) for p, first, end in pieces for row in range(first, end)]
        assert [gp for _, gp in got] == list(range(lo, hi))
        assert [p for p, _ in got] == file_pos[lo:hi]
        assert all(end > first for _, first, end in pieces)


# --- (a) + (b): coverage and world-size invariance ------------------------------------------

@pytest.mark.parametrize("g", [8, 12])
@pytest.mark.parametrize("epoch", [0, 1])
def test_every_sample_exactly_once_and_same_global_sequence_for_all_world_sizes(dataset, g, epoch):
    loc, index = dataset
    plan = EpochOrder.make(index, 11, epoch)
    expected_ids, _ = expected_epoch(index, plan)
    steps = sum(ROWS) // g
    assert plan.steps(g) == steps
    expected = expected_ids[:steps * g]
    sequences = {}
    for world in WORLDS:
        union = []
        for rank in range(world):
            batches, _ = run_stream(loc, plan, g, world, rank, 0)
            assert len(batches) == steps
            union.extend(x for b in batches for x in b)
        assert sorted(union) == sorted(expected)  # exactly once each (ids are unique)
        assert len(set(union)) == len(union) == steps * g
        sequences[world] = global_sequence(loc, plan, g, world)
        assert sequences[world] == expected
    assert sequences[1] == sequences[2] == sequences[4]
    # the dropped remainder is exactly the tail of the epoch
    assert set(expected_ids) - set(sequences[1]) == set(expected_ids[steps * g:])


def test_rank_slices_are_the_documented_ranges(dataset):
    loc, index = dataset
    plan = EpochOrder.make(index, 5, 2)
    expected_ids, _ = expected_epoch(index, plan)
    g, world = 12, 4
    per = g // world
    for rank in range(world):
        batches, _ = run_stream(loc, plan, g, world, rank, 0)
        for b, ids in enumerate(batches):
            lo = b * g + rank * per
            assert ids == expected_ids[lo:lo + per]


# --- (c): resume is the exact suffix and opens no finished file -----------------------------

@pytest.mark.parametrize("world", WORLDS)
def test_resume_is_the_suffix_and_skips_finished_files(dataset, world):
    loc, index = dataset
    g = 12
    plan = EpochOrder.make(index, 2, 1)
    _, file_pos = expected_epoch(index, plan)
    steps = plan.steps(g)
    full = {r: run_stream(loc, plan, g, world, r, 0)[0] for r in range(world)}
    for c in range(0, steps * g + 1, g):
        done = plan.files_done(c)
        finished_paths = {index.files[plan.order[p]] for p in range(done)}
        for rank in range(world):
            batches, opened = run_stream(loc, plan, g, world, rank, c)
            assert batches == full[rank][c // g:]
            assert not finished_paths & set(opened)
            # brute force: no opened file has all its rows before c
            for path in opened:
                pos = plan.order.index(index.files.index(path))
                assert any(gp >= c for gp, p in enumerate(file_pos) if p == pos)
            # and the read tasks (for all ranks together) open exactly the files holding the
            # remaining samples, each once, in order
            needed = []
            for gp in range(c, steps * g):
                path = index.files[plan.order[file_pos[gp]]]
                if not needed or needed[-1] != path:
                    needed.append(path)
            assert opened == needed
            assert len(set(opened)) == len(opened)


def test_resume_on_another_world_size_continues_the_same_global_sequence(dataset):
    loc, index = dataset
    g = 12
    plan = EpochOrder.make(index, 9, 0)
    reference = global_sequence(loc, plan, g, 1)
    for c in (12, 36, 96, 120, 228):
        for world in WORLDS:
            assert global_sequence(loc, plan, g, world, cursor=c) == reference[c:]


def test_resume_reads_from_the_row_group_holding_the_cursor(dataset, tmp_path):
    loc, index = dataset
    plan = EpochOrder.make(index, 4, 0)
    gb = 4
    checked = 0
    for c in range(0, plan.steps(gb) * gb, gb):
        _, opens = ingest_reads(loc, plan, gb, c, tmp_path)
        pos = bisect.bisect_right(plan.starts, c) - 1
        while index.rows[plan.order[pos]] == 0:  # an empty file holds no cursor
            pos += 1
        row = c - plan.starts[pos]
        path, first_row, groups = opens[0]
        assert path == index.files[plan.order[pos]] and first_row == row
        assert groups[0] == row // ROW_GROUP  # O(1) skip: no earlier group of that file read
        checked += 1
    assert checked > 20


def test_each_row_group_is_read_once_per_epoch(dataset, tmp_path):
    """Read once: across all ranks, every (file, row group) of the epoch is decoded once."""
    loc, index = dataset
    plan = EpochOrder.make(index, 6, 0)
    g = 12
    _, opens = ingest_reads(loc, plan, g, 0, tmp_path)
    groups = [(f, grp) for f, _, gs in opens for grp in gs]
    assert len(groups) == len(set(groups))
    last = plan.steps(g) * g
    expected = set()
    for pos, i in enumerate(plan.order):
        for r in range(index.rows[i]):
            if plan.starts[pos] + r < last:
                expected.add((index.files[i], r // ROW_GROUP))
    assert set(groups) == expected


@pytest.mark.parametrize("k", [1, 2, 5, 100])
def test_every_block_size_deals_the_same_rank_slices(dataset, tmp_path, k):
    loc, index = dataset
    plan = EpochOrder.make(index, 8, 3)
    for world in (2, 4):
        for rank in range(world):
            a, _ = run_stream(loc, plan, 12, world, rank, 24, k=k, trail=tmp_path)
            b, _ = run_stream(loc, plan, 12, world, rank, 24, k=3, trail=tmp_path)
            assert a == b


def test_position_guard_refuses_a_batch_from_the_wrong_place():
    good = {"epoch": np.array([1, 1, 1]), "pos": np.array([48, 49, 50])}
    ingest.check_batch(good, 1, 1, 48, 3)
    for batch, where in [
        ({"epoch": np.array([1, 1, 1]), "pos": np.array([51, 52, 53])}, "positions [51, 54)"),
        ({"epoch": np.array([0, 0, 0]), "pos": np.array([48, 49, 50])}, "epoch 0 positions [48, 51)"),
        ({"epoch": np.array([1, 1, 1]), "pos": np.array([48, 50, 49])}, "1:48, 1:50, 1:49"),
        ({"epoch": np.array([1, 1]), "pos": np.array([48, 49])}, "positions [48, 50)"),
        ({"epoch": np.array([-1, -1, -1]), "pos": np.array([-1, -1, -1])}, "-1"),
    ]:
        with pytest.raises(ingest.DataOrderError) as err:
            ingest.check_batch(batch, 1, 1, 48, 3)
        message = str(err.value)
        assert "rank 1" in message and "expected epoch 1 positions [48, 51)" in message
        assert where in message, message


def test_stream_spans_epochs_from_the_cursor(dataset):
    loc, index = dataset
    g = 12
    per_epoch = EpochOrder.make(index, 2, 0).steps(g)
    got = ingest.pieces(index, 2, g, 0, (per_epoch - 2) * g, 5)
    assert sum(p.rows for p in got) == 5 * g
    assert {p.epoch for p in got} == {0, 1}
    assert sum(p.rows for p in got if p.epoch == 0) == 2 * g
    e1 = [p for p in got if p.epoch == 1]
    assert e1[0].pos == 0 and sum(p.rows for p in e1) == 3 * g


# --- (d): epoch orders ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_epoch_orders_differ_between_epochs_and_are_reproducible(dataset, seed):
    loc, index = dataset
    orders = [EpochOrder.make(index, seed, e).order for e in range(6)]
    for a, b in zip(orders, orders[1:]):
        assert a != b
    assert len(set(orders)) > 3
    assert [EpochOrder.make(index, seed, e).order for e in range(6)] == orders
    again = EpochOrder.make(DataIndex.from_json(index.to_json(), loc.path), seed, 0)
    assert again == EpochOrder.make(index, seed, 0)


def test_different_seeds_give_different_orders(dataset):
    loc, index = dataset
    orders = {EpochOrder.make(index, seed, 0).order for seed in range(8)}
    assert len(orders) > 4


def test_epoch_streams_differ_but_cover_the_same_samples(dataset):
    loc, index = dataset
    g = 1  # no remainder dropped: each epoch is every sample
    e0 = global_sequence(loc, EpochOrder.make(index, 0, 0), g, 1)
    e1 = global_sequence(loc, EpochOrder.make(index, 0, 1), g, 1)
    assert e0 != e1
    assert sorted(e0) == sorted(e1) == sorted(make_id(f, i) for f, n in enumerate(ROWS) for i in range(n))
    assert global_sequence(loc, EpochOrder.make(index, 0, 1), g, 1) == e1


# --- (e): files_done ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (3, 2), (42, 7)])
def test_files_done_matches_brute_force(dataset, seed, epoch):
    loc, index = dataset
    plan = EpochOrder.make(index, seed, epoch)
    _, file_pos = expected_epoch(index, plan)
    n = len(ROWS)
    for cursor in range(0, sum(ROWS) + 1):
        # largest k such that every sample of the first k ordered files lies before the cursor
        brute = max(k for k in range(n + 1) if all(gp < cursor for gp, p in enumerate(file_pos) if p < k))
        assert plan.files_done(cursor) == brute, cursor
    assert plan.files_done(0) == (1 if ROWS[plan.order[0]] == 0 else 0)
    assert plan.files_done(sum(ROWS)) == n


# --- (f): cursor validation -------------------------------------------------------------------

@pytest.mark.parametrize("cursor", [1, 5, 13, 23, 241])
def test_cursor_not_a_multiple_of_the_global_batch(dataset, cursor):
    loc, index = dataset
    with pytest.raises(ValueError) as err:
        ingest.pieces(index, 0, 12, 0, cursor, 3)
    assert str(cursor) in str(err.value) and "12" in str(err.value)


def test_cursor_at_the_end_yields_nothing(dataset):
    loc, index = dataset
    plan = EpochOrder.make(index, 0, 0)
    g = 12
    end = plan.steps(g) * g
    for world in WORLDS:
        for rank in range(world):
            batches, opened = run_stream(loc, plan, g, world, rank, end)
            assert batches == [] and opened == []


def test_read_all_reads_every_row_in_file_order(tmp_path):
    folder = tmp_path / "val"
    os.makedirs(folder)
    expected = []
    for f, n in enumerate([5, 0, 3]):
        ids = [10**13 + 100 * f + i for i in range(n)]
        expected.extend(ids)
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                                 "tokens": pa.array([tokens_for(x) for x in ids], pa.binary())}),
                       str(folder / f"part-{f:05d}.parquet"), row_group_size=2)
    ids, toks = data_mod.read_all(pafs.LocalFileSystem(), str(folder))
    assert ids.tolist() == expected
    assert toks.shape == (len(expected), TOKEN_LEN)
    assert [bytes(r) for r in toks] == [tokens_for(x) for x in expected]


def _open_paths():
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return paths


def test_read_task_closes_its_file(dataset):
    loc, index = dataset
    plan = EpochOrder.make(index, 1, 0)
    for piece in ingest.epoch_pieces(plan, 0, 24, plan.steps(12) * 12):
        tables = ingest.read_piece(loc.uri, piece, None)
        first = next(tables)
        assert piece.path in _open_paths()  # open while the task streams its row groups
        rest = list(tables)
        assert first.num_rows + sum(t.num_rows for t in rest) == piece.rows
        assert piece.path not in _open_paths()
