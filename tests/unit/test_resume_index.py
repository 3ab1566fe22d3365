"""A resume reads the data at data.path, and only the files it trained on (data/checks.py
resume_index): the checkpoint's index holds names relative to the data path, sizes and parquet
footer fingerprints; a moved dataset is found, a missing, resized or rewritten file refused
before Ray (exit 2 material: one line naming the file and what differs)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.checks import resume_index
from data.index import build_index
from ray_job.errors import UserError
from storage.location import resolve

CK = "checkpoint-epoch0-step8-files2"


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "corpus"
    (root / "train").mkdir(parents=True)
    for f in range(3):
        table = pa.table({"id": pa.array(range(f * 10, f * 10 + 10), pa.int64()),
                          "tokens": pa.array([bytes([i]) * 5 for i in range(10)], pa.binary())})
        pq.write_table(table, root / "train" / f"part-{f:05d}.parquet", row_group_size=4)
    loc = resolve(str(root))
    return root, build_index(loc.fs, loc.path).to_json()


def test_the_index_is_relative_and_a_moved_dataset_is_found(data, tmp_path):
    root, saved = data
    assert saved["files"] == [f"train/part-{f:05d}.parquet" for f in range(3)]
    assert all(len(h) == 64 for h in saved["footers"]) and len(saved["sizes"]) == 3
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    index = resume_index(resolve(str(moved)), {"data_index": saved}, CK)
    assert list(index.files) == [str(moved / "train" / f"part-{f:05d}.parquet") for f in range(3)]
    assert index.to_json() == saved


def _rewrite(path, ids):
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                             "tokens": pa.array([bytes([i % 10]) * 5 for i in range(len(ids))], pa.binary())}),
                   path, row_group_size=4)


@pytest.mark.parametrize("change, words", [
    ("delete", "is missing"),
    ("same rows, other content", "another parquet footer"),
    ("more rows", "bytes, the checkpoint's index"),
    ("not parquet", "does not read as parquet"),
])
def test_a_changed_file_is_refused_naming_it(data, change, words):
    root, saved = data
    path = root / "train" / "part-00001.parquet"
    if change == "delete":
        path.unlink()
    elif change == "same rows, other content":  # same size, other ids: regenerated in place
        _rewrite(path, list(range(110, 120)))
        assert path.stat().st_size == saved["sizes"][1]
    elif change == "more rows":
        _rewrite(path, list(range(100, 160)))
    else:
        path.write_bytes(b"not parquet")
    with pytest.raises(UserError) as err:
        resume_index(resolve(str(root)), {"data_index": saved}, CK)
    message = str(err.value)
    assert "train/part-00001.parquet, which checkpoint-epoch0-step8-files2 trained on," in message
    assert words in message and "\\n" not in message, message


def test_an_index_cannot_name_files_outside_the_data_path(data):
    root, saved = data
    bad = {**saved, "files": ["../../etc/passwd", *saved["files"][1:]]}
    with pytest.raises(UserError, match="not a file under data.path"):
        resume_index(resolve(str(root)), {"data_index": bad}, CK)


def test_a_checkpoint_from_before_fingerprints_is_found_by_file_name(data, tmp_path):
    root, saved = data
    old = {"files": [f"/old/place/train/part-{f:05d}.parquet" for f in range(3)], "rows": saved["rows"]}
    index = resume_index(resolve(str(root)), {"data_index": old}, CK)
    assert index.to_json() == saved  # fingerprinted from here on
    _rewrite(root / "train" / "part-00002.parquet", list(range(3)))
    with pytest.raises(UserError, match="has 3 rows, the checkpoint's index 10"):
        resume_index(resolve(str(root)), {"data_index": old}, CK)


def test_files_already_trained_on_in_the_epoch_are_checked_by_size_never_opened(data):
    """Global batch 10, windows of 10, cursor 20 of epoch 0: the
    first two files of the epoch's order are done; garbage of their size passes (they are not
    read), another size is refused; the rest are fingerprinted."""
    from data.index import DataIndex
    from data.order import SampleOrder

    root, saved = data
    meta = {"data_index": saved, "epoch": 0, "samples_in_epoch": 20, "global_batch_size": 10,
            "sample_order": {"shuffle": "window", "window": 10, "seed": 0}}
    order = SampleOrder.make(DataIndex.from_json(saved, str(root)), 0, 0, 10, 10)
    assert order.files_done(20) == 2
    done = [root / saved["files"][i] for i in order.files.order[:2]]
    rest = root / saved["files"][order.files.order[2]]
    for path in done:
        path.write_bytes(b"x" * path.stat().st_size)  # unreadable if opened
    resume_index(resolve(str(root)), meta, CK)
    original = rest.read_bytes()
    rest.write_bytes(b"y" * len(original))  # a file this resume reads: refused
    with pytest.raises(UserError, match="does not read as parquet"):
        resume_index(resolve(str(root)), meta, CK)
    rest.write_bytes(original)
    done[0].write_bytes(b"x")
    with pytest.raises(UserError, match="has 1 bytes"):
        resume_index(resolve(str(root)), meta, CK)


def test_a_read_task_refuses_a_file_rewritten_since_the_run_indexed_it(data):
    from data.stream import DataOrderError, Piece, read_piece

    root, saved = data
    path = root / "train" / "part-00001.parquet"
    piece = Piece(0, str(path), 0, 10, 0, saved["footers"][1])
    assert sum(t.num_rows for t in read_piece(str(root), piece, None)) == 10
    _rewrite(path, list(range(110, 120)))  # same size, other content
    with pytest.raises(DataOrderError, match="changed since this run indexed it"):
        list(read_piece(str(root), piece, None))
