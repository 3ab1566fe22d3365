"""Property 3 on the Ray Data path: a resume deep in an epoch opens none of the files already
processed (they held garbage during the resumed segment, and the read tasks' audit never
opened them), reads the partial file from the row group holding the cursor, and across all
ranks decodes each row group of an epoch once."""

from collections import Counter

import pyarrow.parquet as pq
from conftest import audit, read_json, reads

ROW_GROUP = 10  # the test corpus's row groups


def test_processed_files_were_unreadable_and_never_opened(runs):
    assert len(runs.processed_while_garbage) == 2  # files 1-2 of epoch 0 done at step 10
    opened = [r["file"] for r in reads(runs.audit / "chain2")]
    assert opened, "the audit trail recorded no opens: the check below would prove nothing"
    assert not set(opened) & set(runs.processed_while_garbage)
    assert runs.chain[1].rc == 0


def test_partial_file_is_read_from_the_row_group_holding_the_cursor(runs):
    from data.index import DataIndex
    from data.order import EpochOrder

    meta = read_json(runs.ckpt("chain", "checkpoint-epoch0-step10-files2") / "metadata.json")
    plan = EpochOrder.make(DataIndex.from_json(meta["data_index"], meta["config"]["data"]["path"]), 0, 0)
    cursor = meta["samples_in_epoch"]  # 160: file 3 of the epoch, row 32
    partial = plan.index.files[plan.order[2]]
    row = cursor - plan.starts[2]
    opens = reads(runs.audit / "chain2")
    # the segment (steps 11-24) is the rest of epoch 0: the partial file and the 3 after it,
    # each opened once, for both ranks together
    assert Counter(r["file"] for r in opens) == Counter(plan.index.files[i] for i in plan.order[2:])
    first = [r for r in opens if r["file"] == partial]
    assert first[0]["first_row"] == row == 32
    assert first[0]["row_groups"][0] == row // ROW_GROUP  # no earlier row group decoded
    records = audit(runs.audit / "chain2")
    first_batch = [r for r in records if r["event"] == "batch" and r["step"] == 11]
    assert sorted(i for r in first_batch for i in r["ids"]) == sorted(
        i for r in audit(runs.audit / "straight") if r["event"] == "batch" and r["step"] == 11
        for i in r["ids"])


def test_each_row_group_read_once_per_epoch_across_ranks(runs):
    """The straight 2-worker run: epoch 0 whole (24 steps), epoch 1 to step 40 (16 steps)."""
    opens = reads(runs.audit / "straight")
    decoded = Counter((r["epoch"], r["file"], g) for r in opens for g in r["row_groups"])
    assert set(decoded.values()) == {1}, [k for k, v in decoded.items() if v > 1]
    files = sorted((runs.data / "train").glob("*.parquet"))
    groups = {(str(f), g) for f in files for g in range(pq.ParquetFile(f).metadata.num_row_groups)}
    assert {(f, g) for e, f, g in decoded if e == 0} == groups  # 384 rows: all of epoch 0
    rows = sum(pq.ParquetFile(f).metadata.row_group(g).num_rows for e, f, g in decoded if e == 1
               for f in [f])
    assert 256 <= rows < 256 + 2 * ROW_GROUP  # epoch 1's 16 steps, plus the partial last group
